"""`hpclora probe`: a short real training job on the test Slurm's CPU partition measures tokens/s and peak
memory, keeps them in the per-user calibration file, and `plan`, `slurm.time: auto` and `doctor` then use
them and say so. What a GPU node reports (capability, kernels, bf16) cannot be produced here: only the rule
that judges the image's kernels is tested, on the arch lists real torch builds print."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hpclora.job.node_report import has_kernels

from conftest import require_slurm, tiny_run_yaml


@pytest.mark.parametrize("arch_list, capability, expected", [
    (["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"], (7, 0), True),  # CUDA 12.1 wheels on a V100
    (["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"], (7, 0), False),  # a recent build without sm_70
    (["sm_80", "sm_86", "sm_90"], (8, 9), True),  # L4 (8.9) runs sm_86 binaries (same major version)
    (["sm_80", "sm_90a"], (9, 0), True),
    (["sm_90a"], (10, 0), False),
    (["sm_75", "compute_70"], (7, 0), True),  # PTX the driver compiles
])
def test_whether_a_torch_build_has_kernels_for_a_gpu(arch_list, capability, expected):
    assert has_kernels(arch_list, *capability) is expected


def hpclora(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpclora", *map(str, args)], env=env, capture_output=True, text=True, timeout=600)


def test_a_probe_job_measures_and_plan_and_time_auto_use_the_measurement(tmp_path, tiny_llama_dir):
    require_slurm()
    env = {**os.environ, "HPCLORA_STATE_DIR": str(tmp_path / "state")}
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir, slurm={"time": "auto", "cpus_per_task": 2})
    before = json.loads(hpclora("plan", cfg, "--json", env=env).stdout)
    assert before["tokens_per_s_note"].startswith("estimate")

    done = hpclora("probe", cfg, "--steps", 4, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = re.search(r"submitted run as job (\d+)", done.stdout).group(1)
    run_dir = Path(re.search(r"run directory: (\S+)", done.stdout).group(1))
    assert run_dir.name.startswith("tiny-probe-")
    measured = re.search(r"speed: measured ([\d.]+) tokens/s planned ([\d.]+)", done.stdout.replace(",", ""))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and float(measured.group(1)) == summary["tokens_per_s"]
    assert float(measured.group(2)) == before["tokens_per_s"]  # the same plan, uncalibrated
    facts = json.loads((run_dir / "probe.json").read_text())
    assert facts["cpu_cores"] >= 1 and facts["host"] and isinstance(facts["hub_reachable"], bool)

    calibration = json.loads((tmp_path / "state" / "calibration.json").read_text())
    kept = calibration[f"cpu|{tiny_llama_dir}"]
    assert (kept["job_id"], kept["tokens_per_s"], kept["peak_gb"]) == (job_id, summary["tokens_per_s"], summary["peak_mem_gb"])

    after = json.loads(hpclora("plan", cfg, "--json", env=env).stdout)
    assert after["tokens_per_s_note"].startswith(f"measured by probe job {job_id} on ")
    assert after["tokens_per_s"] == pytest.approx(summary["tokens_per_s"], rel=0.01)  # the probe's own settings
    assert after["peak_gb"] == summary["peak_mem_gb"] and "measured by probe job" in after["peak_note"]
    longer = json.loads(hpclora("plan", cfg, "data.max_length=32", "--json", env=env).stdout)
    assert longer["peak_note"] == ""  # other memory settings: the estimate stays

    dry = hpclora("submit", cfg, "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert f"--time={after['recommended']['time']}" in dry.stdout  # slurm.time: auto from the measured speed

    doctor = subprocess.run([sys.executable, "-m", "hpclora", "doctor", cfg], env=env, capture_output=True, text=True)
    plan_line = next(line for line in doctor.stdout.splitlines() if " config.plan " in line)
    assert f"tokens/s (measured by probe job {job_id} on " in plan_line
