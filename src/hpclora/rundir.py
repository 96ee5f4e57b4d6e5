"""The run directory: where a run lives, and the files that make it describe itself.

<output_root>/<name>-<Slurm job id or timestamp>/
    config.yaml     the resolved config the job ran with (the job never reads the user's YAML)
    env.json        versions, device, host, Slurm ids: enough to say how the adapter was made
    metrics.jsonl   one JSON object per log step and evaluation
    summary.json    base vs adapter validation loss and the run's totals, written at the end
    adapter/        PEFT adapter and tokenizer, written atomically at the end
    checkpoints/    complete checkpoints to resume from (checkpoint.py)
    attempts.jsonl  one line per start of training in this directory (restarts)
    .lock           held by the training that uses the directory (host, pid): one at a time
    job.sbatch, job.json   the job script and the submission record (launch/submit.py)
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import shutil
import socket
import sys
import time
from importlib import metadata
from pathlib import Path

from .config import RunConfig, run_dir_slug, to_yaml
from .errors import UserError

# Left by rank 0 when training stopped at a checkpoint before its end: under torchrun the ranks end with
# 0 (torchrun reports other codes as failures), and this says "checkpointed, not finished".
STOPPED_MARKER = ".stopped"
STOP_MARKER_VAR = "HPCLORA_STOP_MARKER"  # one more place for it, where a hand-written job script cannot know the run directory
JOB_FILE = "job.json"  # the submission record of a run (launch/submit.py)
SWEEP_FILE = "sweep.json"  # a sweep directory's record: its trials and their overrides
PROBE_FILE = "probe.json"  # a probe run's node: GPU, driver, kernels, network (hpclora probe)
SLURM_VARS = (
    "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NAME", "SLURM_JOB_PARTITION",
    "SLURM_JOB_NODELIST", "SLURM_RESTART_COUNT", "SLURM_CPUS_PER_TASK", "CUDA_VISIBLE_DEVICES",
)
CONTAINER_VARS = ("APPTAINER_CONTAINER", "SINGULARITY_CONTAINER", "APPTAINER_NAME", "SINGULARITY_NAME")
PACKAGES = ("hpclora", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "omegaconf", "submitit")


def default_run_dir(cfg: RunConfig) -> Path:
    """<output_root>/<name>-<id>: the Slurm job id (stable across requeues) or a timestamp."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    stamp = job or time.strftime("%Y%m%d-%H%M%S")
    return Path(cfg.run.output_root) / f"{run_dir_slug(cfg.run.name)}-{stamp}"


LOCK_FILE = ".lock"
# flock(2) answers these where the file system has no locks (Lustre mounted without -o flock, old NFS).
NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
# Written first into every run directory hpclora makes (train, submit, sweep): what `--fresh` may empty.
RUN_MARKER = ".hpclora-run"
# Everything hpclora writes into a run directory, and nothing else: `--fresh` removes these only.
RUN_ENTRIES = frozenset({
    RUN_MARKER, LOCK_FILE, STOPPED_MARKER, "config.yaml", "env.json", "metrics.jsonl", "summary.json", "attempts.jsonl",
    "adapter", ".adapter.partial", "checkpoints", "tensorboard", "wandb", "submitit", JOB_FILE, "job.sbatch", PROBE_FILE,
    "eval.json", "eval.md", "report.md", "loss.png",
})


def mark_run_dir(path: Path) -> None:
    (path / RUN_MARKER).write_text("a run directory of hpclora: `hpclora train --fresh` may empty it of what hpclora wrote\n",
                                   encoding="utf-8")


def is_run_dir(path: Path) -> bool:
    """Whether hpclora made this directory (its marker; or, from before markers, a training's lock or a submission's record)."""
    return any((path / name).is_file() for name in (RUN_MARKER, LOCK_FILE, JOB_FILE))


def foreign_entries(path: Path) -> list[str]:
    """What a directory holds that hpclora did not write (atomic writes' `.NAME.tmp` count as hpclora's)."""
    ours = lambda name: name in RUN_ENTRIES or (name.startswith(".") and name.endswith(".tmp") and name[1:-4] in RUN_ENTRIES)  # noqa: E731
    return sorted(e.name + ("/" if e.is_dir() else "") for e in path.iterdir() if not ours(e.name))


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


def read_json(path: Path) -> dict | None:
    """A JSON record of a run or sweep directory, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def write_config(run_dir: Path, cfg: RunConfig) -> str:
    """Write the resolved config.yaml (what the job runs with) and return its text."""
    text = to_yaml(cfg)
    write_text_atomic(run_dir / "config.yaml", text)
    return text


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks (checkpoints and staged models are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def config_hash(config_text: str) -> str:
    """Short content hash of a resolved config: the same text, the same run recipe."""
    return hashlib.sha256(config_text.encode("utf-8")).hexdigest()[:16]


def verdict(base_loss: float, adapter_loss: float) -> str:
    """Whether the adapter helped, in the words every command uses (lower held-out loss is better)."""
    return "adapter is better" if adapter_loss < base_loss else "adapter is NOT better than the base model"


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


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, value) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")


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
