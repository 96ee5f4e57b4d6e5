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
import re
import resource
import shlex
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from .config import RunConfig, to_yaml
from .errors import FILE_SYSTEM_REFUSALS, UserError, refusal_errno
from .stops import CANCEL_REQUEST

CONFIG_FILE = "config.yaml"  # the resolved config the job runs with
JOB_FILE = "job.json"  # the submission record of a run (launch/submit.py)
JOB_SCRIPT = "job.sbatch"  # the job script as submitted
SWEEP_FILE = "sweep.json"  # a sweep directory's record: its trials and their overrides
PROBE_FILE = "probe.json"  # a probe run's node: GPU, driver, kernels, network (hpclora probe)
LOCK_FILE = ".lock"  # held by the training that uses the directory
# Left by rank 0 when training stopped at a checkpoint before its end: under torchrun the ranks end with
# 0 (torchrun reports other codes as failures), and this says "checkpointed, not finished".
STOPPED_MARKER = ".stopped"
STOP_MARKER_VAR = "HPCLORA_STOP_MARKER"  # one more place for it, where a hand-written job script cannot know the run directory
ATTEMPTS_FILE = "attempts.jsonl"  # one line per start of training in the run directory
MERGED_DIR = "merged"  # `hpclora merge` without --out writes the merged model here
PREFERENCE_FIGURE = "preference.png"  # `hpclora report` of a preference run: its rewards and held-out preference
EXPORT_RECORD = "EXPORTED_FROM.json"  # beside an exported GGUF: where it came from (results/export.py)
EXPORT_DIR = re.compile(r"gguf-(lora-)?[a-z0-9_]+(\.sbatch)?")  # `hpclora export` without --out writes here (export_dir_name), and its job script
# Written first into every run directory hpclora makes (train, submit, sweep): what `--fresh` may empty.
RUN_MARKER = ".hpclora-run"
# Everything hpclora writes into a run directory, and nothing else: `--fresh` removes these only.
RUN_ENTRIES = frozenset({
    RUN_MARKER, LOCK_FILE, STOPPED_MARKER, CONFIG_FILE, "env.json", "metrics.jsonl", "summary.json", ATTEMPTS_FILE,
    "adapter", "checkpoints", "tensorboard", "wandb", "submitit", JOB_FILE, JOB_SCRIPT, PROBE_FILE,
    "eval.json", "eval.md", "report.md", "loss.png", PREFERENCE_FIGURE, MERGED_DIR, CANCEL_REQUEST,
})


def resume_command(run_dir: Path) -> str:
    """The one way to go on with a run stopped at a checkpoint, as the training log, the job script and `cancel` all
    say it: a submitted run (job.json) is submitted again, its own job with its launcher (launch/resubmit.py); a run
    of the hand-written job script goes on through that script in the same directory; one trained by hand, by
    training again in it. Never `hpclora submit CONFIG`: that starts a new run at step 0."""
    run, config = shlex.quote(str(run_dir)), shlex.quote(str(run_dir / CONFIG_FILE))
    if (run_dir / JOB_FILE).is_file():
        return f"hpclora submit {run}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"sbatch jobs/train.sbatch {config} --run-dir {run}"
    return f"hpclora train {config} --run-dir {run}"


def mark_run_dir(path: Path) -> None:
    (path / RUN_MARKER).write_text("a run directory of hpclora: `hpclora train --fresh` may empty it of what hpclora wrote\n",
                                   encoding="utf-8")


def is_run_dir(path: Path) -> bool:
    """Whether hpclora made this directory (its marker; or, from before markers, a training's lock or a submission's record)."""
    return any((path / name).is_file() for name in (RUN_MARKER, LOCK_FILE, JOB_FILE))


def export_dir_name(quant: str, adapter_only: bool) -> str:
    """Where `hpclora export` writes in a run directory without --out: gguf-QUANT, or gguf-lora-QUANT (EXPORT_DIR)."""
    return f"gguf-{'lora-' if adapter_only else ''}{quant}"


def training_holder(path: Path) -> str | None:
    """Who is training in the run directory `path` now (host, pid, job, as its lock says), or None: the lock is free
    or absent. The lock is a flock, which the OS drops when the training process ends however it ends."""
    import fcntl

    try:
        handle = open(path / LOCK_FILE, encoding="utf-8")
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "another process"
        except OSError:  # a file system without locks: nothing can tell
            return None
    return None


def foreign_entries(path: Path) -> list[str]:
    """What a directory holds that hpclora did not write (the `.NAME.tmp` and `.NAME.partial-PID` of an interrupted
    write of one of its own files count as hpclora's)."""
    def ours(name: str) -> bool:
        half_written = re.match(r"^\.(.+)\.(tmp|partial-\d+)$", name)
        if half_written:
            name = half_written.group(1)
        return name in RUN_ENTRIES or EXPORT_DIR.fullmatch(name) is not None

    return sorted(e.name + ("/" if e.is_dir() else "") for e in path.iterdir() if not ours(e.name))


