"""Experiment tracking: TensorBoard event files in every run; Weights & Biases only when configured.

Clusters often have no internet on compute nodes, so TensorBoard (files in the run directory) is always
on, and W&B runs in offline mode there (its files also go into the run directory, for `wandb sync`).
The API key is never written anywhere: W&B reads WANDB_API_KEY from the job's environment.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import UserError

TENSORBOARD_DIR = "tensorboard"


def wandb_settings(project: str, run_dir: Path, offline: bool) -> dict:
    """wandb.init's arguments: project, run name, files in the run directory, offline mode on offline nodes (unless
    WANDB_MODE says otherwise)."""
    mode = "offline" if offline and "WANDB_MODE" not in os.environ else None
    return {"project": project, "name": run_dir.name, "dir": str(run_dir), "mode": mode}


def report_to(cfg) -> list[str]:
    """The Trainer's `report_to` beyond TensorBoard: ["wandb"] when configured (checked before any work)."""
    if not cfg.run.wandb_project:
        return []
    try:
        found = importlib.util.find_spec("wandb") is not None
    except ValueError:  # imported before and found unusable
        found = False
    if not found:
        raise UserError("run.wandb_project: logging to Weights & Biases needs the wandb package in the job's environment "
                        "(pip install wandb), or leave it unset: TensorBoard events are written in any case")
    return ["wandb"]


def start_wandb(cfg, run_dir: Path) -> None:
    """Start this run's W&B run (rank 0): the Trainer's W&B callback then logs into it rather than making its own."""
    import wandb

    from ..catalog.hub import is_offline

    wandb.init(**wandb_settings(cfg.run.wandb_project, run_dir, is_offline()))
