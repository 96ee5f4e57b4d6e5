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
