"""The submitit launcher: the same job (command.py) and resources through submitit's AutoExecutor.

`cluster` picks submitit's backend: None (auto: Slurm when `srun` is on PATH), `slurm`, `local`
(a child process on this machine) or `debug` (in this process). Its files (pickled call, sbatch
script, logs) go to <run or sweep directory>/submitit.
"""

from __future__ import annotations

from pathlib import Path

from ..config import RunConfig
from ..config.slurm_syntax import slurm_seconds
from .render import gpu_request, job_name


def slurm_minutes(time: str) -> int:
    """Minutes in a Slurm time string, rounded up (submitit counts in minutes)."""
    return max(1, -(-slurm_seconds(time) // 60))


def parameters(cfg: RunConfig, array_parallelism: int | None = None) -> dict:
    """AutoExecutor parameters equivalent to the rendered sbatch script's resources."""
    s = cfg.slurm
    extra = {"requeue": True}
    for line in s.extra:  # `--mail-type=END` -> {"mail-type": "END"}, `--exclusive` -> {"exclusive": True}
        key, eq, value = line.lstrip("-").partition("=")
        extra[key] = value if eq else True
    gres = gpu_request(s)
    params = {
        "name": job_name(cfg),
        "timeout_min": slurm_minutes(s.time),  # submitit wants minutes (its timeout logic computes with them)
        "cpus_per_task": s.cpus_per_task,
        "nodes": s.nodes,
        "tasks_per_node": 1,
        "slurm_mem": s.mem,
        "slurm_partition": s.partition,
        "slurm_account": s.account,
        "slurm_qos": s.qos,
        "slurm_constraint": s.constraint,
        "slurm_exclude": s.exclude,
        "slurm_stderr_to_stdout": True,
        # submitit's checkpoint protocol: USR2 this long before the time limit, then requeue (see ResumableTraining).
        "slurm_signal_delay_s": cfg.train.preempt_grace_s,
        # Slurm 22.05+: the srun that submitit runs does not inherit --cpus-per-task.
        "slurm_setup": ['export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"', *s.setup],
        "slurm_additional_parameters": extra,
    }
    if gres and gres.startswith("--gres="):
        params["slurm_gres"] = gres.removeprefix("--gres=")
    elif gres:
        params["slurm_additional_parameters"]["gpus"] = gres.removeprefix("--gpus=")
    if array_parallelism:
        params["slurm_array_parallelism"] = array_parallelism
    return {k: v for k, v in params.items() if v is not None}


def executor(cfg: RunConfig, folder: Path, cluster: str | None, array_parallelism: int | None = None):
    import submitit

    # How often a timed-out job may requeue itself is fixed when the executor is made.
    ex = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=cfg.slurm.max_requeues)
    ex.update_parameters(**parameters(cfg, array_parallelism))
    return ex


# After the job script has requeued the job, Slurm ends this attempt (TERM, then KILL after KillWait): wait for it.
REQUEUE_WAIT_S = 600


class ResumableTraining:
    """submitit's payload: the run's own job script, as command.run_job runs it in the job step, with its stop
    and requeue protocol (protocol.py): a stop signal (submitit asks Slurm for USR2 before the time limit,
    preemption and scancel send TERM) makes training checkpoint; the script then requeues the job unless it was
    cancelled or is out of requeues, and the requeued job calls this again, which resumes from the checkpoint.

    Several ranks: submitit starts one task per node (tasks_per_node=1), and each runs torchrun for the node's
    ranks, as the sbatch script does, rather than one submitit task per GPU: so the ranks are started,
    signalled and meet the same way whichever launcher submitted the job.
    """

    def __call__(self, run_dir: str) -> dict:
        import json
        import os
        import signal
        import time

        from ..stops import CHECKPOINTED_EXIT
        from .command import run_job

        code = run_job(run_dir)
        summary = Path(run_dir) / "summary.json"
        if code == 0 and (Path(run_dir) / "adapter").is_dir() and summary.is_file():
            return json.loads(summary.read_text(encoding="utf-8"))
        # Requeued by the script (or by another node's task, whose task 0 decides), or the script itself ended by the
        # TERM with which Slurm ends an attempt (a requeue, cancel or preemption): Slurm ends this attempt too. A result
        # written now would be read as the job's, even where a requeued attempt follows.
        if code == 0 or (code in (128 + signal.SIGTERM, -signal.SIGTERM) and os.environ.get("SLURM_JOB_ID")):
            time.sleep(REQUEUE_WAIT_S)
            raise RuntimeError(f"training in {run_dir} stopped (exit code {code}), but Slurm did not end this attempt")
        if code == CHECKPOINTED_EXIT:
            raise RuntimeError(f"training in {run_dir} saved a checkpoint and the job was not requeued (cancelled, out of "
                               "requeues, or not under Slurm: its log says which): submit it again to resume")
        raise RuntimeError(f"training in {run_dir} exited with code {code}; its log above says why")

    def checkpoint(self, run_dir: str):
        """submitit's own requeue protocol, for a USR2 that arrives before __call__ runs the job script: the same call
        again after the requeue."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, run_dir)


def submit(cfg: RunConfig, run_dir: Path, cluster: str | None):
    """Submit one run; returns the submitit Job."""
    return executor(cfg, run_dir / "submitit", cluster).submit(ResumableTraining(), str(run_dir))


def submit_array(cfg: RunConfig, sweep_dir: Path, run_dirs: list[Path], cluster: str | None, max_parallel: int | None):
    """Submit a sweep's trials as one array (`map_array`); returns the submitit Jobs in trial order."""
    ex = executor(cfg, sweep_dir / "submitit", cluster, array_parallelism=max_parallel or len(run_dirs))
    return ex.map_array(ResumableTraining(), [str(d) for d in run_dirs])
