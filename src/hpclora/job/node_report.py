"""Inside a probe job (`run.probe`): what its node is, as torch sees it, for probe.json: the GPU, driver, CUDA
capability, whether this torch has kernels for that capability, bf16, the cores and whether the hub is reachable."""

from __future__ import annotations

import os
import platform
from pathlib import Path

def node_report(device: str) -> dict:
    """Inside the probe job: the node's accelerator as torch sees it, the driver, and the hub. Imports torch."""
    import torch

    from ..catalog import node
    from ..catalog.torch_builds import has_kernels

    found = node.facts(network=True)
    found["torch"], found["torch_cuda"] = torch.__version__, torch.version.cuda
    found["cpu_cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    found["cpu"] = cpu_model()
    found["load_1m"] = round(os.getloadavg()[0], 2)  # what else the node was doing when the probe started
    found["other_jobs"] = other_jobs_on_this_node()
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


def other_jobs_on_this_node() -> list[str] | None:
    """The other running jobs on this node, as `JOBID: N CPUs[, GRES]` (squeue); None where squeue is not at hand
    (inside a container, outside Slurm)."""
    import shutil
    import socket
    import subprocess

    if not shutil.which("squeue") or not os.environ.get("SLURM_JOB_ID"):
        return None
    try:
        done = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-w", socket.gethostname().split(".")[0], "-o", "%i|%A|%C|%b"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    mine = os.environ["SLURM_JOB_ID"]
    jobs = []
    for line in done.stdout.splitlines() if done.returncode == 0 else []:
        label, raw_id, cpus, gres = (line.split("|") + ["", "", ""])[:4]
        if raw_id != mine:
            jobs.append(f"{label}: {cpus} CPUs" + (f", {gres}" if gres and gres not in ("(null)", "N/A") else ""))
    return jobs


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
