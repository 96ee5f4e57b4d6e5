"""How much of a CPU training's peak resident memory is glibc's, not the training's: the same `hpclora train`
run several times with glibc's default (a dynamic mmap threshold, which rises as large blocks are freed, so that
later blocks of up to 32 MiB come from the heap and stay there when freed) and with a fixed threshold
(MALLOC_MMAP_THRESHOLD_, which also stops it moving). Every run's losses must be equal: the allocator changes where
tensors live, never their values.

    .venv/bin/python benchmarks/cpu_allocator.py [--repeats 3] [--steps 2]

Prints each setting's peak RSS (min / median / max over the repeats, from summary.json) and tokens/s, and their
ratios to glibc's default. The run is SmolLM2-135M's shape (random weights from the carried config: make gpu-carry)
on rows of exactly 1,024 tokens, micro-batch 4, gradient checkpointing on, fp32: the planner's CPU region.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "src")]

import gpu_machine as machine  # noqa: E402
import plan_vs_measured as pvm  # noqa: E402
from hpclora.rundir import metric_entries  # noqa: E402

SETTINGS = {
    "glibc default": {},
    "MALLOC_MMAP_THRESHOLD_=1 MiB": {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)},
    "MALLOC_MMAP_THRESHOLD_=128 KiB": {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)},
}
OVERRIDES = ["train.micro_batch_size=4", "data.max_length=1024", "train.gradient_checkpointing=true"]


def stand_in(work: Path) -> Path:
    model = work / machine.SMOLLM2
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "shaped_model.py"), "stand-in", str(machine.CARRY / "models" / machine.SMOLLM2),
                    str(model)], check=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hpclora-cpu-allocator-"))
    data = work / "long.jsonl"
    pvm.long_rows(data)
    config = work / "run.yaml"
    config.write_text(pvm.base_yaml(str(stand_in(work)), data, "alpaca", False, 0))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    rows, reference = {}, None
    for i in range(args.repeats):  # interleaved, so that a slow spell of the machine falls on every setting alike
        for j, (name, extra) in enumerate(SETTINGS.items()):
            run = work / f"run-{i}-{j}"
            subprocess.run([sys.executable, "-m", "hpclora", "train", str(config), "--run-dir", str(run), "--fresh", *OVERRIDES,
                            f"train.max_steps={args.steps}"], env={**env, **extra}, check=True, capture_output=True)
            summary = json.loads((run / "summary.json").read_text())
            losses = [e["loss"] for e in metric_entries(run / "metrics.jsonl") if "loss" in e]
            assert reference is None or losses == reference, f"{name}: losses {losses} differ from {reference}"
            reference = losses
            rows.setdefault(name, []).append((summary["peak_mem_gb"], summary["tokens_per_s"]))
            print(f"# {name} #{i + 1}: peak {summary['peak_mem_gb']:.2f} GB, {summary['tokens_per_s']:.0f} tok/s", flush=True)
    base_peak = statistics.median(p for p, _ in rows["glibc default"])
    base_speed = statistics.median(s for _, s in rows["glibc default"])
    print(f"\nSmolLM2-135M shape, {' '.join(OVERRIDES)}, {args.steps} steps, {args.repeats} runs each; losses equal in every run")
    print(f"{'setting':<32} {'peak GB min/median/max':>24} {'x peak':>7} {'tok/s':>7} {'x speed':>8}")
    for name, seen in rows.items():
        peaks = sorted(p for p, _ in seen)
        speed = statistics.median(s for _, s in seen)
        print(f"{name:<32} {peaks[0]:>7.2f} /{statistics.median(peaks):>6.2f} /{peaks[-1]:>6.2f} {statistics.median(peaks) / base_peak:>7.2f} "
              f"{speed:>7.0f} {speed / base_speed:>8.2f}")


if __name__ == "__main__":
    main()
