"""Optional fast GPU kernels, used where they are installed and fit the run; neither is a dependency.

- FlashAttention 2 (`flash-attn`, Ampere or newer, fp16/bf16): it runs variable-length on packed rows (the
  collator passes the examples' bounds), so attention costs the sum of each example's triangle instead of
  the row's square. Elsewhere (CPU, V100, T4) packed rows run sdpa once per example (varlen.py).
- The Liger kernels (`liger-kernel`): fused RMSNorm, SwiGLU and rotary embeddings for Llama-family models,
  through the Trainer's own `use_liger_kernel` switch. Their cross-entropy is left off: hpclora's loss
  already runs the output head on labelled positions only, in chunks (loss.py).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from ..errors import UserError
from .varlen import NAME as SDPA_VARLEN

# Model types the Liger kernels patch (liger_kernel.transformers.monkey_patch), that hpclora trains.
LIGER_MODEL_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"}
# Liger's loss kernels stay off: the loss is hpclora's own.
LIGER_CONFIG = {"rope": True, "swiglu": True, "rms_norm": True, "cross_entropy": False, "fused_linear_cross_entropy": False}


@dataclass(frozen=True)
class Kernels:
    attention: str  # model.attn_implementation to load with ("auto": transformers' default, sdpa or eager)
    liger: bool
    lines: tuple[str, ...]  # what the job log says about them


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def choose_kernels(attention: str, model_type: str, precision: str, gpu_capability: tuple[int, int] | None,
                   has_flash_attn: bool, has_liger: bool, packed: bool = False) -> Kernels:
    """The kernels for a run: `attention` is model.attn_implementation; `gpu_capability` None means a CPU;
    `packed`: the run's rows are packed (data.packing resolved)."""
    from ..catalog.models import EAGER_ONLY

    lines = []
    on_gpu = gpu_capability is not None
    if attention == "flash_attention_2" and (why := flash_unusable(precision, gpu_capability, has_flash_attn)):
        raise UserError(f"model.attn_implementation: flash_attention_2 cannot run here ({why}): use auto")
    if attention == "auto" and model_type not in EAGER_ONLY:
        why = flash_unusable(precision, gpu_capability, has_flash_attn)
        if why is None:
            attention = "flash_attention_2"
            lines.append("attention: FlashAttention 2 (installed; packed rows run variable-length)")
        elif packed:
            attention = SDPA_VARLEN
            lines.append(f"attention: PyTorch sdpa once per packed example ({why})")
        elif on_gpu:
            lines.append(f"attention: PyTorch sdpa ({why})")
    liger = on_gpu and has_liger and model_type in LIGER_MODEL_TYPES
    if liger:
        lines.append("kernels: Liger RMSNorm, SwiGLU and rotary embeddings (installed)")
    return Kernels(attention, liger, tuple(lines))


def flash_unusable(precision: str, gpu_capability: tuple[int, int] | None, has_flash_attn: bool) -> str | None:
    """Why FlashAttention 2 cannot run in this process, or None."""
    if gpu_capability is None:
        return "no FlashAttention on a CPU"
    if not has_flash_attn:
        return "flash-attn is not installed"
    if gpu_capability < (8, 0):
        return f"this GPU is sm_{gpu_capability[0]}{gpu_capability[1]}, FlashAttention needs sm_80+"
    if precision not in ("bf16", "fp16"):
        return f"FlashAttention needs fp16/bf16, not {precision}"
    return None


def reads_varlen_bounds(attention: str) -> bool:
    """Whether this attention kernel reads packed examples' bounds from the batch (the collator's `varlen`)."""
    return attention in ("flash_attention_2", SDPA_VARLEN)


def kernels_here(attention: str, model_type: str, precision: str, device: str, packed: bool = False) -> Kernels:
    """choose_kernels for this process's device and installed packages."""
    capability = None
    if device == "cuda":
        import torch

        capability = torch.cuda.get_device_capability()
    return choose_kernels(attention, model_type, precision, capability, installed("flash_attn"), installed("liger_kernel"), packed)
