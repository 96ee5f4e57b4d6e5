"""The submitit launcher: the same job (job.py) and resources through submitit's AutoExecutor.

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


class ResumableTraining:
    """submitit's payload: job.py's training command, with submitit's checkpoint protocol.

    Several ranks: submitit starts one task per node (tasks_per_node=1), and each runs torchrun for the
    node's ranks, as the sbatch script does, rather than one submitit task per GPU: so the ranks are
    started, signalled and rendezvous the same way whichever launcher submitted the job.

    Before a time limit or on preemption submitit signals USR2. Training (a child process, which gets the
    signal from Slurm and from here) saves a checkpoint at the next step boundary and exits with 75; then
    submitit's own handler is called, which asks `checkpoint()` for the call to make after the requeue
    (the same one: training resumes from its newest checkpoint), requeues the job and exits.
    """

    def __call__(self, run_dir: str) -> dict:
        import json
        import signal

        from ..job.preempt import CHECKPOINTED_EXIT
        from .command import run_job
        from .slurm import own_job_cancelled

        submitit_handler = signal.getsignal(signal.SIGUSR2)
        code = run_job(run_dir)
        if code == CHECKPOINTED_EXIT and own_job_cancelled():  # scancel: stay cancelled
            raise RuntimeError(f"job cancelled; training in {run_dir} saved a checkpoint: submit again to resume")
        if code == CHECKPOINTED_EXIT and callable(submitit_handler):
            submitit_handler(signal.SIGUSR2, None)  # the first task requeues and exits; not installed by the debug executor
            return {"checkpointed": run_dir}  # another node's task: the requeue ends it
        if code != 0:
            raise RuntimeError(f"training in {run_dir} exited with code {code}; its log above says why")
        return json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))

    def checkpoint(self, run_dir: str):
        import submitit

        return submitit.helpers.DelayedSubmission(self, run_dir)


def submit(cfg: RunConfig, run_dir: Path, cluster: str | None):
    """Submit one run; returns the submitit Job."""
    return executor(cfg, run_dir / "submitit", cluster).submit(ResumableTraining(), str(run_dir))


def submit_array(cfg: RunConfig, sweep_dir: Path, run_dirs: list[Path], cluster: str | None, max_parallel: int | None):
    """Submit a sweep's trials as one array (`map_array`); returns the submitit Jobs in trial order."""
    ex = executor(cfg, sweep_dir / "submitit", cluster, array_parallelism=max_parallel or len(run_dirs))
    return ex.map_array(ResumableTraining(), [str(d) for d in run_dirs])