def read_json(path: Path) -> dict | None:
    """A JSON record of a run or sweep directory, or None when it is missing, unreadable or no JSON object."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_entries(path: Path, dropped: list[int] | None = None) -> list[dict]:
    """The whole entries of a metrics.jsonl: JSON objects with a whole step and a number for the loss (a training log),
    the validation loss (an evaluation) or the held-out preference margin (a preference run's evaluation). A line that a kill while it was appended left cut, or any other, is
    skipped, and its number added to `dropped`: it is never a reason for a resume, status or report to fail."""
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            entry = None
        whole = (isinstance(entry, dict) and isinstance(entry.get("step"), int) and not isinstance(entry["step"], bool)
                 and entry["step"] >= 0 and any(_is_number(entry.get(key)) for key in ("loss", "val_loss", "pref_margin")))
        if whole:
            entries.append(entry)
        elif line.strip() and dropped is not None:
            dropped.append(number)
    return entries


def json_lines(path: Path) -> list[dict]:
    """The objects of a JSON Lines file that hpclora appends to, oldest first; a line cut by a kill, or edited into
    something else, is left out. No file: none."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(entry, dict):
            found.append(entry)
    return found


def attempts(run_dir: Path) -> list[dict]:
    """The starts of training recorded in a run directory, oldest first."""
    return json_lines(run_dir / ATTEMPTS_FILE)


def write_config(run_dir: Path, cfg: RunConfig) -> str:
    """Write the resolved config.yaml (what the job runs with) and return its text."""
    text = to_yaml(cfg)
    write_text_atomic(run_dir / CONFIG_FILE, text)
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


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, value) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")


def run_dir_slug(name: str) -> str:
    """A safe single path component for the run directory, whatever characters the run name holds."""
    slug = re.sub(r"[^\w.-]+", "-", name, flags=re.UNICODE).strip(".-")
    return slug[:80] or "run"


def run_dir_path(output_root: str, name: str, stamp: str | None = None) -> Path:
    """<output_root>/<name>-<stamp>, the one way run (and sweep) directories are named: `stamp` is a Slurm job id
    (stable across requeues), else the time; a name of any characters stays one component inside output_root."""
    root = Path(output_root).expanduser().resolve()
    path = root / f"{run_dir_slug(name)}-{stamp or time.strftime('%Y%m%d-%H%M%S')}"
    if not path.resolve().is_relative_to(root):  # the slug makes this impossible; keep it impossible
        raise ValueError(f"run directory {path} would lie outside run.output_root {root}")
    return path


def new_run_dir(output_root: str, name: str) -> Path:
    """A run directory path no directory has yet: run_dir_path with the time, and -2, -3, ... after it when taken."""
    base = path = run_dir_path(output_root, name)
    n = 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(staging: Path, target: Path) -> None:
    """Make a fully written `staging` directory appear as `target` in one rename, its files on disk first, so that
    a reader (or a crash) sees all of it or none. `target` may exist only as an empty directory. Its files get the
    permissions the umask gives, as `cp` would: safetensors writes 0600 whatever the umask, which would keep an
    adapter on shared storage from the labmates the umask means to let read it."""
    mask = os.umask(0)
    os.umask(mask)
    for file in staging.rglob("*"):
        if file.is_file():
            file.chmod(0o666 & ~mask)
            _fsync(file)
    _fsync(staging)
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    os.replace(staging, target)
    _fsync(target.parent)


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when there is nothing)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def write_refusal(exc: BaseException, directory: Path, needed_bytes: int) -> str | None:
    """What stopped a write into `directory`, as one line for the user, or None when it was not the file system.
    torch.save under a full disk or a file-size limit says only "unexpected pos ...": where the exception carries
    no errno, the limit and the free space of `directory` tell which it was."""
    code = refusal_errno(exc)
    if code is None and isinstance(exc, (OSError, RuntimeError)):
        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        if soft != resource.RLIM_INFINITY and soft <= needed_bytes:
            code = errno.EFBIG
        elif _free_bytes(directory) < max(needed_bytes // 10, 1 << 20):
            code = errno.ENOSPC
    if code is None:
        return None
    mb = lambda n: f"{n / 1e6:,.1f} MB"  # noqa: E731
    size = f"about {mb(needed_bytes)} to write, {mb(_free_bytes(directory))} free there"
    if code == errno.EFBIG:
        size += f", files limited to {mb(resource.getrlimit(resource.RLIMIT_FSIZE)[0])}"
    return f"{directory}: {FILE_SYSTEM_REFUSALS[code]} ({size})"


def _free_bytes(directory: Path) -> int:
    for place in (directory, *directory.parents):
        if place.exists():
            return shutil.disk_usage(place).free
    return 0


@contextmanager
def staged(target: Path, needed_bytes: int = 0):
    """A directory to write `target`'s contents into: published as `target` (publish_dir) when the block ends,
    removed without a trace when it raises. Never leaves a half-written `target`; a refusal of the file system
    (full, file-size limit, read-only) becomes a UserError naming the place, the size and the free space.
    `needed_bytes`: what the writer expects to write, when it knows better than what was written when it failed."""
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        yield staging
        publish_dir(staging, target)
    except Exception as exc:  # safetensors' SafetensorError is neither OSError nor RuntimeError
        refusal = write_refusal(exc, target.parent, max(needed_bytes, tree_bytes(staging)))
        if refusal is None:
            raise
        raise UserError(f"{target.name} was not written (nothing was replaced): {refusal}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
