"""Start-up time of the login-node commands, against two baselines measured in the same run:
a bare interpreter (`python -c pass`) and the import of torch + transformers + peft that these
commands must avoid. Goal: every command under 1 s.

    .venv/bin/python benchmarks/login_startup.py [--repeat 5]

Each command runs as a fresh process, as it does on a login node; the median of the repeats is shown.
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


def timed(argv: list[str], cwd: Path, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr}")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hpclora-startup-"))
    config = ROOT / "configs" / "open-calm-7b-qlora-dolly-ja.yaml"
    run_dir = work / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("")
    (work / "r1.out").write_text("step 1/2 | loss 1.0\n" * 1000)
    record = {"kind": "run", "launcher": "sbatch", "job_id": None, "name": "r1", "dir": str(run_dir), "log": str(work / "r1.out")}
    (run_dir / "job.json").write_text(json.dumps(record))

    hpclora = [sys.executable, "-m", "hpclora"]
    baselines = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "import torch, transformers, peft": [sys.executable, "-c", "import torch, transformers, peft"],
    }
    commands = {
        "validate": [*hpclora, "validate", str(config)],
        "submit --dry-run": [*hpclora, "submit", str(config), "--dry-run"],
        "sweep --dry-run (64 trials)": [
            *hpclora, "sweep", str(config), "--grid", "lora.r=4,8,16,32", "--grid", "train.lr=1e-4,2e-4,3e-4,4e-4",
            "--grid", "lora.dropout=0,0.05,0.1,0.2", "--dry-run",
        ],
        "plan --gpu v100-16gb": [*hpclora, "plan", str(config), "--gpu", "v100-16gb"],
        "status RUN_DIR": [*hpclora, "status", str(run_dir)],
        "logs RUN_DIR": [*hpclora, "logs", str(run_dir)],
    }
    bare = timed(baselines["python -c pass"], work, args.repeat)
    heavy = timed(baselines["import torch, transformers, peft"], work, max(1, args.repeat // 2))
    print(f"{'command':<38} {'median s':>9} {'vs bare python':>15} {'vs heavy import':>16}  goal < 1 s")
    print(f"{'python -c pass (baseline)':<38} {bare:>9.3f} {1:>14.1f}x {bare / heavy:>15.2f}x")
    print(f"{'import torch, transformers, peft':<38} {heavy:>9.3f} {heavy / bare:>14.1f}x {1:>15.2f}x")
    for name, argv in commands.items():
        t = timed(argv, work, args.repeat)
        print(f"{'hpclora ' + name:<38} {t:>9.3f} {t / bare:>14.1f}x {t / heavy:>15.2f}x  {'ok' if t < 1 else 'SLOW'}")


if __name__ == "__main__":
    main()
