"""Resume bookkeeping of a run directory: which checkpoint to resume from, what an earlier start already
measured, which start this is, and which logged steps a resumed run logs again. Rank 0's to decide."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..errors import UserError
from ..rundir import ATTEMPTS_FILE, CONFIG_FILE, attempts, config_hash, write_text_atomic
from ..rundir import metric_entries as rundir_metric_entries
from ..stops import job_label
from . import checkpoint
from .progress import emit


def find_resume_point(run_dir: Path, config_sha256: str, world_size: int = 1) -> Path | None:
    """The newest sound checkpoint of this very config and world size, after clearing what a killed save
    left and moving damaged ones aside."""
    root = run_dir / "checkpoints"
    checkpoint.discard_partial(root)
    latest = checkpoint.newest_sound(root, emit)
    if latest is None:
        return None
    state = checkpoint.read_state(latest)
    if state["config_sha256"] != config_sha256:
        raise UserError(
            f"{run_dir} holds checkpoints of a different config: resume with the config.yaml in it, "
            "or pass --fresh (or another --run-dir) to start over"
        )
    saved_by = state.get("world_size", 1)
    if saved_by != world_size:  # each rank's random state and data share belong to that world
        raise UserError(
            f"{run_dir}: its newest checkpoint ({latest.name}) was written by {saved_by} rank(s) and this training has "
            f"{world_size}: resume with {saved_by} (the same nodes x GPUs), or pass --fresh to start over"
        )
    return latest


def reusable_base_loss(run_dir: Path, config_sha256: str) -> float | None:
    """The base model's validation loss measured by an earlier start of this very config that died before
    its first checkpoint (an OOM kill, a node failure): measuring it again would give the same number."""
    old_config, metrics = run_dir / CONFIG_FILE, run_dir / "metrics.jsonl"
    if not (old_config.is_file() and metrics.is_file()) or config_hash(old_config.read_text(encoding="utf-8")) != config_sha256:
        return None
    for entry in rundir_metric_entries(metrics):  # keep_metrics_up_to says what it drops
        if entry.get("eval") == "base" and "val_loss" in entry:
            return entry["val_loss"]
    return None


def metric_entries(path: Path) -> list[dict]:
    """rundir.metric_entries, each line it drops named in the log."""
    dropped: list[int] = []
    entries = rundir_metric_entries(path, dropped)
    for number in dropped:
        emit(f"{path}: line {number} is not a whole entry (cut by a kill while it was written?): dropped")
    return entries


def record_attempt(run_dir: Path, resume: Path | None) -> int:
    """Append this start to attempts.jsonl; return how many starts came before it (the restart number)."""
    path = run_dir / ATTEMPTS_FILE
    before = len(path.read_text(encoding="utf-8").splitlines()) if path.exists() else 0
    entry = {
        "restart": before, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_job": job_label(),  # as squeue names it (`hpclora cancel` asks whether this job has begun training)
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"), "resumed_from": checkpoint.step_of(resume) if resume else None,
    }
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
    return before


def first_start(run_dir: Path) -> float | None:
    """When training first started in this run directory (attempts.jsonl), as a Unix time; None if unknown."""
    import datetime

    try:
        return datetime.datetime.strptime(attempts(run_dir)[0]["started"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except (ValueError, IndexError, KeyError, TypeError):
        return None


def keep_metrics_up_to(path: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint (step -1: all of them): the resumed run logs those steps again."""
    if path.exists():
        kept = [entry for entry in metric_entries(path) if entry["step"] <= step]
        write_text_atomic(path, "".join(json.dumps(entry) + "\n" for entry in kept))
