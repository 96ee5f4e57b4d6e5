"""Which floating-point precision a run uses, and why. Pure: no torch import, so the planner can use it.

bf16 where the device has it (Ampere and newer); fp16 autocast with fp32 master weights on CUDA GPUs
without bf16 (V100 = sm_70, T4 = sm_75), where bf16 either fails or is emulated slowly; fp32 on CPU,
whose bf16 matmuls are several times slower than fp32 without dedicated units.
"""

from __future__ import annotations

from ..errors import UserError


def choose_precision(requested: str, device: str, bf16_supported: bool) -> tuple[str, str]:
    """(precision, reason) for `train.precision` on a device ("cpu" or "cuda")."""
    if requested == "auto":
        if device == "cpu":
            return "fp32", "CPU: fp32 (bf16 matmuls are slower than fp32 on CPUs without bf16 units)"
        if bf16_supported:
            return "bf16", "GPU supports bf16"
        return "fp16", "GPU has no bf16 (e.g. V100, T4): fp16 autocast with fp32 master weights and loss scaling"
    if requested == "bf16" and device == "cuda" and not bf16_supported:
        raise UserError("train.precision: bf16 is not supported on this GPU (V100/T4 have no bf16): use train.precision=fp16 or auto")
    if requested == "fp16" and device == "cpu":
        raise UserError("train.precision: fp16 mixed precision needs a CUDA GPU: use train.precision=fp32 or auto on CPU")
    return requested, "set by train.precision"


def choose_compute_dtype(requested: str, precision: str) -> str:
    """bitsandbytes compute dtype: follows the training precision unless set."""
    return precision if requested == "auto" else requested


def detect_device() -> tuple[str, bool]:
    """("cuda"|"cpu", bf16 supported) for the current process; imports torch, so not for login nodes."""
    import torch

    if torch.cuda.is_available():
        return "cuda", bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return "cpu", False
