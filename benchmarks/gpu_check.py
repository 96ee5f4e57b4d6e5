"""Every path only a GPU cluster takes, run for real on one CUDA GPU, in groups that each fit one command of the GPU
machine (gpu_machine.py says what it is), and the same code on CPU as its rehearsal here.

    make gpu-carry                                        # here, once: the wheels and model configs it carries
    python3 benchmarks/gpu_check.py --carried .gpu-carry/py3.12 --group train --out "$OUT"     # there, a group a call
    make gpu-check-rehearsal                              # here: every group on CPU, tiny shapes, the machine's packages

A group's results go to OUT/gpu_check.txt as they are recorded, one line per check, flushed:
`PASS name (seconds): what it measured`, `FAIL name (seconds): why`, `SKIP name: why` (PASS only for what ran and
met its threshold). Every command's output is appended to OUT/gpu_check.log as it runs and every run's summary.json
to OUT/gpu_check-summaries.json: a call killed at its limit still returns what it did (three files, within the 8
that come back). A check that fails does not stop the others. The work (stand-in models with random weights, runs)
stays in --work: a second call on the same machine reuses the stand-ins, and every training starts fresh.

Groups, each one command (estimated from an H100's process times, 30 to 40 s a training, eval or merge; the first GPU
call measures them, each call's last line says how long it took):
- train   (~5 min)  LoRA bf16, fp16 (forced, as on a V100), fp16 with lora.bias=all; QLoRA nf4 with bf16 and with
                    fp16 compute (the V100 path); on SmolLM2-135M's shape, and LoRA fp16 and QLoRA on OpenCALM-1b's.
                    Each: exit 0, the loss falls, validation loss falls, no infinite step after the first three.
- infer   (~3 min)  generate (on the GPU, tokens/s), eval, chat and report on a LoRA and a QLoRA fp16 run; merge of
                    each against an fp32 reference (the unquantized base with the adapter), max |logit diff| < 1e-3.
- dist    (~3 min)  one-rank NCCL: init, all_reduce and broadcast as distributed.share uses them; DDP and FSDP over
                    two ranks (SKIP on one GPU: NCCL takes one rank per GPU); TERM as a job delivers it (torchrun started
                    ignoring TERM, each rank signalled by pid), exit 75 for one rank, then the resume, whose adapter is
                    compared with an uninterrupted run's.
- planner (~6 min)  the planner's peak against the measured peak for Llama-2-7B-shaped LoRA and QLoRA at 1,024
                    tokens: within 25 %.
- speed   (~3 min)  sdpa_varlen against sdpa (same losses), Liger on and off (same losses), the seed-style script
                    (benchmarks/throughput.py) against hpclora's default on the same GPU: hpclora at least as fast.
- optim   (~2 min)  quant.bits=8, the 8-bit and the paged 8-bit optimizers (bitsandbytes), judged as train's.
Measured here, the CPU rehearsal (2 cores, tiny shapes; the planner on SmolLM2-135M's full shape): train 62 s,
infer 49 s, dist 59 s, planner 150 s, speed 39 s, optim 24 s; 6.4 min in all (benchmarks/results/gpu_check_rehearsal.txt).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_machine as machine  # noqa: E402

ROOT = machine.ROOT
DATA = ROOT / "configs" / "data" / "demo-ja-en.jsonl"
GROUPS = ("train", "infer", "dist", "planner", "speed", "optim")  # in the order a session with little time runs them


class Skip(Exception):
    """A check that cannot run here, and why."""


class Stopped(BaseException):
    """The call is being ended (TERM from the command's time limit): no Exception, so that no check or group takes
    it for a failure of its own."""


def kill_tree(pid: int) -> None:
    """A command and everything it started: torchrun starts each rank in a session of its own, which killing the
    command's process group would leave running (on a GPU, holding its memory into the next check)."""
    import psutil

    try:
        command = psutil.Process(pid)
        family = [*command.children(recursive=True), command]
    except psutil.NoSuchProcess:
        return
    for process in family:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


class Check:
    """The results, the log and the summaries of one call, written into OUT as they happen."""

    def __init__(self, out: Path, work: Path, cpu: bool, site: list[str], liger: str | None, budget_s: float):
        self.out, self.work, self.cpu, self.liger, self.budget_s = out, work, cpu, liger, budget_s
        self.results, self.log, self.summaries = out / "gpu_check.txt", out / "gpu_check.log", out / "gpu_check-summaries.json"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                    "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *site, *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.started, self.counts = time.monotonic(), {"PASS": 0, "FAIL": 0, "SKIP": 0}
        self.collected = json.loads(self.summaries.read_text()) if self.summaries.exists() else {}
        self.wanted: set[str] | None = None

    def write(self, path: Path, text: str) -> None:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()

    def line(self, text: str) -> None:
        print(text, flush=True)
        self.write(self.results, text + "\n")

    def check(self, name: str, body) -> object:
        """Run one check: `body()` returns (passed, what it measured) or raises Skip; anything else it raises fails it."""
        if self.wanted is not None and name not in self.wanted:
            return None
        if time.monotonic() - self.started > self.budget_s:
            return self.record("SKIP", name, f"no time left in this call ({self.budget_s:.0f} s budget): run it again with --only {name}")
        start = time.monotonic()
        try:
            passed, text = body()
            return self.record("PASS" if passed else "FAIL", name, text, time.monotonic() - start)
        except Skip as why:
            return self.record("SKIP", name, str(why))
        except Stopped:
            self.record("FAIL", name, "stopped: the call ran out of time", time.monotonic() - start)
            raise
        except Exception as exc:  # noqa: BLE001 (each check reports and the next runs)
            return self.record("FAIL", name, f"{type(exc).__name__}: {exc}"[-900:], time.monotonic() - start)

    def record(self, status: str, name: str, text: str, seconds: float | None = None) -> None:
        self.counts[status] += 1
        took = f" ({seconds:.0f} s)" if seconds is not None else ""
        self.line(f"{status} {name}{took}: {' '.join(text.split())}")

    def start(self, *argv: str, name: str, env: dict | None = None, stdin: bool = False) -> tuple[subprocess.Popen, int]:
        """A command started, its output appended to the log as it runs: (its process, where its output begins)."""
        self.write(self.log, f"\n==== {name}: $ {' '.join(argv)}\n")
        at = self.log.stat().st_size
        with open(self.log, "a", encoding="utf-8") as fh:
            proc = subprocess.Popen(list(argv), stdout=fh, stderr=subprocess.STDOUT, env=env or self.env, text=True,
                                    stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, start_new_session=True)
        return proc, at

    def finish(self, proc: subprocess.Popen, at: int, timeout: float, stdin: str | None = None) -> str:
        """A started command's output once it has ended; killed with all it started if it outlasts `timeout` or the
        call is ended."""
        try:
            proc.communicate(stdin, timeout=timeout)
        except BaseException:
            kill_tree(proc.pid)
            proc.wait()
            raise
        with open(self.log, encoding="utf-8", errors="replace") as fh:
            fh.seek(at)
            return fh.read()

    def run(self, *argv: str, name: str, env: dict | None = None, timeout: float = 540, stdin: str | None = None) -> str:
        """A command to its end; a non-zero exit raises with the end of its output."""
        proc, at = self.start(*argv, name=name, env=env, stdin=stdin is not None)
        output = self.finish(proc, at, timeout, stdin)
        if proc.returncode != 0:
            raise AssertionError(f"exit {proc.returncode}: {output.strip()[-700:]}")
        return output

    def hpclora(self, *argv: str, name: str, **kwargs) -> str:
        return self.run(sys.executable, "-m", "hpclora", *argv, name=name, **kwargs)

    def keep_summary(self, name: str, run: Path) -> dict:
        summary = json.loads((run / "summary.json").read_text())
        self.collected[name] = {k: v for k, v in summary.items() if k != "data"}
        self.summaries.write_text(json.dumps(self.collected, indent=1))
        return summary


# ---- stand-in models and runs ----------------------------------------------------------------------------------------

def stand_in(c: Check, name: str, tiny: bool) -> Path:
    """`name`'s carried config and tokenizer with random weights made here (shaped_model.stand_in), once: a second
    call of this machine finds them. `tiny`: the same architecture shrunk to a few layers of width 64."""
    import shaped_model

    target = c.work / "models" / (f"{name}-tiny" if tiny else name)
    if not (target / shaped_model.COMPLETE).exists():
        start = time.monotonic()
        c.run(sys.executable, str(ROOT / "benchmarks" / "shaped_model.py"), "stand-in", str(machine.CARRY / "models" / name), str(target),
              *(["--tiny"] if tiny else []), name=f"weights {target.name}", timeout=900)
        weights = sum(f.stat().st_size for f in target.glob("*.safetensors"))
        c.record("PASS", f"stand-in-{target.name}", f"random weights made, {weights / 1e9:.2f} GB", time.monotonic() - start)
    return target


def config(c: Check, name: str, model: Path, **train) -> Path:
    """A run's YAML (JSON is YAML): the bundled data, short runs that log every step."""
    path = c.work / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "run": {"name": name, "output_root": str(c.work / "runs"), "seed": 1},
        "model": {"name": str(model)},
        "data": {"path": str(DATA), "format": "alpaca", "template": "alpaca", "max_length": 128 if c.cpu else 256, "val_size": 8},
        "train": {"max_steps": 8 if c.cpu else 30, "lr": 2e-3, "micro_batch_size": 4 if c.cpu else 8, "eval_every": 0, "log_every": 1,
                  "save_every": 0, "warmup_ratio": 0, **train},
        "slurm": {"gpus": 0 if c.cpu else 1},
    }))
    return path


