"""What a job runs, whichever launcher started it: train on the run directory's resolved config."""

from __future__ import annotations

from pathlib import Path


def run_job(run_dir: str) -> dict:
    """Train in this process on <run_dir>/config.yaml; return the run's summary and whether it finished
    (False: a stop signal made it checkpoint and return early; running it again resumes).

    The submitit and local launchers call this; an sbatch script runs the same thing as
    `hpclora train <run_dir>/config.yaml --run-dir <run_dir>`.
    """
    from .. import config
    from ..quiet import quiet_libraries

    quiet_libraries()  # before train pulls in transformers (and with it bitsandbytes)
    from ..train import train

    cfg = config.load(Path(run_dir) / "config.yaml")
    run = train(cfg, run_dir=run_dir)
    return {**run.summary, "finished": run.finished}
