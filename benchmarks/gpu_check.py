"""Every path only a GPU cluster takes, run for real on one CUDA GPU, each for a few dozen steps, with what it
measured: one command for the day a GPU is lent (about 8 minutes on one H100/H200).

    make gpu-check                                  # installs the wheels carried in .whl/ first (see the Makefile)
    python benchmarks/gpu_check.py [--out DIR] [--only NAME ...]

It writes benchmarks/results/gpu_check.txt: a line `PASS name: what it measured` or `FAIL name: why` per check,
and each command's log under --out. A failing check does not stop the others. The checks:

- train:    LoRA in bf16 and in fp16 (forced, as on a V100), QLoRA nf4 with bf16 and with fp16 compute, on the
            bundled model and on an OpenCALM-1b-shaped one (random weights); fp16 with lora.bias=all (biases that
            must train in fp32 beside fp16 weights). Each: exit 0, the loss falls, no skipped step after the first few.
- infer:    generate, eval and chat on the GPU, the model's device asserted, tokens/s printed; merge, the merged
            model's logits against the adapter's.
- kernels:  Liger on and off, sdpa_varlen against the block mask: the same losses, the time of each.
- torchrun: a rank per GPU (two at most) over NCCL, DDP and FSDP (LoRA, and QLoRA stored in bf16; with one GPU
            the ranks are one, which trains as a single process, and the line says so); TERM to torchrun while a
            checkpoint is written: the checkpoint completes, the resume is exact.
- planner:  the planner's peak against the measured peak for 7B-shaped LoRA and QLoRA at 1,024 tokens.
- seed:     the seed-style script (benchmarks/throughput.py) against hpclora's default on the same GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "gpu_check.txt"
DATA = ROOT / "configs" / "data" / "demo-ja-en.jsonl"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}


class Check:
    def __init__(self, out: Path):
        self.out, self.lines = out, []

    def run(self, *argv: str, name: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        """A command, its output kept in OUT/NAME.log; a non-zero exit fails the check."""
        start = time.perf_counter()
        done = subprocess.run(list(argv), capture_output=True, text=True, env=env or ENV, timeout=timeout)
        (self.out / f"{name}.log").write_text(f"$ {' '.join(argv)}\n{done.stdout}\n{done.stderr}")
        if done.returncode != 0:
            raise AssertionError(f"exit {done.returncode} after {time.perf_counter() - start:.0f} s: {done.stderr.strip()[-600:]}")
        return done

    def hpclora(self, *argv: str, name: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "hpclora", *argv, name=name, **kwargs)

    def record(self, name: str, passed: bool, text: str) -> None:
        line = f"{'PASS' if passed else 'FAIL'} {name}: {text}"
        print(line, flush=True)
        self.lines.append(line)


def config(out: Path, name: str, model: str, *overrides: str) -> Path:
    path = out / f"{name}.yaml"
    path.write_text(json.dumps({
        "run": {"name": name, "output_root": str(out / "runs")},
        "model": {"name": model},
        "data": {"path": str(DATA), "format": "alpaca", "template": "alpaca", "max_length": 256, "val_size": 20},
        "train": {"max_steps": 30, "lr": 1e-3, "micro_batch_size": 8, "eval_every": 0, "log_every": 1, "save_every": 0},
        "slurm": {"gpus": 1},
    }))
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def trained(c: Check, out: Path, name: str, model: str, *overrides: str) -> tuple[Path, dict]:
    """Train; the loss falls, every step after the fifth counted (fp16 loss scaling skips none once it has settled)."""
    run = out / "runs" / name
    c.hpclora("train", str(config(out, name, model)), "--run-dir", str(run), *overrides, name=name)
    summary = json.loads((run / "summary.json").read_text())
    losses = [m["loss"] for m in metrics(run) if "loss" in m]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, f"the loss did not fall: {losses[:3]} ... {losses[-3:]}"
    assert summary["final_val_loss"] < summary["base_val_loss"], summary
    assert all(m.get("grad_norm") not in (None, float("inf")) for m in metrics(run)[5:] if "loss" in m), "skipped or inf steps"
    return run, summary


def check_train(c: Check, out: Path, models: dict[str, str]) -> dict[str, Path]:
    variants = {
        "lora-bf16": ["train.precision=bf16"],
        "lora-fp16": ["train.precision=fp16"],
        "lora-fp16-bias": ["train.precision=fp16", "lora.bias=all"],
        "qlora-bf16": ["train.precision=bf16", "quant.bits=4"],
        "qlora-fp16": ["train.precision=fp16", "quant.bits=4", "quant.compute_dtype=fp16"],
    }
    runs = {}
    for model_name, model in models.items():
        for variant, overrides in variants.items():
            name = f"train-{model_name}-{variant}"
            try:
                run, s = trained(c, out, name, model, *overrides)
                runs[name] = run
                c.record(name, True, f"val {s['base_val_loss']:.3f} -> {s['final_val_loss']:.3f}, {s['tokens_per_s']:,.0f} tok/s, "
                         f"peak {s['peak_mem_gb']:.2f} GB, precision {s['precision']}")
            except Exception as exc:  # noqa: BLE001 (each check reports and the next runs)
                c.record(name, False, str(exc))
    return runs


def check_inference(c: Check, out: Path, run: Path) -> None:
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from hpclora.results.generate import Sampling, answer, load_run

    model, tokenizer, cfg = load_run(run)
    devices = {p.device.type for p in model.parameters()}
    assert devices == {"cuda"}, f"the model is on {devices}"
    torch.cuda.synchronize()
    start = time.perf_counter()
    text = answer(model, tokenizer, cfg.data.template, "日本で一番長い川は何ですか？", Sampling(max_new_tokens=64))
    torch.cuda.synchronize()
    rate = len(tokenizer(text)["input_ids"]) / (time.perf_counter() - start)
    c.record("infer-generate", True, f"on cuda, {rate:.0f} tokens/s greedy: {text[:60]!r}")
    done = c.hpclora("eval", str(run), "--n", "2", "--max-new-tokens", "16", name="infer-eval")
    c.record("infer-eval", True, done.stdout.strip().splitlines()[1] if len(done.stdout.splitlines()) > 1 else done.stdout.strip())
    chat = subprocess.run([sys.executable, "-m", "hpclora", "chat", str(run), "--max-new-tokens", "16"], input="Hello\n/exit\n",
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert chat.returncode == 0, chat.stderr[-600:]
    c.record("infer-chat", True, f"answered {chat.stdout.strip()[-60:]!r}")
    merged = out / "merged"
    c.hpclora("merge", str(run), "--out", str(merged), "--dtype", "fp32", name="infer-merge")
    from transformers import AutoModelForCausalLM

    batch = tokenizer(["What is the largest planet in the solar system?"], return_tensors="pt").to("cuda")
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).to("cuda")(**batch).logits
        theirs = model.float()(**batch).logits
    c.record("infer-merge", True, f"merged vs adapter max |logit difference| {(ours - theirs).abs().max().item():.2e}")


def check_kernels(c: Check, out: Path, model: str, site_without_liger: str | None) -> None:
    def losses(name: str, *overrides: str, env: dict | None = None) -> tuple[list[float], float]:
        run = out / "runs" / name
        c.hpclora("train", str(config(out, name, model)), "--run-dir", str(run), "train.max_steps=12", "data.packing=true",
                  *overrides, name=name, env=env)
        return [m["loss"] for m in metrics(run) if "loss" in m], json.loads((run / "summary.json").read_text())["tokens_per_s"]

    for name, a, b in (("kernels-varlen", ["model.attn_implementation=sdpa_varlen"], ["model.attn_implementation=sdpa"]),):
        (la, ta), (lb, tb) = losses(f"{name}-a", *a), losses(f"{name}-b", *b)
        worst = max(abs(x - y) for x, y in zip(la, lb))
        c.record(name, worst < 2e-2, f"sdpa_varlen {ta:,.0f} tok/s, block mask {tb:,.0f} tok/s, loss differs by at most {worst:.2e}")
    if site_without_liger is not None:
        off_env = {**ENV, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), site_without_liger])}
        (lon, ton), (loff, toff) = losses("kernels-liger-on"), losses("kernels-liger-off", env=off_env)
        worst = max(abs(x - y) for x, y in zip(lon, loff))
        c.record("kernels-liger", worst < 2e-2, f"on {ton:,.0f} tok/s, off {toff:,.0f} tok/s, loss differs by at most {worst:.2e}")


def check_torchrun(c: Check, out: Path, model: str) -> None:
    import torch

    # Ranks: one per GPU (NCCL refuses two ranks on one GPU). One rank trains as a single process, whatever
    # train.distributed says, so DDP and FSDP run for real from two GPUs on; with one, the NCCL launch path runs.
    ranks = min(torch.cuda.device_count(), 2)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "-m", "hpclora", "train"]
    for name, overrides in (("torchrun-ddp", ["train.distributed=ddp"]),
                            ("torchrun-fsdp-lora", ["train.distributed=fsdp", "train.precision=bf16"]),
                            ("torchrun-fsdp-qlora", ["train.distributed=fsdp", "train.precision=bf16", "quant.bits=4"])):
        try:
            run = out / "runs" / name
            done = c.run(*torchrun, str(config(out, name, model)), "--run-dir", str(run), "train.max_steps=10", *overrides, name=name)
            world = next((line for line in done.stdout.splitlines() if line.startswith("world ")), None)
            strategy = name.split("-")[1].upper()
            ran = world is not None and f"{strategy} (" in world
            c.record(name, (run / "adapter").is_dir() and (ran or ranks == 1),
                     world or f"one GPU: torchrun over NCCL trained one rank; {strategy} needs two GPUs to run (the CPU suite "
                              "trains it over two gloo ranks)")
        except Exception as exc:  # noqa: BLE001
            c.record(name, False, str(exc))
    # TERM to torchrun and its rank at once, as slurmstepd sends it, a few steps in: one complete checkpoint, exit 0.
    name = "torchrun-term"
    run = out / "runs" / name
    env = {**ENV, "PET_SIGNALS_TO_HANDLE": "SIGINT,SIGHUP,SIGQUIT"}
    proc = subprocess.Popen([*torchrun, str(config(out, name, model)), "--run-dir", str(run), "train.max_steps=100000",
                             "train.save_every=0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    while not (run / "metrics.jsonl").exists() or len(metrics(run)) < 5:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    (out / f"{name}.log").write_text(output)
    complete = sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*") if (p / "COMPLETE").exists())
    c.record(name, proc.returncode == 0 and bool(complete) and "SIGTERM received" in output,
             f"exit {proc.returncode}, complete checkpoints {complete}")


def check_planner(c: Check, out: Path, models_root: Path) -> None:
    done = c.run(sys.executable, str(ROOT / "benchmarks" / "plan_vs_measured.py"), "gpu", str(models_root), "--gpu", "h100-80gb",
                 "--only", "default LoRA mb1 len1024", name="planner", timeout=900)
    c.record("planner", True, " | ".join(line.strip() for line in done.stdout.splitlines() if "len1024" in line)[:400])


def check_seed(c: Check) -> None:
    done = c.run(sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--steps", "6", name="seed", timeout=900)
    c.record("seed", True, " | ".join(done.stdout.strip().splitlines()[-4:])[:400])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/hpclora-gpu-check"))
    parser.add_argument("--only", nargs="*", help="run only these checks: train infer kernels torchrun planner seed")
    parser.add_argument("--site-without-liger", help="a PYTHONPATH entry with bitsandbytes but not liger-kernel (liger off)")
    args = parser.parse_args()
    import torch

    assert torch.cuda.is_available(), "no CUDA GPU: this check is for a GPU machine"
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    c = Check(out)
    wanted = set(args.only or ["train", "infer", "kernels", "torchrun", "planner", "seed"])
    shaped = out / "models" / "open-calm-1b"
    if not (shaped / "config.json").exists():
        c.run(sys.executable, str(ROOT / "benchmarks" / "shaped_model.py"), "config", "cyberagent/open-calm-1b", str(shaped), name="shape")
        c.run(sys.executable, str(ROOT / "benchmarks" / "shaped_model.py"), "weights", str(shaped), name="shape-weights")
    llama7b = out / "models" / "Llama-2-7b-hf"  # the planner check's shape (plan_vs_measured.py finds it by name)
    if "planner" in wanted and not (llama7b / "model.safetensors.index.json").exists():
        c.run(sys.executable, str(ROOT / "benchmarks" / "shaped_model.py"), "config", "meta-llama/Llama-2-7b-hf", str(llama7b), name="shape-7b")
        c.run(sys.executable, str(ROOT / "benchmarks" / "shaped_model.py"), "weights", str(llama7b), name="shape-7b-weights")
    models = {"smollm2": "smollm2-135m", "calm1b": str(shaped)}
    started = time.perf_counter()
    runs = check_train(c, out, models) if "train" in wanted else {}
    steps = [("infer", lambda: check_inference(c, out, runs.get("train-smollm2-lora-bf16") or trained(c, out, "train-smollm2-lora-bf16", "smollm2-135m")[0])),
             ("kernels", lambda: check_kernels(c, out, "smollm2-135m", args.site_without_liger)),
             ("torchrun", lambda: check_torchrun(c, out, "smollm2-135m")),
             ("planner", lambda: check_planner(c, out, out / "models")),
             ("seed", lambda: check_seed(c))]
    for name, step in steps:
        if name in wanted:
            try:
                step()
            except Exception as exc:  # noqa: BLE001
                c.record(name, False, f"{type(exc).__name__}: {exc}")
    gpu = torch.cuda.get_device_name(0)
    header = [f"# benchmarks/gpu_check.py on {gpu}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, "
              f"{(time.perf_counter() - started) / 60:.1f} min"]
    RESULT.write_text("\n".join(header + c.lines) + "\n")
    print(f"wrote {RESULT}")
    sys.exit(0 if all(line.startswith("PASS") for line in c.lines) else 1)


if __name__ == "__main__":
    main()
