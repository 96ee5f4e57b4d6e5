"""Numbers that follow from a config and are decided here only: how many training processes a run has."""

from __future__ import annotations

from .schema import RunConfig


def ranks_per_node(cfg: RunConfig) -> int:
    """Training processes on each node: one per GPU, or train.cpu_ranks on a CPU job."""
    return cfg.slurm.gpus or cfg.train.cpu_ranks


def world_size(cfg: RunConfig) -> int:
    """Training processes of the run: ranks_per_node on each of slurm.nodes."""
    return cfg.slurm.nodes * ranks_per_node(cfg)
