"""How several ranks share the work: DDP (a replica per GPU) or FSDP (weights, gradients and optimizer states
sharded), chosen for `train.distributed: auto` by what fits, and only where FSDP can train the run at all."""

from __future__ import annotations

from ..catalog.devices import Device
from ..catalog.precision import fsdp_problem
from ..config import RunConfig, world_size


def choose_strategy(cfg: RunConfig, device: Device, precision: str, smallest: dict[str, float], usable: float) -> tuple[str, str]:
    """How several ranks share the work: the configured strategy, or for `auto` DDP when a replica fits a
    GPU (at micro-batch 1 at least: `smallest` peaks), else FSDP where a shard fits and FSDP can train the run
    (catalog.precision.fsdp_problem: bf16 GPUs, no 8-bit weights or optimizers), which the job checks the same way."""
    if world_size(cfg) == 1:
        return "single", "one rank"
    if cfg.train.distributed != "auto":
        return cfg.train.distributed, "train.distributed"
    if device.name == "cpu":
        return "ddp", "CPU ranks train with DDP"
    if smallest["ddp"] <= usable:
        return "ddp", "a replica fits each GPU"
    if smallest["fsdp"] > usable:
        return "ddp", "neither a replica nor a shard fits a GPU: see the advice below"
    problem = fsdp_problem(precision, cfg.quant.bits, cfg.train.optimizer)
    if problem is None:
        return "fsdp", f"a replica does not fit a GPU; sharded over {world_size(cfg)} GPUs it does"
    return "ddp", f"a shard would fit, but {problem}" + ("; or quant.bits=4" if cfg.quant.bits is None else "")
