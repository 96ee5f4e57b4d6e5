"""`hpclora probe`: a short real training job on the target partition that measures what the planner can only
estimate, and keeps it (calibration.py) for `plan`, `slurm.time: auto` and `doctor`.

The job is the config's own run (its resources, container and training path) cut to a few dozen steps,
without validation, and with `run.probe` set: it then writes probe.json, what its node is (GPU, driver, CUDA
capability, whether the image's torch has kernels for it, bf16, the hub reachable or not). Its summary.json
holds tokens/s and peak memory. The login node waits for it, compares both with the plan and records them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..catalog.devices import gpu_aliases, gpus_file, known_devices
from ..config import load, load_run_config
from ..errors import UserError
from ..plan import calibration, make_plan
from ..rundir import CONFIG_FILE, JOB_FILE, PROBE_FILE, metric_entries, read_json
from .cluster import planner_names

DEFAULT_STEPS = 30
# A measurement this many times faster or slower than the estimate (or memory this many times off) is more likely a
# busy node or a broken run than the cluster's speed: it is kept only when asked (--accept).
FAR_OFF = 3.0


def probe_overrides(steps: int) -> list[str]:
    """What turns a run into its probe: a few steps, no validation (it would count as training time), no
    checkpoints, and run.probe for probe.json."""
    if steps < 3:
        raise UserError(f"probe: --steps must be at least 3 (the first steps warm up), got {steps}")
    return [f"train.max_steps={steps}", "train.eval_every=0", "train.save_every=0", "data.val_size=0", "run.probe=true"]


def run_probe(config_path: str, overrides: list[str], steps: int, launcher_name: str, force: bool, wait: bool, say=print,
              accept: bool = False) -> int:
    """`hpclora probe CONFIG`: submit the probe run (or run it here with the local launcher), wait for it unless not
    `wait`, and record what it measured. Returns the exit code for the command line."""
    from ..launch import launchers, submit, watch

    cfg = load(config_path, [*overrides, *probe_overrides(steps)])
    cfg.run.name = f"{cfg.run.name}-probe"
    job = submit.prepare_job(cfg, force)
    for line in job.plan_lines:
        print(line, file=sys.stderr)
    entry, code = submit.launch(job, launchers.launcher(launcher_name))
    say(submit.describe_launched(entry, job))
    job_id = entry["job_id"]
    if job_id is None and code != 0:
        return code
    if job_id is not None:
        if not wait:
            say(f"when it has ended: hpclora probe --read {job.directory}")
            return 0
        states = watch.wait(str(job.directory), say=lambda s: say(f"job {job_id}: {', '.join(sorted(set(s.values())))}"
                                                                   f"{_progress(job.directory)}"),
                            poll_s=2.0, progress=lambda: _progress(job.directory))
        if set(states.values()) != {"COMPLETED"}:
            raise UserError(f"probe job {job_id} ended {', '.join(sorted(set(states.values())))}: its log says why (`hpclora logs {job_id}`)")
    return report(job.directory, job_id, say, accept)


def _progress(run_dir: Path) -> str:
    """`, step 12/30` from the probe's metrics while it trains; nothing before its first step."""
    steps = [e for e in metric_entries(run_dir / "metrics.jsonl") if "loss" in e] if (run_dir / "metrics.jsonl").is_file() else []
    return f", step {steps[-1]['step']}/{steps[-1].get('max_steps', '?')}" if steps else ""


def read_probe(run_dir: str, say=print, accept: bool = False) -> int:
    """`hpclora probe --read RUN_DIR`: record a probe run that has ended."""
    record_file = read_json(Path(run_dir) / JOB_FILE) or {}
    return report(Path(run_dir), record_file.get("job_id"), say, accept)


def forget(device: str, config_path: str | None, overrides: list[str], say=print) -> int:
    """`hpclora probe --forget DEVICE [CONFIG]`: drop the measurements of a device (of the config's model only)."""
    model = load(config_path, overrides, check_files=False).model.name if config_path else None
    gone = calibration.forget(device, model)
    if not gone:
        raise UserError(f"probe --forget: no measurement of {device}{f' for {model}' if model else ''} in {calibration.path()}")
    say(f"forgot {', '.join(gone)}: `hpclora plan` uses the built-in estimate for {'it' if len(gone) == 1 else 'them'} again")
    return 0


def report(run_dir: Path, job_id: str | None, say, accept: bool = False) -> int:
    """Say what the probe measured and keep it, unless it is far off the estimate and not `accept`ed (then 1)."""
    measurement, facts = measure(run_dir, job_id)
    for line in describe(measurement, facts):
        say(line)
    doubt = far_off(measurement)
    if doubt and not accept:
        say(f"not kept: {doubt}{busy(facts)}. Probe again on an idle node, or keep it with "
            f"`hpclora probe --read {run_dir} --accept`")
        return 1
    calibration.record(measurement)
    say(f"kept in {calibration.path()}: `hpclora plan` and slurm.time: auto now use it for {measurement.model} on {measurement.device}"
        " (`hpclora probe --forget " + measurement.device + "` drops it)")
    return 0


