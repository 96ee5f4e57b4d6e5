"""Which jobs this user submitted, and where their run directories and logs are.

`hpclora submit` and `sweep` write `job.json` into the run (or sweep) directory and append the same
record to a per-user index, so that `hpclora status` and `hpclora logs JOB` can go from a job id to
its files without asking Slurm, which forgets finished jobs after a few minutes.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..catalog.state import state_dir
from ..rundir import json_lines


def index_path() -> Path:
    return state_dir() / "jobs.jsonl"


def record(entry: dict) -> None:
    """Remember a submission: one JSON line, appended (appends of one short line do not interleave)."""
    path = index_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, ensure_ascii=False) + "\n")


TEXT, MAYBE_TEXT = (str,), (str, type(None))
# What each record hpclora writes holds (submit.launch): read back only when it does.
RECORD_FIELDS = {"kind": TEXT, "job_id": MAYBE_TEXT, "launcher": TEXT, "dir": TEXT}
TRIAL_FIELDS = {"task": (int,), "overrides": (list,), "run_dir": TEXT, "log": MAYBE_TEXT}


def record_problem(record: dict) -> str | None:
    """What a job.json, sweep.json or job index entry lacks of what submit writes, or None."""
    trial = "sweep_dir" in record
    fields = {**TRIAL_FIELDS, "job_id": MAYBE_TEXT, "sweep_dir": TEXT} if trial else RECORD_FIELDS
    wrong = [key for key, types in fields.items() if not isinstance(record.get(key), types) or isinstance(record.get(key), bool)]
    if not trial and record.get("kind") == "sweep":
        trials = record.get("trials", [])
        if not isinstance(trials, list) or not all(isinstance(t, dict) and not any(
                not isinstance(t.get(k), types) or isinstance(t.get(k), bool) for k, types in TRIAL_FIELDS.items()) for t in trials):
            wrong.append("trials")
    return f"{', '.join(wrong)} missing or of the wrong kind" if wrong else None


def entries() -> list[dict]:
    """All remembered submissions, oldest first; lines that are no such record are skipped."""
    return [entry for entry in json_lines(index_path()) if record_problem(entry) is None]


def find(job_id: str) -> dict | None:
    """The newest record of a job id (`123`, or the array id of `123_4`)."""
    array_id = job_id.split("_", 1)[0]
    for entry in reversed(entries()):
        if str(entry.get("job_id")) in (job_id, array_id):
            return entry
    return None