def logged(run: Path) -> list[dict]:
    """The run's training log entries so far (none before its first step)."""
    from hpclora.rundir import metric_entries

    metrics = run / "metrics.jsonl"
    return [e for e in metric_entries(metrics) if "loss" in e] if metrics.exists() else []


def losses(run: Path) -> list[float]:
    return [e["loss"] for e in logged(run)]


def train(c: Check, name: str, model: Path, *overrides: str) -> tuple[Path, dict]:
    """`hpclora train --fresh`: the loss falls (mean of the last third below the first third's), validation loss
    falls, and no step after the first few had an infinite or missing gradient norm (fp16 loss scaling settled)."""
    run = c.work / "runs" / name
    c.hpclora("train", str(config(c, name, model)), "--run-dir", str(run), "--fresh", *overrides, name=name)
    summary = c.keep_summary(name, run)
    seen = losses(run)
    third = max(1, len(seen) // 3)
    assert sum(seen[-third:]) < sum(seen[:third]), f"the loss did not fall: {seen}"
    assert summary["final_val_loss"] < summary["base_val_loss"], f"validation loss {summary['base_val_loss']} -> {summary['final_val_loss']}"
    norms = [e.get("grad_norm") for e in logged(run)][3:]
    assert all(n is not None and n != float("inf") for n in norms), f"skipped or infinite steps: grad norms {norms}"
    return run, summary


def trained(c: Check, name: str, model: Path, *overrides: str) -> Path:
    """A finished run of this name from an earlier group of this machine, or a new one."""
    run = c.work / "runs" / name
    if (run / "summary.json").exists() and (run / "adapter").is_dir():
        return run
    return train(c, name, model, *overrides)[0]


def described(summary: dict) -> str:
    return (f"val {summary['base_val_loss']:.3f} -> {summary['final_val_loss']:.3f}, {summary['tokens_per_s']:,.0f} tok/s, "
            f"peak {summary['peak_mem_gb']:.2f} GB, precision {summary['precision']}")


# ---- the groups -------------------------------------------------------------------------------------------------------

def half(c: Check) -> str:
    """bf16 on the GPU; on CPU the rehearsal runs the same settings in fp32 where bf16 would only be slow."""
    return "fp32" if c.cpu else "bf16"


def variants(c: Check) -> dict[str, list[str]]:
    return {
        "lora-bf16": [f"train.precision={half(c)}"],
        "lora-fp16": ["train.precision=fp16"],
        "lora-fp16-bias": ["train.precision=fp16", "lora.bias=all"],
        "qlora-bf16": [f"train.precision={half(c)}", "quant.bits=4"],
        "qlora-fp16": ["train.precision=fp16", "quant.bits=4", "quant.compute_dtype=fp16", "train.gradient_checkpointing=true"],
        "int8": [f"train.precision={half(c)}", "quant.bits=8"],
        "optim-8bit": [f"train.precision={half(c)}", "train.optimizer=adamw_8bit"],
        "optim-paged": [f"train.precision={half(c)}", "quant.bits=4", "train.optimizer=paged_adamw_8bit"],
    }


def train_variants(c: Check, model_name: str, model: Path, chosen: list[str]) -> None:
    for variant in chosen:
        name = f"train-{model_name}-{variant}"
        c.check(name, lambda: (True, described(train(c, name, model, *variants(c)[variant])[1])))


def group_train(c: Check) -> None:
    smollm2 = stand_in(c, machine.SMOLLM2, c.cpu)
    train_variants(c, "smollm2", smollm2, ["lora-bf16", "lora-fp16", "lora-fp16-bias", "qlora-bf16", "qlora-fp16"])
    train_variants(c, "calm1b", stand_in(c, "open-calm-1b", c.cpu), ["lora-fp16", "qlora-bf16"])


def group_optim(c: Check) -> None:
    train_variants(c, "smollm2", stand_in(c, machine.SMOLLM2, c.cpu), ["int8", "optim-8bit", "optim-paged"])


def logits_difference(merged: Path, run: Path, model_dir: Path) -> float:
    """Largest |logit| difference between the merged model and the fp32 reference: the unquantized base, in fp32,
    with the run's adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = AutoTokenizer.from_pretrained(merged)(["What is the largest planet in the solar system?"], return_tensors="pt").to(device)
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).to(device).eval()(**batch).logits
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
        reference = PeftModel.from_pretrained(base, str(run / "adapter")).eval()(**batch).logits
    return (ours - reference).abs().max().item()


def generated(run: Path) -> str:
    import torch

    from hpclora.results.generate import Sampling, answer, load_run

    model, tokenizer, cfg = load_run(run)
    devices = {p.device.type for p in model.parameters()}
    expected = {"cpu"} if not torch.cuda.is_available() else {"cuda"}
    assert devices == expected, f"the model is on {devices}, not {expected}"
    start = time.perf_counter()
    text = answer(model, tokenizer, cfg.data.template, "日本で一番長い川は何ですか？", Sampling(max_new_tokens=32))
    rate = len(tokenizer(text)["input_ids"]) / (time.perf_counter() - start)
    del model
    return f"on {devices.pop()}, {rate:.0f} tokens/s greedy: {text[:40]!r}"


def group_infer(c: Check) -> None:
    model = stand_in(c, machine.SMOLLM2, c.cpu)
    runs = {"lora": ("train-smollm2-lora-bf16", [f"train.precision={half(c)}"]),
            "qlora-fp16": ("train-smollm2-qlora-fp16", ["train.precision=fp16", "quant.bits=4", "quant.compute_dtype=fp16"])}
    for kind, (name, overrides) in runs.items():
        ready: list[Path] = []

        def run() -> Path:
            if not ready:
                ready.append(trained(c, name, model, *overrides))
            return ready[0]

        c.check(f"infer-{kind}-generate", lambda: (True, generated(run())))
        c.check(f"infer-{kind}-eval", lambda: (True, c.hpclora("eval", str(run()), "--n", "2", "--max-new-tokens", "16",
                                                               name=f"eval {kind}").strip().splitlines()[-1]))

        def chat() -> tuple[bool, str]:
            output = c.hpclora("chat", str(run()), "--max-new-tokens", "16", name=f"chat {kind}", stdin="Hello\n/exit\n")
            return bool(output.strip()), f"answered: {output.strip()[-60:]!r}"

        c.check(f"infer-{kind}-chat", chat)

        def merge() -> tuple[bool, str]:
            merged = c.work / "merged" / kind
            shutil.rmtree(merged, ignore_errors=True)  # a rerun merges again
            c.hpclora("merge", str(run()), "--out", str(merged), "--dtype", "fp32", name=f"merge {kind}")
            worst = logits_difference(merged, run(), model)
            return worst < 1e-3, f"merged vs fp32 base + adapter: max |logit difference| {worst:.2e} (threshold 1e-3)"

        c.check(f"infer-{kind}-merge", merge)
        c.check(f"infer-{kind}-report", lambda: (True, c.hpclora("report", str(run()), name=f"report {kind}").strip().splitlines()[-1]))


SHARE_SNIPPET = """
import os, torch, torch.distributed as dist
cuda = torch.cuda.is_available()
if cuda:
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl" if cuda else "gloo")
box = [{"step": 7, "path": "runs/x"}]
dist.broadcast_object_list(box, src=0)                       # distributed.share
tensor = torch.tensor([1.5, 2.0], dtype=torch.float64, device="cuda" if cuda else "cpu")
dist.all_reduce(tensor)                                      # distributed.sum_over_ranks
world = dist.get_world_size()
assert box[0] == {"step": 7, "path": "runs/x"} and tensor.tolist() == [1.5 * world, 2.0 * world], (box, tensor)
print(f"backend {dist.get_backend()}, world {world}, broadcast {box[0]}, all_reduce {tensor.tolist()}")
dist.destroy_process_group()
"""


def torchrun(ranks: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]


def adapters_differ(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (a, b))
    assert x.keys() == y.keys(), "the adapters hold different tensors"
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


def stopped_by_term(c: Check, model: Path) -> tuple[bool, str]:
    """TERM as a job delivers it to one node's ranks: torchrun started with the stop signals ignored and told to
    leave TERM alone (protocol.IGNORE_STOPS, TORCHRUN_SIGNALS), TERM to torchrun (ignored) and to each rank by pid.
    One rank trains as a single process and ends with 75; the resumed run must equal an uninterrupted one."""
    import psutil

    from hpclora.launch.protocol import IGNORE_STOPS, TORCHRUN_SIGNALS

    steps = 60 if c.cpu else 400
    cfg = config(c, "dist-term", model, max_steps=steps)
    run, whole = c.work / "runs" / "dist-term", c.work / "runs" / "dist-term-whole"
    shutil.rmtree(run, ignore_errors=True)
    job_lines = f'{TORCHRUN_SIGNALS}\n{IGNORE_STOPS}; exec "$@"'  # the job script's own lines
    proc, at = c.start("sh", "-c", job_lines, "sh", *torchrun(1), "-m", "hpclora", "train", str(cfg), "--run-dir", str(run), name="dist-term")
    try:
        deadline = time.monotonic() + 300
        while len(losses(run)) < 3:
            assert proc.poll() is None, f"torchrun ended with {proc.returncode} before 3 steps"
            assert time.monotonic() < deadline, "no 3 steps within 300 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)  # torchrun: ignored
        for rank in psutil.Process(proc.pid).children():
            rank.send_signal(signal.SIGTERM)
    except BaseException:
        kill_tree(proc.pid)
        raise
    output = c.finish(proc, at, timeout=300)
    stopped_at = len(losses(run))
    assert stopped_at < steps, f"the run finished ({stopped_at} steps) before the stop arrived"
    assert "exitcode  : 75" in output or "exitcode: 75" in output or proc.returncode == 75, f"torchrun exit {proc.returncode}: {output[-500:]}"
    c.hpclora("train", str(cfg), "--run-dir", str(run), name="dist-term resume")
    c.hpclora("train", str(cfg), "--run-dir", str(whole), "--fresh", name="dist-term uninterrupted")
    c.keep_summary("dist-term", run)
    worst = adapters_differ(run, whole)
    limit = 0.0 if c.cpu else 1e-3
    same_steps = losses(run)[:steps] == losses(whole)[:steps] if c.cpu else len(losses(run)) == steps
    return worst <= limit and same_steps, (f"stopped at step {stopped_at}/{steps} (rank exit 75, torchrun {proc.returncode}), resumed to "
                                           f"{len(losses(run))} logged steps; adapter vs uninterrupted max |diff| {worst:.2e} "
                                           f"(threshold {limit:g}{'' if c.cpu else ', GPU kernels are not bit-reproducible'})")


def group_dist(c: Check) -> None:
    import torch

    model = stand_in(c, machine.SMOLLM2, True)  # the paths, not the size, are what this group checks

    def share() -> tuple[bool, str]:
        script = c.work / "share.py"
        script.write_text(SHARE_SNIPPET)
        output = c.run(*torchrun(1), str(script), name="dist-share", timeout=180)
        return True, next(line for line in output.splitlines() if line.startswith("backend"))

    c.check("dist-share", share)
    ranks = 2 if c.cpu else torch.cuda.device_count()
    for strategy in ("ddp", "fsdp"):
        name = f"dist-{strategy}"

        def trained_ranks() -> tuple[bool, str]:
            if ranks < 2:
                raise Skip(f"one GPU: NCCL takes one rank per GPU, so {strategy.upper()} needs two (the CPU suite trains it "
                           "over two gloo ranks)")
            run = c.work / "runs" / name
            output = c.run(*torchrun(2), "-m", "hpclora", "train", str(config(c, name, model)), "--run-dir", str(run), "--fresh",
                           f"train.distributed={strategy}", f"train.precision={half(c)}", *(["train.cpu_ranks=2"] if c.cpu else []), name=name)
            world = next((line for line in output.splitlines() if line.startswith("world ")), "")
            return f"{strategy.upper()} (" in world and (run / "adapter").is_dir(), world or "no world line"

        c.check(name, trained_ranks)
    c.check("dist-term", lambda: stopped_by_term(c, model))


# Peak RSS on CPU is glibc's as much as the training's: freed blocks below its (moving) mmap threshold stay in the
# heap. Identical 1-step runs of the setting below peaked at 6.7, 6.9 and 10.2 GB, and at 2.3 GB with
# MALLOC_MMAP_THRESHOLD_=1048576 (benchmarks/cpu_allocator.py). The rehearsal runs the planner check's code; the 25 %
# is judged on the GPU, where PyTorch's own allocator reports what it reserved.
CPU_RSS_NOISE = "not judged on CPU: glibc keeps freed memory, and identical runs peak 6.7 to 10.2 GB"


def group_planner(c: Check) -> None:
    import plan_vs_measured as pvm

    name = machine.SMOLLM2 if c.cpu else "Llama-2-7b-hf"  # CPU: the planner's CPU model on a real shape, as in its calibration
    model = stand_in(c, name, False)
    data = c.work / "long.jsonl"
    pvm.long_rows(data)
    yaml = c.work / "configs" / "planner.yaml"
    yaml.parent.mkdir(parents=True, exist_ok=True)
    yaml.write_text(pvm.base_yaml(str(model), data, "alpaca", False, 0 if c.cpu else 1))
    device = "cpu" if c.cpu else "h100-80gb"  # an H200 plans the same peak (what differs is what fits)
    # GPU: LoRA and QLoRA at micro-batch 1, 1,024 tokens. CPU: the region the CPU terms were fitted on.
    shape = ["train.micro_batch_size=4", "train.gradient_checkpointing=true"] if c.cpu else \
        ["train.micro_batch_size=1", "train.gradient_checkpointing=false"]
    for kind, overrides in (("lora", []), ("qlora", ["quant.bits=4"])):
        setting = pvm.Setting(f"{kind} mb{shape[0][-1]} len1024{' ckpt' if c.cpu else ''}", [*shape, "data.max_length=1024", *overrides])

        def measured() -> tuple[bool, str]:
            planned = pvm.predicted(yaml, setting, device)["predicted_gb"]
            run = c.work / "runs" / f"planner-{kind}"
            c.hpclora("train", str(yaml), "--run-dir", str(run), "--fresh", *setting.overrides, "train.max_steps=2", name=f"planner {kind}",
                      timeout=900)
            peak = c.keep_summary(f"planner-{kind}", run)["peak_mem_gb"]
            error = (planned - peak) / peak
            said = f"{name} {setting.name} on {device}: planned {planned:.2f} GB, measured {peak:.2f} GB ({error:+.0%})"
            if c.cpu:  # the path ran; its number is not judged (CPU_RSS_NOISE)
                return True, f"{said}; {CPU_RSS_NOISE}"
            return abs(error) <= 0.25, f"{said}, threshold 25 %"

        c.check(f"planner-{kind}", measured)


def group_speed(c: Check) -> None:
    model = stand_in(c, machine.SMOLLM2, c.cpu)

    def same_losses(name: str, a: list[str], b: list[str], env_a: dict | None = None) -> tuple[bool, str]:
        steps = [f"train.max_steps={6 if c.cpu else 12}", "data.packing=true", f"train.precision={half(c)}"]
        first, second = c.work / "runs" / f"{name}-a", c.work / "runs" / f"{name}-b"
        c.hpclora("train", str(config(c, f"{name}-a", model)), "--run-dir", str(first), "--fresh", *steps, *a, name=f"{name} a", env=env_a)
        c.hpclora("train", str(config(c, f"{name}-b", model)), "--run-dir", str(second), "--fresh", *steps, *b, name=f"{name} b")
        worst = max(abs(x - y) for x, y in zip(losses(first), losses(second)))
        speeds = [c.keep_summary(f"{name}-{s}", r)["tokens_per_s"] for s, r in (("a", first), ("b", second))]
        return worst < 2e-2, f"{speeds[0]:,.0f} vs {speeds[1]:,.0f} tok/s, losses differ by at most {worst:.2e} (threshold 2e-2)"

    c.check("speed-varlen", lambda: same_losses("speed-varlen", ["model.attn_implementation=sdpa_varlen"], ["model.attn_implementation=sdpa"]))

    def liger() -> tuple[bool, str]:
        if c.cpu:
            raise Skip("Liger's kernels are Triton GPU kernels: nothing to compare on CPU")
        if c.liger is None:
            raise Skip("no liger-kernel carried (.gpu-carry/py3.12/liger)")
        return same_losses("speed-liger", [], [], env_a={**c.env, "PYTHONPATH": os.pathsep.join([c.env["PYTHONPATH"], c.liger])})

    c.check("speed-liger", liger)

    def seed() -> tuple[bool, str]:
        rows = c.work / "seed-rows.jsonl"
        with open(rows, "w", encoding="utf-8") as fh:
            for row in map(json.loads, DATA.read_text(encoding="utf-8").splitlines()):
                fh.write(json.dumps({"human": row["instruction"], "gpt": row["output"]}, ensure_ascii=False) + "\n")
        output = c.run(sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--steps", "4" if c.cpu else "8", "--exchanges", str(rows),
                       "--only", "seed-style script", "hpclora default", name="speed-seed", env={**c.env, "BENCH_MODEL_DIR": str(model)})
        table = [line for line in output.splitlines() if line.startswith(("seed-style script", "hpclora default"))]
        speeds = {line.split()[0]: float(line.split()[-6].replace(",", "")) for line in table}
        assert len(speeds) == 2, f"both variants must run: {table}"
        ratio = speeds["hpclora"] / speeds["seed-style"]
        return ratio >= 1.0, f"hpclora default {speeds['hpclora']:,.0f} tok/s, seed-style script {speeds['seed-style']:,.0f} tok/s: x{ratio:.2f} (budget: at least x1.00)"

    c.check("speed-seed", seed)


# ---- the call ---------------------------------------------------------------------------------------------------------

def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def installed(carried: Path, work: Path) -> dict[str, str]:
    """The carried wheels installed once into work/site, liger-kernel into work/site-liger: {folder: PYTHONPATH
    entry}, to go in front of the image's own packages (the carried peft before its peft). Liger is on the path of
    its own check alone: hpclora uses it wherever it is importable, and every other check runs the plain path."""
    site = {}
    for folder, target in (("wheels", work / "site"), ("liger", work / "site-liger")):
        wheels = sorted(str(w) for w in (carried / folder).glob("*.whl"))
        if not wheels:
            continue
        stamp = target / ".carried"
        if not stamp.exists() or stamp.read_text() != "\n".join(Path(w).name for w in wheels):
            shutil.rmtree(target, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile", "--target", str(target),
                            *wheels], check=True)
            stamp.write_text("\n".join(Path(w).name for w in wheels))
        site[folder] = str(target)
    return site


def versions() -> str:
    names = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "huggingface_hub", "liger-kernel")
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} absent")
    return ", ".join(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", nargs="+", choices=GROUPS, default=list(GROUPS), help="the groups to run (one per GPU call)")
    parser.add_argument("--only", nargs="+", help="only these checks (names as the results file gives them)")
    parser.add_argument("--out", type=Path, required=True, help="where results, log and summaries go as they are written ($OUT)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hpclora-gpu-check"), help="stand-in models and runs (kept for reruns)")
    parser.add_argument("--carried", type=Path, help="the carried folder (.gpu-carry/py3.12): its wheels are installed under --work")
    parser.add_argument("--cpu", action="store_true", help="the rehearsal: every group's code on CPU, tiny shapes")
    parser.add_argument("--budget", type=float, default=480, help="seconds after which no further check starts (a call has 600)")
    args = parser.parse_args()
    out, work = args.out.resolve(), args.work.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    site = installed(args.carried.resolve(), work) if args.carried else {}
    sys.path[:0] = [str(ROOT / "src"), *site.values()]  # liger too: the header names its version
    c = Check(out, work, args.cpu, [site["wheels"]] if "wheels" in site else [], site.get("liger"), args.budget)
    c.wanted = set(args.only) if args.only else None

    def stop(signum, frame):
        raise Stopped()

    signal.signal(signal.SIGTERM, stop)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this check is for a GPU machine (--cpu rehearses it)")
    c.line(f"# {' '.join(args.group)}{' (CPU rehearsal)' if args.cpu else ''} on {gpu_name()}, Python {platform.python_version()}, "
           f"{versions()}, {time.strftime('%Y-%m-%d %H:%M')}")
    try:
        for group in args.group:
            try:
                globals()[f"group_{group}"](c)
            except Exception as exc:  # noqa: BLE001 (a stand-in model that cannot be made ends its group, not the call)
                c.record("FAIL", group, f"the group stopped: {type(exc).__name__}: {exc}"[-900:])
    except Stopped:
        pass
    finally:
        c.line(f"# {' '.join(args.group)}: {(time.monotonic() - c.started) / 60:.1f} min, "
               + ", ".join(f"{n} {status}" for status, n in c.counts.items()))
    sys.exit(1 if c.counts["FAIL"] else 0)


if __name__ == "__main__":
    main()
