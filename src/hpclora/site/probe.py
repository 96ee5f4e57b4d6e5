"""`hpclora probe`: a short real training job on the target partition that measures what the planner can only
estimate, and keeps it (calibration.py) for `plan`, `slurm.time: auto` and `doctor`.

The job is the config's own run (its resources, container and training path) cut to a few dozen steps,
without validation, and with `run.probe` set: it then writes probe.json, what its node is (GPU, driver, CUDA
capability, whether the image's torch has kernels for it, bf16, the hub reachable or not). Its summary.json
holds tokens/s and peak memory. The login node waits for it, compares both with the plan and records them.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from ..errors import UserError
from ..rundir import PROBE_FILE, read_json

DEFAULT_STEPS = 30


def probe_overrides(steps: int) -> list[str]:
    """What turns a run into its probe: a few steps, no validation (it would count as training time), no
    checkpoints, and run.probe for probe.json."""
    if steps < 3:
        raise UserError(f"probe: --steps must be at least 3 (the first steps warm up), got {steps}")
    return [f"train.max_steps={steps}", "train.eval_every=0", "train.save_every=0", "data.val_size=0", "run.probe=true"]


def node_report(device: str) -> dict:
    """Inside the probe job: the node's accelerator as torch sees it, the driver, and the hub. Imports torch."""
    import torch

    from ..catalog import node

    found = node.facts(network=True)
    found["torch"], found["torch_cuda"] = torch.__version__, torch.version.cuda
    found["cpu_cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    found["cpu"] = cpu_model()
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability(0)
        built = torch.cuda.get_arch_list()
        found.update({
            "gpu": torch.cuda.get_device_name(0), "capability": f"{major}.{minor}", "torch_arch_list": built,
            "kernels_for_gpu": has_kernels(built, major, minor),
            "bf16": bool(torch.cuda.is_bf16_supported(including_emulation=False)),
            "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1),
        })
    return found


def has_kernels(arch_list: list[str], major: int, minor: int) -> bool:
    """Whether a torch built for `arch_list` (torch.cuda.get_arch_list()) runs on a GPU of this capability: its
    own sm_XY, an sm_XZ of the same major version below it (binary compatible), or PTX (compute_XY) of an
    older one, which the driver compiles. A V100 (7.0) has none in builds for sm_75 and up only."""
    want = major * 10 + minor
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        if not number.rstrip("a").isdigit():
            continue
        version, specific = int(number.rstrip("a")), number.endswith("a")  # sm_90a: for 9.0 only
        if kind == "sm" and (version == want or not specific and version // 10 == major and version <= want):
            return True
        if kind == "compute" and version <= want:
            return True
    return False


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def wait(job_id: str, run_dir: Path, say=print, poll_s: float = 5.0) -> str:
    """Until the job has ended; its final state. Prints each change of state."""
    from ..launch import slurm

    last = None
    while True:
        states, _ = slurm.job_states([job_id])
        state = states.get(job_id)
        now = state.state if state else "PENDING"
        if now != last:
            say(f"job {job_id}: {now}" + (f" ({state.reason})" if state and state.reason else ""))
            last = now
        if state and state.finished:
            return now
        time.sleep(poll_s)


def record(run_dir: Path, job_id: str | None):
    """Compare what the probe run measured with the plan for its own config on its device, keep it, and
    return the measurement. Raises a UserError naming the log when the run did not finish."""
    from ..plan import calibration
    from .. import config, plan

    summary, facts = read_json(run_dir / "summary.json"), read_json(run_dir / PROBE_FILE)
    if summary is None or facts is None:
        raise UserError(f"{run_dir}: the probe run has no {'summary.json' if facts else PROBE_FILE}: it did not finish; "
                        f"its log says why (`hpclora logs {job_id or run_dir}`)")
    cfg = config.load(run_dir / "config.yaml", check_files=False)
    device = device_name(cfg, facts)
    planned = plan.make_plan(cfg, device)  # the built-in estimate, uncalibrated
    measurement = calibration.Measurement(
        device=device, model=cfg.model.name, job_id=job_id, measured_on=time.strftime("%Y-%m-%d"), node=facts["host"],
        gpu=facts.get("gpu") or facts.get("cpu", ""), tokens_per_s=summary["tokens_per_s"], planned_tokens_per_s=planned.tokens_per_s,
        peak_gb=summary["peak_mem_gb"], planned_peak_gb=planned.peak_gb,
        settings=calibration.memory_settings(cfg, planned.gradient_checkpointing, planned.checkpointed_layers),
    )
    calibration.record(measurement)
    return measurement, facts


def device_name(cfg, facts: dict) -> str:
    """The planner's name for the probed device: cpu, or the card that nvidia named (family and memory)."""
    from .cluster import planner_names
    from ..plan import gpu_aliases, gpus_file, known_devices

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
    lines.append(f"speed: measured {m.tokens_per_s:,.1f} tokens/s, planned {m.planned_tokens_per_s:,.1f} (x{m.speed_ratio:.2f})")
    lines.append(f"peak memory: measured {m.peak_gb:.2f} GB, planned {m.planned_peak_gb:.2f} GB (x{m.peak_gb / m.planned_peak_gb:.2f})")
    if "gpu" in facts and not facts["kernels_for_gpu"]:
        lines.append(f"warning: this torch was built for {' '.join(facts['torch_arch_list'])}, not for capability {facts['capability']}: "
                     "use an image whose torch supports this GPU (V100 = sm_70 needs a CUDA 12.x build or older)")
    return lines
