"""Tokens per second of a run: the device's peak FLOPs times the share a LoRA fine-tune reaches, per rank, and the
share of N ranks' sum that a world of N reaches. Estimates, until `hpclora probe` measures (calibration.py).
"""

from __future__ import annotations

from ..catalog.devices import Device
from ..catalog.precision import choose_compute_dtype
from ..catalog.dims import ModelDims, parameter_counts
from ..config import RunConfig
from ..config.rules import with_kl_term
from .memory import eager_attention, recomputed_layers

# Share of peak FLOPs a LoRA fine-tune reaches (measured: H100 on a Llama-2-7B shape, 2-core CPU on
# SmolLM2-135M). Smaller GPU models use the card less well (kernel launches, element-wise work on
# activations and logits): x sqrt(hidden / 4096), and x 0.5 more for eager attention (fitted on
# OpenCALM-1b and BLOOM-560m shapes). QLoRA de-quantizes every weight twice per step.
EFFICIENCY = {"gpu": 0.25, "cpu": 0.45, "qlora": 0.75, "eager": 0.5, "preference": 0.65}
# Preference methods (TRL's trainers) reach about two thirds of that per trained token: TRL's head scores every
# position of the answers and their prompts through the whole vocabulary, with its entropy and mean-logit metrics.
# Fitted on SmolLM2-135M DPO and KTO on the CPU (111 to 173 real tokens/s where 78 to 131 were planned at 0.5,
# benchmarks/results/plan_vs_measured_dpo.txt); assumed on GPUs.
# Share of N x one rank's tokens/s that N ranks reach: (within one node, across nodes). Assumed, not
# measured here (no machine with several GPUs): DDP all-reduces only the LoRA gradients (megabytes) once
# per step and overlaps it with the backward pass; FSDP all-gathers the frozen weights in the forward and
# again in the backward pass, which inter-node links (InfiniBand, Ethernet) hide less well than NVLink.
SCALING = {"ddp": (0.95, 0.85), "fsdp": (0.85, 0.7)}
# CPU jobs: the `cpu` device's peak is this project's 2-core reference machine; a job with C cores
# (slurm.cpus_per_task) reaches (C / 2) ** CPU_CORE_EXPONENT of that, not C / 2: matmuls share the memory
# bandwidth and the element-wise work scales worse. Fitted on one report: Swallow-7B LoRA (q/v, 256
# tokens, fp32, checkpointing) on 16 cores took about 5 days for an epoch of dolly-15k-ja, where 2 cores
# plan 22 days (22 / 8 ** 0.7 = 5.1). `hpclora probe` replaces this with a measurement.
CPU_REFERENCE_CORES, CPU_CORE_EXPONENT = 2, 0.7


def cpu_speedup(cores: int) -> float:
    """How many times faster than the reference cores a CPU job with `cores` cores trains (CPU_CORE_EXPONENT)."""
    return (cores / CPU_REFERENCE_CORES) ** CPU_CORE_EXPONENT


def matmul_tflops(device: Device, cfg: RunConfig, precision: str) -> tuple[float, str]:
    """(the peak the run's matmuls can reach, in words): the tensor-core fp16/bf16 peak, or the fp32 peak where they
    run in fp32 (train.precision fp32, or QLoRA computing in fp32). torch does not use TF32 for fp32 matmuls unless
    told, so an A100 in fp32 runs at 19.5, not 156 TFLOP/s; a V100 at 15.7, not 125."""
    computes_in = choose_compute_dtype(cfg.quant.compute_dtype, precision) if cfg.quant.bits else precision
    if device.name != "cpu" and computes_in == "fp32" and device.fp32_tflops:
        return device.fp32_tflops, f"{device.fp32_tflops} TFLOP/s fp32 peak (no tensor cores in fp32)"
    return device.tflops, f"{device.tflops} TFLOP/s {'fp32' if device.name == 'cpu' else 'fp16/bf16 tensor-core'} peak"


def no_grad_forwards(cfg: RunConfig) -> int:
    """Forward passes without gradients per trained row: dpo's and kto's reference over the same rows, and kto's KL
    term, the policy and the reference over each prompt with another row's answer (none for apo_zero_unpaired)."""
    if cfg.method.name == "dpo":
        return 1
    if cfg.method.name == "kto":
        return 3 if with_kl_term(cfg.method) else 1
    return 0


def rank_tokens_per_s(cfg: RunConfig, d: ModelDims, device: Device, per_node: int, precision: str) -> tuple[float, float]:
    """(tokens/s of one rank, the efficiency it assumes) from the device's peak FLOPs: forward 2N, backward (input
    gradients only: the base is frozen) 2N, recomputation 2N more for the share of layers that recompute, 2N for each
    forward without gradients (no_grad_forwards), and causal attention on top. On CPU the node's cores are shared by its `per_node` ranks."""
    per_token = (4 + 2 * no_grad_forwards(cfg) + 2 * recomputed_layers(cfg, d) / d.layers) * parameter_counts(d)["total"]
    per_token += 3 * 2 * d.layers * d.hidden * cfg.data.max_length
    efficiency = EFFICIENCY["cpu" if device.name == "cpu" else "gpu"] * (EFFICIENCY["qlora"] if cfg.quant.bits else 1)
    efficiency *= EFFICIENCY["preference"] if cfg.method.name != "sft" else 1
    if device.name != "cpu":
        efficiency *= min(1.0, d.hidden / 4096) ** 0.5 * (EFFICIENCY["eager"] if eager_attention(d, cfg) else 1)
    peak_flops = matmul_tflops(device, cfg, precision)[0] * 1e12
    if device.name == "cpu":
        peak_flops *= cpu_speedup(cfg.slurm.cpus_per_task) / per_node
    return peak_flops * efficiency / per_token, efficiency


def scaling(strategy: str, nodes: int, world: int) -> float:
    """The share of `world` times one rank's tokens/s that the world reaches (SCALING)."""
    return 1.0 if world == 1 else SCALING[strategy][0 if nodes == 1 else 1]
