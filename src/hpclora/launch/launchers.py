"""How a written run or sweep starts: sbatch, submitit, or here. One small interface, as submitit has
executors: `describe` (for --dry-run), `start` (submit; returns the job id and each task's log) and
`finish` (what happens after the submission is recorded: nothing for a scheduler, the training itself for
launchers without one). Every launcher runs the same job: job.py's command and environment.
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass, field

from ..errors import NotSubmitted, UserError
from . import slurm


@dataclass
class Started:
    job_id: str | None  # None where no scheduler was involved
    logs: list[str | None]  # one per run directory (a sweep's trials in order)
    handles: list = field(default_factory=list)  # submitit's Job objects
    details: dict = field(default_factory=dict)  # more fields for the job record


def refuse_packed_trials(job, launcher: str) -> None:
    if job.kind == "sweep" and job.trials_per_task > 1:
        raise NotSubmitted(f"--trials-per-node packs trials into the tasks of a Slurm job array: use --launcher sbatch, not {launcher}")


class Sbatch:
    """The rendered job.sbatch, submitted with `sbatch --parsable`."""

    name = "sbatch"
    queues = True  # the job waits in a Slurm queue: what no node can give is refused before

    def describe(self, job) -> str:
        return f"sbatch {shlex.quote(str(job.script_path))}"

    def start(self, job) -> Started:
        job_id = slurm.sbatch(str(job.script_path))
        if job.kind == "run":
            return Started(job_id, [job.log_path(job_id)])
        return Started(job_id, [job.log_path(job_id, i) for i in range(len(job.run_dirs))])

    def finish(self, job, started: Started) -> int:
        return 0


class Submitit:
    """submitit's AutoExecutor with the same resources; `cluster` picks its backend (None: Slurm when
    `srun` is on PATH; `local`: child processes here; `debug`: in this process)."""

    name = "submitit"

    def __init__(self, cluster: str | None = None):
        self.cluster = cluster
        self.queues = cluster not in ("local", "debug")

    def describe(self, job) -> str:
        return f"submitit AutoExecutor(cluster={self.cluster or 'auto'}) in {job.directory / 'submitit'}"

    def start(self, job) -> Started:
        from . import submitit as via_submitit

        refuse_packed_trials(job, "submitit")
        if self.cluster in ("local", "debug") and job.cfg.slurm.nodes > 1:
            raise NotSubmitted(f"slurm.nodes: {job.cfg.slurm.nodes} nodes need a Slurm job, not submitit's {self.cluster} executor")
        try:
            if job.kind == "run":
                handles = [via_submitit.submit(job.cfg, job.directory, self.cluster)]
            else:
                handles = via_submitit.submit_array(job.cfg, job.directory, job.run_dirs, self.cluster, job.max_parallel)
        except Exception as exc:
            if isinstance(exc.__cause__, subprocess.CalledProcessError):  # submitit's sbatch answered no
                raise NotSubmitted(f"sbatch refused the job: {str(exc).replace('sbatch: error: ', '').strip()}") from None
            raise
        job_id = str(handles[0].job_id).split("_")[0]
        return Started(job_id, [str(h.paths.stdout) for h in handles], handles, {"cluster": self.cluster or "auto"})

    def finish(self, job, started: Started) -> int:
        if self.cluster in ("local", "debug"):  # without a scheduler nothing keeps these going but us
            for handle in started.handles:
                handle.result()
        return 0


class Local:
    """The job's command on this machine, now, one run after the other; USR1 or TERM checkpoints."""

    name = "local"
    queues = False

    def describe(self, job) -> str:
        return "the job's command on this machine, now"

    def start(self, job) -> Started:
        refuse_packed_trials(job, "local")
        if job.cfg.slurm.nodes > 1:
            raise NotSubmitted(f"slurm.nodes: {job.cfg.slurm.nodes} nodes need a Slurm job: use --launcher sbatch")
        return Started(None, [None] * len(job.run_dirs))

    def finish(self, job, started: Started) -> int:
        from .command import run_job

        for run_dir in job.run_dirs:
            code = run_job(str(run_dir))
            if code != 0:
                return code
        return 0


LAUNCHERS = {"sbatch": Sbatch, "submitit": Submitit, "local": Local}


def launcher(name: str, cluster: str | None = None):
    if name not in LAUNCHERS:
        raise UserError(f"unknown launcher {name!r}: use one of {', '.join(LAUNCHERS)}")
    if cluster and name != "submitit":
        raise UserError("--cluster picks submitit's backend: use it with --launcher submitit")
    return Submitit(cluster) if name == "submitit" else LAUNCHERS[name]()
