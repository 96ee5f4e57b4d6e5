"""The run directory as the training that uses it sees it: taking it (a lock, one training at a time), refusing
directories hpclora did not make, starting over (`--fresh`), and what the job records about where it runs.
"""

from __future__ import annotations

import errno
import os
import platform
import shutil
import socket
import sys
import time
from importlib import metadata
from pathlib import Path

from ..config import RunConfig
from ..errors import UserError
from ..rundir import LOCK_FILE, config_hash, foreign_entries, is_run_dir, mark_run_dir, run_dir_path
from ..stops import job_label


def default_run_dir(cfg: RunConfig) -> Path:
    """<output_root>/<name>-<id>: the Slurm job id (an array task's `ID_TASK`), stable across requeues, or the time."""
    return run_dir_path(cfg.run.output_root, cfg.run.name, job_label())


SLURM_VARS = (
    "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NAME", "SLURM_JOB_PARTITION",
    "SLURM_JOB_NODELIST", "SLURM_RESTART_COUNT", "SLURM_CPUS_PER_TASK", "CUDA_VISIBLE_DEVICES",
)
CONTAINER_VARS = ("APPTAINER_CONTAINER", "SINGULARITY_CONTAINER", "APPTAINER_NAME", "SINGULARITY_NAME")
PACKAGES = ("hpclora", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "omegaconf", "submitit")
# flock(2) answers these where the file system has no locks (Lustre mounted without -o flock, old NFS).
NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


def prepare_run_dir(cfg: RunConfig, run_dir: str | os.PathLike | None, fresh: bool):
    """Create the run directory and take its lock (config.yaml is the caller's to write); refuse a directory
    hpclora did not make unless it is empty, and one that holds a finished adapter unless `fresh`, which
    removes what hpclora wrote there, and refuses where anything else is there too. Returns (path, lock):
    the run directory is this process's until `lock.close()` or its death."""
    path = Path(run_dir).expanduser().resolve() if run_dir else default_run_dir(cfg)
    if path.exists() and not path.is_dir():
        raise UserError(f"--run-dir {path}: a file of that name exists; give a directory (new, or a run directory)")
    if path.is_dir() and not is_run_dir(path) and (found := sorted(e.name for e in path.iterdir())):
        raise UserError(f"--run-dir {path} is not a run directory of hpclora and holds {', '.join(found[:5])}"
                        f"{', ...' if len(found) > 5 else ''}: train into a new or empty directory (nothing there was changed)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--run-dir {path}: cannot create it ({exc.strerror})") from None
    lock = lock_run_dir(path)
    try:
        if fresh:  # under the lock: never empty a directory another training is using
            if found := foreign_entries(path):
                raise UserError(f"--fresh: {path} holds what hpclora did not write ({', '.join(found[:5])}"
                                f"{', ...' if len(found) > 5 else ''}): move it away first, or train into another --run-dir (nothing was removed)")
            for entry in path.iterdir():
                if entry.name != LOCK_FILE:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        if (path / "adapter").exists():
            raise UserError(f"{path} already holds a finished run (adapter/): pass --fresh to replace it, or choose another --run-dir")
        mark_run_dir(path)
    except BaseException:
        lock.close()
        raise
    return path, lock


def lock_run_dir(path: Path):
    """An exclusive flock on <run dir>/.lock, which the OS releases when this process ends however it ends;
    the holder's host and pid are written into it for the next one to name. Where the file system has no
    locks, a warning, and the run goes on unprotected."""
    import fcntl

    handle = open(path / LOCK_FILE, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(
            f"{path} is in use by another `hpclora train` ({holder}): wait for it to end (or cancel its job), "
            "or train into another --run-dir"
        ) from None
    except OSError as exc:
        if exc.errno not in NO_LOCKS:
            raise
        print(f"warning: cannot lock {path} ({exc.strerror}: this file system has no flock; Lustre needs the "
              "`flock` mount option): nothing stops a second training in this run directory", file=sys.stderr, flush=True)
    handle.seek(0)
    handle.truncate()
    handle.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                 + (f", Slurm job {os.environ['SLURM_JOB_ID']}" if os.environ.get("SLURM_JOB_ID") else "") + "\n")
    handle.flush()
    return handle


def job_header(run_dir: Path, config_text: str) -> str:
    """The lines a job log opens with: where it runs, on what, and which config."""
    env = os.environ
    job = env.get("SLURM_JOB_ID", "none (not under Slurm)")
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job += f" (array {env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']})"
    if env.get("SLURM_RESTART_COUNT", "0") != "0":
        job += f" (restart {env['SLURM_RESTART_COUNT']})"
    if "CUDA_VISIBLE_DEVICES" in env:  # set but empty: no GPU; unset: every GPU of the machine
        gpus = env["CUDA_VISIBLE_DEVICES"] or "none"
    else:
        gpus = env.get("SLURM_JOB_GPUS") or "unrestricted"
    image = next((env[v] for v in CONTAINER_VARS if env.get(v)), "none")
    return "\n".join([
        f"job {job} | node {socket.gethostname()} | visible GPUs {gpus} | container {image}",
        f"run directory {run_dir} | config sha256 {config_hash(config_text)}",
    ])


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment(device: str, precision: str, precision_reason: str) -> dict:
    """What the run ran on. Only named variables are recorded: secrets in the environment never are."""
    import torch

    env = {
        "host": socket.gethostname(),
        "python": sys.version.split()[0],
        "executable": sys.executable,  # inside an image: the image's Python, not the submitting host's
        "hpclora": str(Path(__file__).resolve().parents[1]),  # the package that trained, where it is installed
        "platform": platform.platform(),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "packages": package_versions(),
        "device": device,
        "precision": precision,
        "precision_reason": precision_reason,
        "torch_threads": torch.get_num_threads(),
        "slurm": {v: os.environ[v] for v in SLURM_VARS if v in os.environ},
        "container": {v: os.environ[v] for v in CONTAINER_VARS if v in os.environ},
    }
    if device == "cuda":
        env["gpus"] = [
            {"name": torch.cuda.get_device_name(i), "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
             "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 1e9, 1)}
            for i in range(torch.cuda.device_count())
        ]
        env["cuda"] = torch.version.cuda
    return env
