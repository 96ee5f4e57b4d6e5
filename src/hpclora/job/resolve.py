"""What a run decides only once it knows the device it runs on: the device and its precision, how several ranks
share the work, and the `auto` settings a run started by hand still has (`hpclora submit` decides those for its
jobs, for the GPU or memory the job asks for; a run started by hand decides here, for what it really has).
Every decision comes from the rule the login node applies (the planner, catalog), and each is logged with why."""

from __future__ import annotations

import dataclasses
import os

from ..catalog.devices import DEVICES, Device
from ..catalog.dims import find_dims
from ..catalog.models import packing_choice
from ..catalog.precision import fsdp_problem
from ..config import RunConfig
from ..config.slurm_syntax import slurm_mem_gb
from ..errors import UserError
from ..plan import make_plan
from . import distributed


def detect_device() -> tuple[str, bool]:
    """("cuda"|"cpu", bf16 supported) for the current process."""
    import torch

    if torch.cuda.is_available():
        return "cuda", bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return "cpu", False


def this_device(device: str) -> Device:
    """The planner's description of the device this process trains on (its memory and bf16; the speed the planner
    would estimate does not matter here)."""
    import torch

    if device != "cuda":
        return DEVICES["cpu"]
    props = torch.cuda.get_device_properties(distributed.world().local_rank)
    return Device(props.name, props.total_memory / 1e9, torch.cuda.is_bf16_supported(including_emulation=False), 0.0, 0.6)


def memory_here_gb(device: str) -> float:
    """Memory this training has: its GPU's, or on CPU the job's (Slurm's --mem) or else the machine's."""
    if device == "cuda":
        return this_device(device).memory_gb
    if os.environ.get("SLURM_MEM_PER_NODE"):
        return slurm_mem_gb(os.environ["SLURM_MEM_PER_NODE"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def strategy_for(cfg: RunConfig, world: distributed.World, device: str, precision: str) -> tuple[str, str]:
    """(single, ddp or fsdp; why): train.distributed as `hpclora submit` resolved it, or for `auto` the planner's
    choice for the world torchrun started (which a hand-written job may not have in its config). FSDP only where
    the one rule allows it (catalog.precision.fsdp_problem), as the planner checked on the login node."""
    if world.size == 1:
        return "single", "one rank"
    strategy, why = cfg.train.distributed, cfg.run.decided.get("train.distributed", "train.distributed")
    if strategy == "auto":
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
        slurm = dataclasses.replace(cfg.slurm, nodes=world.size // per_node, gpus=per_node if device == "cuda" else 0)
        planned = dataclasses.replace(cfg, slurm=slurm, train=dataclasses.replace(cfg.train, cpu_ranks=per_node))
        try:
            p = make_plan(planned, device=this_device(device))
            strategy, why = p.strategy, f"auto: {p.strategy_reason}"
        except UserError as exc:
            strategy, why = "ddp", f"auto, but the planner could not plan this world ({exc}): DDP, which needs no plan"
    if strategy == "fsdp" and (problem := fsdp_problem(precision, cfg.quant.bits, cfg.train.optimizer)):
        raise UserError(f"train.distributed: {problem}")
    return strategy, why


def model_type_of(cfg: RunConfig) -> str:
    """The architecture: from the dimensions the planner finds, else from the model's own config."""
    try:
        return find_dims(cfg)[0].model_type
    except UserError:
        from transformers import AutoConfig

        from .model import from_pretrained

        return from_pretrained(AutoConfig, cfg.model.name, cfg.model).model_type


def resolve_auto(cfg: RunConfig, device: str, precision: str) -> tuple[RunConfig, bool, list[str]]:
    """The config with data.packing and train.gradient_checkpointing decided and the attention kernel chosen,
    whether the Liger kernels run, and a log line for each decision."""
    from .kernels import kernels_here

    model_type = model_type_of(cfg)
    packing, packing_why = packing_choice(cfg.data.packing, model_type, cfg.data.max_length, cfg.method.name)
    packing_why = cfg.run.decided.get("data.packing", packing_why)  # what submit decided for `auto`, and why
    checkpointing, layers = cfg.train.gradient_checkpointing, cfg.train.checkpointed_layers
    if checkpointing == "auto":
        try:
            p = make_plan(cfg, device=this_device(device), capacity_gb=memory_here_gb(device))
            checkpointing, layers, checkpointing_why = p.gradient_checkpointing, p.checkpointed_layers, p.checkpointing_reason
        except UserError as exc:
            # Unplanned, the choice that fits: on costs time, off may run out of memory after the queue wait.
            checkpointing, layers = True, None
            checkpointing_why = f"auto, but the planner could not plan this run ({exc}): on, which fits where off might not"
    elif "train.gradient_checkpointing" in cfg.run.decided:
        checkpointing_why = cfg.run.decided["train.gradient_checkpointing"]
    else:
        checkpointing_why = f"train.gradient_checkpointing={str(checkpointing).lower()}"
        if checkpointing and layers:
            checkpointing_why += f", train.checkpointed_layers={layers}"
    kernels = kernels_here(cfg.model.attn_implementation, model_type, precision, device, packed=packing)
    resolved = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, packing=packing),
                                   train=dataclasses.replace(cfg.train, gradient_checkpointing=checkpointing, checkpointed_layers=layers),
                                   model=dataclasses.replace(cfg.model, attn_implementation=kernels.attention))
    lines = [f"data: {packing_why}", f"gradient checkpointing {'on' if checkpointing else 'off'}: {checkpointing_why}", *kernels.lines]
    return resolved, kernels.liger, lines