def far_off(m) -> str | None:
    """Why a measurement looks wrong rather than measured (FAR_OFF of the estimate), or None."""
    memory = m.peak_gb / m.planned_peak_gb if m.planned_peak_gb else 1.0
    if not 1 / FAR_OFF <= m.speed_ratio <= FAR_OFF:
        return f"the measured speed is x{m.speed_ratio:.2f} of the estimate"
    if not 1 / FAR_OFF <= memory <= FAR_OFF:
        return f"the measured peak memory is x{memory:.2f} of the estimate"
    return None


def busy(facts: dict) -> str:
    """`; the node was busy: ...` where the probe's node had other work, else nothing."""
    load_1m, cores, others = facts.get("load_1m"), facts.get("cpu_cores"), facts.get("other_jobs") or []
    parts = [f"load {load_1m} on {cores} cores"] if isinstance(load_1m, (int, float)) and cores and load_1m > 0.5 * cores else []
    parts += [f"{len(others)} other job(s) on it ({'; '.join(others[:3])})"] if others else []
    return f"; the node was busy: {', '.join(parts)}" if parts else ""


def measure(run_dir: Path, job_id: str | None):
    """Compare what the probe run measured with the plan for its own config on its device; the measurement and the
    node's facts. Raises a UserError naming the log when the run did not finish."""
    summary, facts = read_json(run_dir / "summary.json"), read_json(run_dir / PROBE_FILE)
    if summary is None or facts is None:
        raise UserError(f"{run_dir}: the probe run has no {'summary.json' if facts else PROBE_FILE}: it did not finish; "
                        f"its log says why (`hpclora logs {job_id or run_dir}`)")
    lacking = [f"summary.json: {key}" for key in ("tokens_per_s", "peak_mem_gb")
               if isinstance(summary.get(key), bool) or not isinstance(summary.get(key), (int, float))]
    lacking += [f"{PROBE_FILE}: host"] if not isinstance(facts.get("host"), str) else []
    if lacking:
        raise UserError(f"{run_dir}: the probe's records lack what it measures ({', '.join(lacking)}): were they edited or "
                        "cut short? Run the probe again")
    cfg = load_run_config(run_dir / CONFIG_FILE)
    device = device_name(cfg, facts)
    planned = make_plan(cfg, device)  # the built-in estimate, uncalibrated
    measurement = calibration.Measurement(
        device=device, model=cfg.model.name, job_id=job_id, measured_on=time.strftime("%Y-%m-%d"), node=facts["host"],
        gpu=facts.get("gpu") or facts.get("cpu", ""), tokens_per_s=summary["tokens_per_s"], planned_tokens_per_s=planned.tokens_per_s,
        peak_gb=summary["peak_mem_gb"], planned_peak_gb=planned.peak_gb,
        settings=calibration.memory_settings(cfg, planned.gradient_checkpointing, planned.checkpointed_layers),
    )
    return measurement, facts


def device_name(cfg, facts: dict) -> str:
    """The planner's name for the probed device: cpu, or the card that nvidia named (family and memory)."""
    if cfg.slurm.gpus == 0 or "gpu" not in facts:
        return "cpu"
    devices = known_devices()
    names = planner_names(cfg.slurm.gpu_type, devices, gpu_aliases()) or planner_names(facts["gpu"].replace(" ", "_"), devices)
    if not names:
        raise UserError(f"the probe ran on a {facts['gpu']}, which the planner does not know: describe it in {gpus_file()} "
                        "and record the probe again with `hpclora probe --read RUN_DIR`")
    closest = min(names, key=lambda n: abs(devices[n].memory_gb - facts["gpu_memory_gb"]))
    return closest


def describe(m, facts: dict) -> list[str]:
    """What the probe found, and how far the plan was from it."""
    lines = [f"node {facts['host']}: " + (
        f"{facts['gpu']} (capability {facts['capability']}, {facts['gpu_memory_gb']} GB), driver {facts['nvidia_driver']}, "
        f"torch {facts['torch']} CUDA {facts['torch_cuda']}: {'has' if facts['kernels_for_gpu'] else 'LACKS'} kernels for it, "
        f"bf16 {'yes' if facts['bf16'] else 'no'}" if "gpu" in facts else f"{facts['cpu']}, {facts['cpu_cores']} cores, torch {facts['torch']}")]
    lines.append(f"hub: {facts['hub']}")
    if "load_1m" in facts:
        others = facts.get("other_jobs")
        lines.append(f"node load at the start: {facts['load_1m']} on {facts['cpu_cores']} cores; other jobs on it: "
                     + ("unknown (no squeue in the job)" if others is None else "; ".join(others) or "none"))
    lines.append(f"speed: measured {m.tokens_per_s:,.1f} tokens/s, planned {m.planned_tokens_per_s:,.1f} (x{m.speed_ratio:.2f})")
    lines.append(f"peak memory: measured {m.peak_gb:.2f} GB, planned {m.planned_peak_gb:.2f} GB (x{m.peak_gb / m.planned_peak_gb:.2f})")
    if "gpu" in facts and not facts["kernels_for_gpu"]:
        lines.append(f"warning: this torch was built for {' '.join(facts['torch_arch_list'])}, not for capability {facts['capability']}: "
                     "use an image whose torch supports this GPU (V100 = sm_70 needs a CUDA 12.x build or older)")
    return lines
