"""Which floating-point precision a run uses, and why, and what FSDP needs of the run. Pure: no torch import,
so that the config checks, the planner and the job decide by the same rules.

bf16 where the device has it (Ampere and newer); fp16 autocast with fp32 master weights on CUDA GPUs
without bf16 (V100 = sm_70, T4 = sm_75), where bf16 either fails or is emulated slowly; fp32 on CPU,
whose bf16 matmuls are several times slower than fp32 without dedicated units.
"""

from __future__ import annotations

from ..errors import ConfigError

# bitsandbytes' optimizers (8-bit and paged): they keep their states per parameter and cannot step FSDP2's sharded
# DTensor parameters (bitsandbytes issue 1633).
BITSANDBYTES_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


def choose_precision(requested: str, device: str, bf16_supported: bool) -> tuple[str, str]:
    """(precision, reason) for `train.precision` on a device ("cpu" or "cuda")."""
    if requested == "auto":
        if device == "cpu":
            return "fp32", "CPU: fp32 (bf16 matmuls are slower than fp32 on CPUs without bf16 units)"
        if bf16_supported:
            return "bf16", "GPU supports bf16"
        return "fp16", "GPU has no bf16 (e.g. V100, T4): fp16 autocast with fp32 master weights and loss scaling"
    if requested == "bf16" and device == "cuda" and not bf16_supported:
        raise ConfigError([("train.precision", "bf16 is not supported on this GPU (V100/T4 have no bf16): use train.precision=fp16 or auto")])
    if requested == "fp16" and device == "cpu":
        return "fp16", ("set by train.precision; on this CPU the V100/T4 path runs for real (fp16 weights and autocast, "
                        "fp32 LoRA weights, loss scaling), several times slower than fp32: for trying it before the queue")
    return requested, "set by train.precision"


def choose_compute_dtype(requested: str, precision: str) -> str:
    """bitsandbytes compute dtype: follows the training precision unless set."""
    return precision if requested == "auto" else requested


def fsdp_problem(precision: str | None, quant_bits: int | None, optimizer: str) -> str | None:
    """Why FSDP cannot train this run, with what to do instead; None where it can. The one rule, used by the config
    checks (`precision` None: not known yet, `auto`), the planner's choice and the job. FSDP here trains in bf16
    (GPUs since the A100) or fp32, with 4-bit weights in bf16 only (stored and computed in the dtype FSDP gathers
    in), and cannot shard 8-bit weights nor step with bitsandbytes' 8-bit or paged optimizers. CPU ranks can run
    it too, to try the path before the queue (the planner never chooses it for them: DDP is faster there)."""
    instead = "use train.distributed=ddp (with quant.bits=4 where a replica does not fit a GPU)"
    if quant_bits == 8:
        return "8-bit weights cannot be sharded by FSDP: use quant.bits=4 (stored in bf16 for FSDP) or train.distributed=ddp"
    if precision == "fp16":
        return (f"FSDP trains in bf16 or fp32, not fp16 (V100 and T4 have no bf16): {instead}, or train.precision=bf16 "
                "on an A100/H100/L4")
    if quant_bits == 4 and precision not in (None, "bf16"):
        return f"FSDP shards 4-bit weights stored in bf16 and computes in bf16, not {precision}: train.precision=bf16, or {instead}"
    if optimizer in BITSANDBYTES_OPTIMIZERS:
        return (f"train.optimizer={optimizer} (bitsandbytes) cannot step FSDP's sharded parameters: use train.optimizer=adamw_torch "
                "with FSDP, or train.distributed=ddp")
    return None


def trained_bias_problem(bias: str, quant_bits: int | None, compute_dtype: str, precision: str | None) -> str | None:
    """Why lora.bias cannot train beside quantized weights in this precision (None: not known yet, `auto`), else
    None. bitsandbytes' layers cast their bias to the dtype they compute in on every forward (4-bit: the compute
    dtype; 8-bit: its input's); in fp16 those biases cannot train under fp16 loss scaling."""
    if bias == "none" or not quant_bits or precision is None:
        return None
    compute = choose_compute_dtype(compute_dtype, precision) if quant_bits == 4 else precision
    if compute != "fp16":
        return None
    instead = "quant.compute_dtype=fp32" if quant_bits == 4 else "quant.bits=4 with quant.compute_dtype=fp32"
    return (f"lora.bias={bias} with quant.bits={quant_bits} in fp16: bitsandbytes casts the biases it trains to fp16 on "
            f"every step, and fp16 loss scaling cannot train fp16 parameters; use lora.bias=none, or {instead}")


def cpu_job_notes(quant_bits: int | None, optimizer: str, distributed: str) -> list[str]:
    """What settings made for GPUs mean in a CPU job (slurm.gpus: 0), where they run but do something else: said by
    validate, submit and the job's log rather than accepted in silence."""
    notes = []
    if quant_bits:
        notes.append(f"note: quant.bits={quant_bits} in a CPU job: bitsandbytes quantizes and computes on the CPU, slower than "
                     "LoRA on the unquantized base; QLoRA saves GPU memory, which a CPU job does not use")
    if optimizer in BITSANDBYTES_OPTIMIZERS:
        paged = "paging moves optimizer states between GPU and host memory, which a CPU job does not have; " if "paged" in optimizer else ""
        notes.append(f"note: train.optimizer={optimizer} in a CPU job: {paged}bitsandbytes steps it on the CPU, where "
                     "adamw_torch is as small for LoRA's few parameters and faster")
    if distributed == "fsdp":
        notes.append("note: train.distributed=fsdp in a CPU job: the ranks shard the weights over gloo, to try the FSDP path "
                     "before the queue; on CPUs DDP is faster and FSDP saves no GPU memory")
    return notes
