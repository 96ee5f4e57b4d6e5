"""What `submit`, `sweep` and `probe` learn from the planner before anything is queued: refusals, and the `auto`
settings it decides for the job (written into the run's config.yaml)."""

from __future__ import annotations

from ..config import RunConfig
from ..config.slurm_syntax import preempt_grace_problem, slurm_seconds
from ..errors import ConfigError, UserError
from .format import fit_advice
from .make import make_plan


def check_before_submit(cfgs: list[RunConfig], force: bool, whole_node_gb: float | None = None) -> list[str]:
    """What `submit` and `sweep` learn from the planner: refuse a run that does not fit (unless forced),
    fill `slurm.time: auto` (the longest trial's estimate) and `train.distributed: auto` (the strategy it
    chose), and return lines to print. `whole_node_gb`: a node's memory, for CPU jobs of slurm.mem=0 (all of it),
    where the caller could ask Slurm."""
    lines, times = [], []
    for i, cfg in enumerate(cfgs):
        label = f"trial {i}: " if len(cfgs) > 1 else ""
        try:
            p = make_plan(cfg, calibrated=True, capacity_gb=whole_node_gb)
        except ConfigError:  # the config cannot train this model (data.packing on BLOOM)
            raise
        except UserError as exc:
            if cfg.slurm.time == "auto":
                raise UserError(f"slurm.time: auto needs a plan, and there is none: {exc}") from None
            lines.append(f"warning: {label}no memory check ({exc})")
            continue
        if p.strategy_problem:
            raise UserError(f"train.distributed: {label}{p.strategy_problem}")
        if not p.fits and not force:
            fix = fit_advice(p)
            raise UserError(
                f"{label}predicted peak {p.peak_gb:.1f} GB does not fit in {p.capacity_gb:.1f} GB on {p.device} "
                f"(`hpclora plan` shows the breakdown): try {fix}, or pass --force"
            )
        if cfg.slurm.time == "auto":
            if p.recommended["time"] is None:
                raise UserError("slurm.time: auto needs the number of steps: set train.max_steps, or use a local data file")
            times.append(p.recommended["time"])
        # The job trains with what the planner chose, which its config.yaml records, and says why (run.decided).
        cfg.run.decided = {}
        if cfg.train.distributed == "auto" and p.world_size > 1:
            cfg.train.distributed = p.strategy
            cfg.run.decided["train.distributed"] = f"auto, decided at submit for {p.device}: {p.strategy_reason}"
        if cfg.train.gradient_checkpointing == "auto":
            cfg.train.gradient_checkpointing, cfg.train.checkpointed_layers = p.gradient_checkpointing, p.checkpointed_layers
            cfg.run.decided["train.gradient_checkpointing"] = (f"auto, decided at submit for {p.device}: "
                                                               f"{p.checkpointing_reason.removeprefix('auto: ')}")
        if cfg.data.packing == "auto":
            cfg.data.packing = p.packing
            cfg.run.decided["data.packing"] = f"auto, decided at submit: {p.packing_reason}"
        world = f" per rank, {p.world_size} ranks with {p.strategy.upper()} ({p.strategy_reason})" if p.world_size > 1 else ""
        lines.append(f"plan: {label}peak {p.peak_gb:.1f} of {p.capacity_gb:.1f} GB on {p.device}{world}, {p.precision}, "
                     f"gradient checkpointing {'on' if p.gradient_checkpointing else 'off'}" + ("" if p.fits else " (DOES NOT FIT: forced)"))
    if times:
        longest = max(times, key=slurm_seconds)
        for cfg in cfgs:
            cfg.slurm.time = longest
            grace = preempt_grace_problem(cfg.train.preempt_grace_s, longest)
            if grace:
                raise UserError(f"train.preempt_grace_s: {grace}")
        lines.append(f"plan: slurm.time auto -> {longest} (estimate x 1.3)")
    return lines
