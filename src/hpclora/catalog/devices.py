"""GPU types the planner knows: the built-in table of data-sheet numbers, and the user's own types in gpus.json
(written by hand, per user), e.g.
  {"a6000-48gb": {"sinfo_types": ["rtx_a6000"], "memory_gb": 48, "bf16": true, "tflops": 155}}
(tflops: the data sheet's dense fp16/bf16 peak; optional: fp32_tflops, its fp32 peak, and capability, as
nvidia-smi's compute_cap prints it), which `--gpu`, slurm.gpu_type, doctor and probe then know.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ..errors import UserError
from .state import state_dir

GPUS_FILE = "gpus.json"
GPU_EXAMPLE = '{"a6000-48gb": {"sinfo_types": ["rtx_a6000"], "memory_gb": 48, "bf16": true, "tflops": 155}}'


def user_gpus() -> dict[str, dict]:
    """The user's GPU types from gpus.json by planner name: memory_gb, bf16, tflops, context_gb and the sinfo
    types that mean it; {} without the file. A malformed file is a user error naming the entry."""
    file = state_dir() / GPUS_FILE
    if not file.is_file():
        return {}
    try:
        rows = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserError(f"{file}: not JSON ({exc}); an example: {GPU_EXAMPLE}") from None
    if not isinstance(rows, dict):
        raise UserError(f"{file}: expected an object of GPU types by name, got a JSON {type(rows).__name__}; an example: {GPU_EXAMPLE}")
    found = {}
    for name, row in rows.items():
        problem = _gpu_entry_problem(row)
        if problem:
            raise UserError(f"{file}: entry '{name}': {problem}; an example: {GPU_EXAMPLE}")
        found[name.lower()] = {"memory_gb": float(row["memory_gb"]), "bf16": row["bf16"], "tflops": float(row["tflops"]),
                               "context_gb": float(row.get("context_gb", 0.6)), "fp32_tflops": float(row.get("fp32_tflops", 0)),
                               "capability": str(row.get("capability", "")),
                               "sinfo_types": [t.lower() for t in row.get("sinfo_types", [])]}
    return found


def _gpu_entry_problem(row) -> str | None:
    """Why one gpus.json entry cannot describe a GPU, or None."""
    if not isinstance(row, dict) or not {"memory_gb", "bf16", "tflops"} <= set(row):
        return "needs memory_gb, bf16 and tflops (and may list sinfo_types)"
    for key in ("memory_gb", "tflops", "context_gb", "fp32_tflops"):
        value = row.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
            return f"{key} must be a number above 0, got {value!r}"
    if not isinstance(row["bf16"], bool):
        return f"bf16 must be true or false, got {row['bf16']!r}"
    if not re.fullmatch(r"\d+\.\d+", str(row.get("capability", "0.0"))):
        return f"capability must be the CUDA compute capability as nvidia-smi prints it (\"7.0\"), got {row['capability']!r}"
    types = row.get("sinfo_types", [])
    if not isinstance(types, list) or not all(isinstance(t, str) and t for t in types):
        return f"sinfo_types must be a list of names as sinfo prints them, got {types!r}"
    return None


@dataclass(frozen=True)
class Device:
    name: str
    memory_gb: float  # what the job can use
    bf16: bool
    tflops: float  # dense fp16/bf16 tensor-core peak (fp32 for cpu), from vendor data sheets
    context_gb: float  # CUDA context + cuBLAS/cuDNN workspaces
    fp32_tflops: float = 0.0  # fp32 peak without tensor cores (torch's default for fp32 matmuls); 0: unknown
    capability: str = ""  # CUDA compute capability ("7.0"), which decides the torch builds that have kernels for it


# Peak dense half-precision (tensor-core) and fp32 throughput per data sheet (SXM parts); `cpu` is this project's reference machine (2 cores,
# fp32 measured at 184 GFLOP/s).
DEVICES = {
    d.name: d
    for d in (
        Device("v100-16gb", 16.0, False, 125.0, 0.6, 15.7, "7.0"),
        Device("v100-32gb", 32.0, False, 125.0, 0.6, 15.7, "7.0"),
        Device("t4-16gb", 15.0, False, 65.0, 0.5, 8.1, "7.5"),
        Device("a100-40gb", 40.0, True, 312.0, 0.7, 19.5, "8.0"),
        Device("a100-80gb", 80.0, True, 312.0, 0.7, 19.5, "8.0"),
        Device("h100-80gb", 80.0, True, 989.0, 0.8, 67.0, "9.0"),
        Device("l4-24gb", 22.5, True, 121.0, 0.5, 30.3, "8.9"),
        Device("rtx3060-12gb", 12.0, True, 51.0, 0.5, 12.7, "8.6"),
        Device("cpu", 0.0, False, 0.184, 0.0, 0.184),
    )
}


def known_devices() -> dict[str, Device]:
    """The built-in GPU table and the user's own GPU types (gpus.json)."""
    user = {n: Device(n, g["memory_gb"], g["bf16"], g["tflops"], g["context_gb"], g["fp32_tflops"], g["capability"])
            for n, g in user_gpus().items()}
    return {**DEVICES, **user}


def gpu_aliases() -> dict[str, str]:
    """sinfo GPU types (lower case) that name one of the user's GPU types."""
    return {t: name for name, g in user_gpus().items() for t in g["sinfo_types"]}


def gpus_file() -> str:
    return f"{state_dir() / GPUS_FILE} (e.g. {GPU_EXAMPLE})"
