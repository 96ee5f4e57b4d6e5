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

from hpclora.catalog.torch_builds import has_kernels

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
    job_id = re.search(r"submitted run as job (\d+)", done.stdout).group(1)
    run_dir = Path(re.search(r"run directory: (\S+)", done.stdout).group(1))
    assert f"job {job_id}: COMPLETED, step 4/4" in done.stdout  # the wait says the probe's step with its state
    assert "node load at the start: " in done.stdout and "other jobs on it: " in done.stdout
    if done.returncode == 1:  # this machine's speed is far off the estimate for so tiny a model: kept only when asked
        assert "not kept: the measured " in done.stdout and not (tmp_path / "state" / "calibration.json").exists()
        done = hpclora("probe", "--read", run_dir, "--accept", env=env)
    assert done.returncode == 0 and "kept in " in done.stdout, done.stdout + done.stderr
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


def test_a_measurement_far_off_the_estimate_is_refused_with_what_the_node_was_doing_and_forget_drops_one(tmp_path, monkeypatch, cli):
    from hpclora.plan import calibration
    from hpclora.site.probe import busy, far_off

    monkeypatch.setenv("HPCLORA_STATE_DIR", str(tmp_path / "state"))

    def measured(tokens_per_s: float, peak_gb: float, device: str = "cpu", model: str = "m") -> calibration.Measurement:
        return calibration.Measurement(device=device, model=model, job_id="66", measured_on="2026-12-01", node="n1", gpu="",
                                       tokens_per_s=tokens_per_s, planned_tokens_per_s=100.0, peak_gb=peak_gb,
                                       planned_peak_gb=4.0, settings={})

    assert far_off(measured(100 * 0.15, 4.0)) == "the measured speed is x0.15 of the estimate"  # a loaded node
    assert far_off(measured(100.0, 13.0)) == "the measured peak memory is x3.25 of the estimate"
    assert far_off(measured(100 / 2.9, 4.0 * 2.9)) is None
    assert busy({"load_1m": 7.9, "cpu_cores": 8, "other_jobs": ["61: 6 CPUs, gpu:v100:2"]}) == (
        "; the node was busy: load 7.9 on 8 cores, 1 other job(s) on it (61: 6 CPUs, gpu:v100:2)")
    assert busy({"load_1m": 0.2, "cpu_cores": 8, "other_jobs": []}) == ""

    for m in (measured(90.0, 4.0), measured(80.0, 4.0, model="other"), measured(50.0, 8.0, device="v100-16gb")):
        calibration.record(m)
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  name: other\ndata:\n  path: owner/dataset\n")
    done = cli("probe", "--forget", "cpu", config)
    assert done.returncode == 0 and done.stdout.startswith("forgot cpu|other: ") and sorted(calibration.load()) == ["cpu|m", "v100-16gb|m"]
    assert cli("probe", "--forget", "cpu").stdout.startswith("forgot cpu|m: ") and sorted(calibration.load()) == ["v100-16gb|m"]
    again = cli("probe", "--forget", "cpu")
    assert again.returncode == 2 and "no measurement of cpu" in again.stderr
