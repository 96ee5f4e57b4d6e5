"""Atomic checkpoints and finding the one to resume from.

A checkpoint is the Trainer's own checkpoint directory (adapter, optimizer, scheduler, grad scaler,
RNG states, trainer state with the global step; the data position follows from the step) plus
hpclora_state.json (tokens seen, base validation loss, config hash). It is written into
<run dir>/checkpoints/.staging/, its files' sha256 recorded in SHA256SUMS (`sha256sum -c` reads it),
flushed to disk, marked COMPLETE, and only then renamed to checkpoints/checkpoint-<step>: a checkpoint
directory without the marker is never used, and one whose files no longer match their sums (a disk or
copy gone wrong) is moved aside for the previous one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from ..errors import UserError
from ..rundir import publish_dir, resume_command, sha256_file, tree_bytes, write_refusal

COMPLETE = "COMPLETE"  # written last, before the rename: the checkpoint is whole
STATE = "hpclora_state.json"
STAGING = ".staging"  # Trainer writes here first
SUMS = "SHA256SUMS"
DAMAGED_PREFIX = "damaged-"  # a checkpoint that failed verification is renamed to damaged-checkpoint-<step>
NAME = re.compile(r"^checkpoint-(\d+)$")


def step_of(path: Path) -> int:
    return int(NAME.match(path.name).group(1))


def complete_checkpoints(root: Path) -> list[Path]:
    """Whole checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if NAME.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=step_of)


def latest(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE).read_text(encoding="utf-8"))


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in (SUMS, COMPLETE))


def damage(checkpoint: Path) -> str | None:
    """What is wrong with a complete checkpoint's files, or None when every one matches SHA256SUMS.
    (Checkpoints written before sums were kept have none: nothing to check.)"""
    sums = checkpoint / SUMS
    if not sums.is_file():
        return None
    for line in sums.read_text(encoding="utf-8").splitlines():
        digest, _, name = line.partition("  ")
        file = checkpoint / name
        if not file.is_file():
            return f"{name} is missing"
        if sha256_file(file) != digest:
            return f"{name} does not match its checksum (truncated or changed after it was written)"
    return None


def publish(staged: Path, root: Path, state: dict, keep: int) -> Path:
    """Make a staged checkpoint whole and visible: state file, checksums, marker, then on disk and renamed in one
    step (rundir.publish_dir); then prune old ones."""
    (staged / STATE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    sums = "".join(f"{sha256_file(f)}  {f.relative_to(staged)}\n" for f in _files(staged))
    (staged / SUMS).write_text(sums, encoding="utf-8")
    (staged / COMPLETE).write_text("ok\n")
    final = root / staged.name
    if (final / COMPLETE).is_file():  # this very step is already saved whole: keep that one
        shutil.rmtree(staged)
    else:  # (unmarked leftovers of a killed attempt were removed by discard_partial at start)
        publish_dir(staged, final)
    try:
        staged.parent.rmdir()  # the staging area, now empty
    except OSError:
        pass
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def discard_partial(root: Path) -> None:
    """Remove what an interrupted save left behind (the staging area, unmarked checkpoint dirs)."""
    shutil.rmtree(root / STAGING, ignore_errors=True)
    if root.is_dir():
        for p in root.iterdir():
            if NAME.match(p.name) and not (p / COMPLETE).is_file():
                shutil.rmtree(p, ignore_errors=True)


def newest_sound(root: Path, say) -> Path | None:
    """The newest complete checkpoint whose files match their checksums. A damaged one is renamed to
    damaged-checkpoint-<step> (kept for inspection, never used) and the previous one is taken; `say`
    tells the log which and why."""
    for found in reversed(complete_checkpoints(root)):
        problem = damage(found)
        if problem is None:
            return found
        aside = found.with_name(DAMAGED_PREFIX + found.name)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(found, aside)
        say(f"warning: {found.name} is damaged ({problem}): moved to {aside.name}; using the checkpoint before it")
    return None


def save_refusal(exc: BaseException, root: Path) -> UserError | None:
    """The error to show when training failed because the file system refused a checkpoint being written (the
    staging area holds its files): which place, how much, and the checkpoint kept. None for any other failure."""
    staging = root / STAGING
    if not staging.is_dir() or not any(staging.rglob("*")):
        return None
    kept = latest(root)
    refusal = write_refusal(exc, root, max(tree_bytes(kept) if kept else 0, tree_bytes(staging)))
    if refusal is None:
        return None
    shutil.rmtree(staging, ignore_errors=True)  # never used, and the space is needed
    resume = resume_command(root.parent)
    then = (f"{kept.name} is kept, whole: once there is room, resume from it: {resume}" if kept
            else f"there is no earlier checkpoint: once there is room, `{resume}` starts again from step 0")
    return UserError(f"a checkpoint was not written: {refusal}; {then}")
