"""Which jobs this user submitted, and where their run directories and logs are.

`hpclora submit` and `sweep` write `job.json` into the run (or sweep) directory and append the same
record to a per-user index, so that `hpclora status` and `hpclora logs JOB` can go from a job id to
its files without asking Slurm, which forgets finished jobs after a few minutes.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..catalog.state import state_dir


def index_path() -> Path:
    return state_dir() / "jobs.jsonl"


def record(entry: dict) -> None:
    """Remember a submission: one JSON line, appended (appends of one short line do not interleave)."""
    path = index_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, ensure_ascii=False) + "\n")


def entries() -> list[dict]:
    """All remembered submissions, oldest first; unreadable lines are skipped."""
    try:
        lines = index_path().read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return found


def find(job_id: str) -> dict | None:
    """The newest record of a job id (`123`, or the array id of `123_4`)."""
    array_id = job_id.split("_", 1)[0]
    for entry in reversed(entries()):
        if str(entry.get("job_id")) in (job_id, array_id):
            return entry
    return None
