"""The submitit launcher: the same payload and resources through submitit's AutoExecutor.

`cluster` picks submitit's backend: None (auto: Slurm when `srun` is on PATH), `slurm`, `local`
(a child process on this machine) or `debug` (in this process). Its files (pickled call, sbatch
script, logs) go to <run or sweep directory>/submitit.
"""

from __future__ import annotations

from pathlib import Path

from ..config import RunConfig
from .render import gpu_request, job_name

CLUSTERS = ("slurm", "local", "debug")


def slurm_minutes(time: str) -> int:
    """Minutes in a Slurm time string (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS), rounded up."""
    days, _, clock = time.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:  # after a day count the clock reads HH[:MM[:SS]]
        parts += [0] * (3 - len(parts))
        h, m, s = parts
    else:
        h, m, s = {1: [0, parts[0], 0], 2: [0, *parts], 3: parts}[len(parts)]
    seconds = ((int(days or 0) * 24 + h) * 60 + m) * 60 + s
    return max(1, -(-seconds // 60))


def parameters(cfg: RunConfig, array_parallelism: int | None = None) -> dict:
    """AutoExecutor parameters equivalent to the rendered sbatch script's resources."""
    s = cfg.slurm
    extra = {}
    for line in s.extra:  # `--mail-type=END` -> {"mail-type": "END"}, `--exclusive` -> {"exclusive": True}
        key, eq, value = line.lstrip("-").partition("=")
        extra[key] = value if eq else True
    gres = gpu_request(s)
    params = {
        "name": job_name(cfg),
        "timeout_min": slurm_minutes(s.time),
        "cpus_per_task": s.cpus_per_task,
        "nodes": s.nodes,
        "tasks_per_node": 1,
        "slurm_time": s.time,
        "slurm_mem": s.mem,
        "slurm_partition": s.partition,
        "slurm_account": s.account,
        "slurm_qos": s.qos,
        "slurm_constraint": s.constraint,
        "slurm_exclude": s.exclude,
        "slurm_stderr_to_stdout": True,
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

    ex = submitit.AutoExecutor(folder=folder, cluster=cluster)
    ex.update_parameters(**parameters(cfg, array_parallelism))
    return ex


def submit(cfg: RunConfig, run_dir: Path, cluster: str | None):
    """Submit one run; returns the submitit Job."""
    from .payload import run_job

    return executor(cfg, run_dir / "submitit", cluster).submit(run_job, str(run_dir))


def submit_array(cfg: RunConfig, sweep_dir: Path, run_dirs: list[Path], cluster: str | None, max_parallel: int | None):
    """Submit a sweep's trials as one array (`map_array`); returns the submitit Jobs in trial order."""
    from .payload import run_job

    ex = executor(cfg, sweep_dir / "submitit", cluster, array_parallelism=max_parallel or len(run_dirs))
    return ex.map_array(run_job, [str(d) for d in run_dirs])
