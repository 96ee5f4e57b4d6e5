"""Real tokens/s and peak memory of DPO with LoRA: hpclora beside TRL's own DPO script (trl/scripts/dpo.py), side by
side in one invocation, each in a fresh process, on the same pairs, model and LoRA settings:

    the bundled bilingual pairs (configs/data/demo-pref-ja-en.jsonl, as messages so that TRL applies the chat template
    hpclora's template chat renders), SmolLM2-135M (bundled), LoRA r=8 alpha 16 dropout 0.05 on all seven
    projections, max_length 256, 4 pairs per step, lr 2e-4, beta 0.1, a new adapter (the reference: the base).

TRL's script is run as its own parser reads its command line (`make_parser().parse_args_and_config`) and its trainer
built as its `main` builds it, with a meter on the collator: once with its defaults (on a CPU that is bf16 autocast,
as its BaseConfig sets bf16 whenever fp16 is not, and gradient checkpointing), once matched to hpclora's CPU choices
(fp32, no checkpointing). Real tokens are non-padding tokens of the chosen and rejected sequences; tokens/s is timed
over the steps after the first; peak memory is the process's peak RSS (VmHWM). A CPU process's peak RSS moves by a
few hundred MB from one run of the same steps to the next (the C allocator's fragmentation), so each variant runs
--repeats times, the variants taking turns, and the medians are compared (the range beside them).

    .venv/bin/python benchmarks/preference_throughput.py [--steps 8] [--repeats 3] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAIRS = ROOT / "configs" / "data" / "demo-pref-ja-en.jsonl"
MAX_LENGTH, PAIRS_PER_STEP, LR, BETA, SEED = 256, 4, 2e-4, 0.1, 0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {
    "TRL dpo.py, its defaults": [],
    "TRL dpo.py, fp32, no checkpointing": ["--bf16", "false", "--gradient_checkpointing", "false"],
    "hpclora dpo": None,
}


def messages(row: dict) -> dict:
    """A pair as conversational rows: TRL renders them with the tokenizer's chat template."""
    return {"prompt": [{"role": "user", "content": row["prompt"]}], "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


def model_dir() -> str:
    from hpclora.job.bundled import bundled_model_dir

    return str(bundled_model_dir())


def run_trl(extra: list[str], data_dir: Path, out: str, steps: int) -> dict:
    """trl/scripts/dpo.py's own arguments and trainer, with a meter on its collator."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from throughput import Meter
    from trl import DPOTrainer, get_peft_config, get_quantization_config
    from trl.scripts.dpo import make_parser

    argv = ["--dataset_name", str(data_dir), "--model_name_or_path", model_dir(), "--output_dir", out, "--max_steps", str(steps),
            "--per_device_train_batch_size", str(PAIRS_PER_STEP), "--learning_rate", str(LR), "--beta", str(BETA),
            "--max_length", str(MAX_LENGTH), "--use_peft", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.05",
            "--lora_target_modules", *TARGETS, "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no",
            "--seed", str(SEED), "--use_cpu", "true", "--disable_tqdm", "true", *extra]
    script_args, training_args, model_args, _ = make_parser().parse_args_and_config(args=argv)
    training_args.model_init_kwargs = dict(revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code,
                                           attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)
    from datasets import load_dataset

    dataset = load_dataset(script_args.dataset_name)
    trainer = DPOTrainer(model=model_args.model_name_or_path, args=training_args, train_dataset=dataset[script_args.dataset_train_split],
                         quantization_config=get_quantization_config(model_args), peft_config=get_peft_config(model_args))
    meter = Meter(trainer.data_collator)
    trainer.data_collator = meter
    trainer.add_callback(meter.callback())
    trainer.train()
    return {**meter.result(), "precision": "bf16 autocast" if training_args.bf16 else "fp32",
            "checkpointing": bool(training_args.gradient_checkpointing)}


def run_hpclora(out: str, steps: int) -> dict:
    """`hpclora train` as a job runs it; tokens/s and peak memory from its own metrics.jsonl and summary.json."""
    config = Path(out) / "bench.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "model": {"name": "smollm2-135m"}, "method": {"name": "dpo", "beta": BETA},
        "data": {"path": str(PAIRS), "template": "chat", "max_length": MAX_LENGTH, "val_size": 0},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": TARGETS},
        "train": {"max_steps": steps, "micro_batch_size": PAIRS_PER_STEP, "lr": LR, "log_every": 1, "eval_every": 0, "save_every": 0},
        "run": {"seed": SEED}, "slurm": {"gpus": 0},
    }))
    run_dir = Path(out) / "run"
    done = subprocess.run([sys.executable, "-m", "hpclora", "train", str(config), "--run-dir", str(run_dir)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stdout + done.stderr)
    logged = [e for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in e]
    first, last = logged[0], logged[-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    checkpointing = next(line for line in done.stdout.splitlines() if line.startswith("gradient checkpointing"))
    return {"tokens_per_s": (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"]),
            "peak_gb": summary["peak_mem_gb"], "steps": len(logged), "precision": summary["precision"],
            "checkpointing": checkpointing.split(":")[0].endswith("on")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per variant; the first is warm-up")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant (medians compared)")
    parser.add_argument("--only", nargs="*", choices=VARIANTS, help="run only these variants")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        with tempfile.TemporaryDirectory() as out:
            extra = VARIANTS[args.worker]
            result = run_hpclora(out, args.steps) if extra is None else run_trl(extra, args.data, out, args.steps)
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs"
        data.mkdir()
        rows = [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines()]
        (data / "train.jsonl").write_text("".join(json.dumps(messages(r), ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        runs: dict[str, list[dict]] = {}
        for repeat in range(args.repeats):
            for name in args.only or VARIANTS:
                started = time.time()
                done = subprocess.run([sys.executable, __file__, "--worker", name, "--data", str(data), "--steps", str(args.steps)],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"{name}: failed\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}", file=sys.stderr)
                    continue
                runs.setdefault(name, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"# {name}, run {repeat + 1}: {runs[name][-1]} ({time.time() - started:.0f} s)", flush=True)
    results = {name: {**r[0], **{key: statistics.median(x[key] for x in r) for key in ("tokens_per_s", "peak_gb")},
                      "range": (min(x["peak_gb"] for x in r), max(x["peak_gb"] for x in r))} for name, r in runs.items()}

    print(f"\nSmolLM2-135M, DPO, LoRA r=8 on all projections, {PAIRS.name} ({len(rows)} pairs), max_length {MAX_LENGTH}, "
          f"{PAIRS_PER_STEP} pairs per step, {args.steps} steps each, the first not timed; device cpu; medians of {args.repeats} runs")
    ours = results.get("hpclora dpo")
    print(f"{'variant':<38} {'precision':<14} {'ckpt':>5} {'tokens/s':>9} {'peak GB':>8} {'peak range':>12} {'hpclora x speed':>16} "
          f"{'hpclora x memory':>17}")
    for name, r in results.items():
        speed = f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}" if ours else "-"
        memory = f"{ours['peak_gb'] / r['peak_gb']:.2f}" if ours else "-"
        spread = f"{r['range'][0]:.2f}-{r['range'][1]:.2f}"
        print(f"{name:<38} {r['precision']:<14} {'on' if r['checkpointing'] else 'off':>5} {r['tokens_per_s']:9.1f} {r['peak_gb']:8.2f} "
              f"{spread:>12} {speed:>16} {memory:>17}")


if __name__ == "__main__":
    main()
