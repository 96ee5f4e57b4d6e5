"""hpclora as a library: for notebooks and users' own submitit scripts. The same steps as the command line,
with its errors raised as exceptions (ConfigError, DataError, UserError) instead of printed.

    import hpclora
    cfg = hpclora.load_config("configs/demo-cpu.yaml", ["lora.r=16"])
    print(hpclora.plan_run(cfg, gpu="v100-16gb").peak_gb)
    run = hpclora.submit(cfg)                       # sbatch; launcher="submitit" gives submitit Jobs too
    run.wait(); print(hpclora.read_summary(run.run_dirs[0])["final_val_loss"])

A user's own submitit AutoExecutor runs `TrainingJob` on a directory from `prepare_run`, with the same
checkpoint-and-requeue protocol as hpclora's own submitit launcher:

    run_dir = hpclora.prepare_run(cfg)
    ex = submitit.AutoExecutor(folder=run_dir / "submitit", slurm_max_num_timeout=3)
    ex.update_parameters(**hpclora.executor_parameters(cfg))
    job = ex.submit(hpclora.TrainingJob(), str(run_dir))

Nothing here imports torch: only the job that trains does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import RunConfig
from .errors import UserError
from .launch.submitit import ResumableTraining as TrainingJob
from .plan import Plan
from .rundir import read_json

__all__ = ["Submission", "TrainingJob", "executor_parameters", "load_config", "plan_run", "prepare_run", "read_summary", "submit", "sweep"]


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), check_data: bool = True) -> RunConfig:
    """A config file (None: the defaults) with `key=value` overrides, checked as `hpclora validate` checks it:
    every value, the model's context and (with `check_data`) every data row. Raises ConfigError (its
    `.problems` lists (key path, message) pairs) or DataError (file and row)."""
    from . import config
    from .plan import preflight

    cfg = config.load(path, list(overrides))
    preflight.check(cfg, data=check_data)
    return cfg


def plan_run(cfg: RunConfig, gpu: str | None = None) -> Plan:
    """Memory, precision, micro-batch and time on `gpu` (a planner name such as v100-16gb, or cpu; None: from
    slurm.gpu_type), measured speed from `hpclora probe` included where there is one."""
    from .plan import make_plan

    return make_plan(cfg, gpu, calibrated=True)


@dataclass
class Submission:
    """A submitted run or sweep: where its files are and how to follow it."""

    kind: str  # run or sweep
    job_id: str | None  # the Slurm job (or job array) id; None where it ran in-process
    directory: Path  # the run directory, or the sweep directory
    run_dirs: list[Path]  # one per run (a sweep's trials in order)
    logs: list[str | None]
    plan: list[str]  # what the planner said (fits, strategy, slurm.time: auto)
    jobs: list = field(default_factory=list)  # submitit Job objects (launcher="submitit")

    def states(self) -> dict[str, str]:
        """Slurm's state of each job or array task by id (from the run directories where Slurm has forgotten)."""
        from .launch import watch

        return watch.job_states(str(self.directory))

    def wait(self, timeout: float | None = None, poll_s: float = 5.0) -> dict[str, str]:
        """Until every job has ended (requeues included); the final states. Raises TimeoutError after `timeout` s."""
        from .launch import watch

        return watch.wait(str(self.directory), poll_s, timeout)

    def summaries(self) -> list[dict | None]:
        """Each run's summary.json (None for a run that has not finished)."""
        return [read_json(d / "summary.json") for d in self.run_dirs]


def submit(cfg: RunConfig, launcher: str = "sbatch", cluster: str | None = None, force: bool = False) -> Submission:
    """What `hpclora submit` does: check the data and the plan (a run that does not fit is refused unless
    `force`), write the run directory, submit. launcher: sbatch, submitit (`cluster`: its backend) or local."""
    from .launch import launchers, submit as submitting

    return _launched(submitting.prepare_job(cfg, force), launchers.launcher(launcher, cluster))


def sweep(config_path: str | Path, grid: dict[str, list], overrides: list[str] | tuple[str, ...] = (), launcher: str = "sbatch",
          cluster: str | None = None, max_parallel: int | None = None, trials_per_node: int = 1, force: bool = False) -> Submission:
    """What `hpclora sweep` does: the cartesian product of `grid` ({"lora.r": [8, 16], "train.lr": [1e-4, 2e-4]})
    as one job array, every trial checked before anything is submitted."""
    from .launch import launchers, submit as submitting

    specs = [f"{key}={','.join(map(str, values))}" for key, values in grid.items()]
    job = submitting.prepare_sweep(str(config_path), list(overrides), specs, max_parallel, force=force, trials_per_node=trials_per_node)
    return _launched(job, launchers.launcher(launcher, cluster))


def _launched(job, launcher) -> Submission:
    from .launch import submit as submitting

    entry, code = submitting.launch(job, launcher)
    if code != 0:  # the local launcher ran it here
        raise UserError(f"{job.directory}: training exited with code {code}")
    logs = [entry.get("log")] if job.kind == "run" else [t["log"] for t in entry["trials"]]
    return Submission(job.kind, entry["job_id"], job.directory, job.run_dirs, logs, job.plan_lines, job.handles)


def read_summary(run_dir: str | Path) -> dict:
    """A finished run's summary.json: losses before and after, steps, tokens/s, peak memory, data counts."""
    summary = read_json(Path(run_dir) / "summary.json")
    if summary is None:
        raise UserError(f"{run_dir}: no summary.json: the run has not finished (see its log, or `hpclora status {run_dir}`)")
    return summary


def prepare_run(cfg: RunConfig, force: bool = False) -> Path:
    """A run directory holding the checked, planned config.yaml (and the job script hpclora would submit), for
    `TrainingJob` in your own executor."""
    from .launch import submit as submitting

    job = submitting.prepare_job(cfg, force)
    submitting.write(job)
    return job.directory


def executor_parameters(cfg: RunConfig) -> dict:
    """submitit AutoExecutor parameters for the run's slurm section: the resources hpclora's own jobs ask for."""
    from .launch.submitit import parameters

    return parameters(cfg)
