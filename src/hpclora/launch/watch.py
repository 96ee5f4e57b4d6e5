"""`hpclora status`, `logs` and `cancel`: from a job id, run directory or sweep directory to the job's
state (squeue, then sacct), its log and the last progress line in it.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..rundir import EXPORT_RECORD, JOB_FILE, SWEEP_FILE, attempts, metric_entries, read_json
from . import registry, slurm

JOB_ID = re.compile(r"^\d+(_\d+)?$")
# Lines of a job log that say how far it got (see progress.py and train.py), or why it stopped.
PROGRESS_LINE = re.compile(r"^(step \d|eval |done:|val_loss |adapter saved|error:|\w*(Error|Exception)\b)")


@dataclass
class Row:
    job_id: str | None  # `123`, `123_4` for an array task, None for an in-process run
    label: str  # run name, or a trial's overrides
    run_dir: str | None
    log: str | None
    state: str = ""
    elapsed: str = ""
    exit_code: str = ""
    node: str = ""
    last: str = ""  # the last progress line of the log
    restarts: str = ""  # how often training started again in this run directory (requeues, resubmits)


@dataclass
class Target:
    rows: list[Row]
    title: str  # what was asked about, in words
    notes: list[str]
    table: bool = False  # one row per job or trial, even when there is only one
    recorded: bool = True  # False: a bare job id that hpclora's job index does not have


def resolve(target: str | None) -> Target:
    """The rows a status/logs/cancel target stands for: one per job, or per trial for a sweep."""
    if target is None:
        recent = registry.entries()[-20:]
        if not recent:
            raise UserError(f"no submitted jobs recorded in {registry.index_path()}: give a JOB id or a run directory")
        rows = [row for entry in recent for row in _entry_rows(entry, overview=True)]
        newest = {row.run_dir or id(row): row for row in _follow_runs(rows, [])}  # a run resubmitted: its newest job once
        return Target(list(newest.values()), f"recent jobs ({registry.index_path()})", [], table=True)
    path = Path(target).expanduser()
    if path.is_dir():
        found = _directory_target(path.resolve())
    elif JOB_ID.match(target):
        entry = registry.find(target)
        if entry is None:  # submitted some other way: ask Slurm
            return Target([Row(target, "", None, slurm.log_from_controller(target))], f"job {target}", [], recorded=False)
        rows = _entry_rows(entry)
        if "_" in target:
            rows = [r for r in rows if r.job_id == target] or [Row(target, "", None, None)]
        found = Target(rows, f"{entry['kind']} {entry['job_id']} ({entry['launcher']}) in {entry['dir']}", [], table=len(rows) > 1)
    else:
        raise UserError(f"{target}: neither a job id (123 or 123_4) nor a run or sweep directory")
    _follow_runs(found.rows, found.notes)
    return found


def _follow_runs(rows: list[Row], notes: list[str]) -> list[Row]:
    """Each row turned to its run's newest job: a run goes on in later jobs, which `hpclora submit RUN_DIR` records in
    its job.json, and which a hand-typed `sbatch RUN_DIR/job.sbatch` leaves only in the attempts its training records."""
    for row in rows:
        if not (row.run_dir and row.job_id):
            continue
        run_dir = Path(row.run_dir)
        newest, log, since = row.job_id, row.log, ""
        record = read_json(run_dir / JOB_FILE) or {}
        if isinstance(record.get("job_id"), str):
            newest = f"{record['job_id']}_{record['task']}" if "sweep_dir" in record else record["job_id"]
            log, since = record.get("log") or log, str(record.get("submitted", ""))
        started = (attempts(run_dir) or [{}])[-1]
        if started.get("slurm_job") and str(started.get("started", "")) > since and started["slurm_job"] != newest:
            if log:  # the same script's log, of the other job (%j)
                log = re.sub(rf"-{re.escape(newest)}\.out$", f"-{started['slurm_job']}.out", log)
            newest = started["slurm_job"]
        if newest != row.job_id:
            notes.append(f"job {row.job_id} of {row.run_dir} went on as job {newest}")
            row.job_id, row.log = newest, log
    return rows


def read_record(path: Path) -> dict | None:
    """The record at `path`, or None without one; a UserError for one that is no longer what submit wrote."""
    record = read_json(path)
    if record is None and path.exists():
        raise UserError(f"{path}: not a JSON record (cut short, or edited?); `hpclora status JOB_ID` asks Slurm instead")
    if record is not None and (problem := registry.record_problem(record)):
        raise UserError(f"{path}: not the record hpclora wrote ({problem}); `hpclora status JOB_ID` asks Slurm instead")
    return record


def _directory_target(path: Path) -> Target:
    sweep = read_record(path / SWEEP_FILE)
    if sweep:
        return Target(_entry_rows(sweep), f"sweep {sweep['job_id']} ({sweep['launcher']}) in {path}", [], table=True)
    job = read_record(path / JOB_FILE)
    if job and "sweep_dir" in job:  # one trial of a sweep
        return Target([_trial_row(job["job_id"], job)], f"trial {job['task']} of sweep {job['sweep_dir']}", [])
    if job:
        return Target(_entry_rows(job), f"run {path}", [])
    if (path / "config.yaml").exists():
        return Target([Row(None, path.name, str(path), None)], f"run {path} (trained in-process)", [])
    raise UserError(f"{path}: not a run or sweep directory (no job.json, sweep.json or config.yaml)")


def _trial_row(job_id: str | None, trial: dict) -> Row:
    task_id = f"{job_id}_{trial['task']}" if job_id else None
    return Row(task_id, " ".join(trial["overrides"]), trial["run_dir"], trial.get("log"))


def _entry_rows(entry: dict, overview: bool = False) -> list[Row]:
    if entry["kind"] == "sweep":
        if overview:  # one line per sweep; its trials are one `hpclora status SWEEP_DIR` away
            return [Row(str(entry["job_id"]), f"{entry['name']} (sweep, {len(entry.get('trials', []))} trials)", entry["dir"], None)]
        sweep = read_json(Path(entry["dir"]) / SWEEP_FILE) or entry
        return [_trial_row(sweep["job_id"], t) for t in sweep.get("trials", [])]
    job_id = str(entry["job_id"]) if entry.get("job_id") else None
    return [Row(job_id, entry.get("name", ""), entry.get("dir"), entry.get("log"))]


def fill_states(target: Target) -> None:
    """Ask Slurm about every row's job at once; fall back to the run directory's own files."""
    ids = [r.job_id for r in target.rows if r.job_id]
    states, accounted = {}, True
    if ids and slurm.available():
        states, accounted = slurm.job_states(sorted({i.split("_")[0] for i in ids}))
    for row in target.rows:
        known = states.get(row.job_id or "")
        tasks = [st.state for key, st in states.items() if row.job_id and key.startswith(f"{row.job_id}_")]
        if not known and tasks:  # a whole sweep in one row: how many tasks are in which state
            row.state = ", ".join(f"{tasks.count(s)} {s}" for s in sorted(set(tasks)))
        elif known:
            row.state, row.elapsed, row.exit_code, row.node = known.state, known.elapsed, known.exit_code, known.node
            if known.reason:
                row.state += f" ({known.reason})"
        else:
            row.state = _state_from_files(row)
        row.last = _finished(row) or (last_progress_line(Path(row.log)) if row.log else _progress_from_metrics(row))
        row.restarts = _restarts(row)
    if ids and not slurm.available():
        target.notes.append("Slurm commands are not available here: states come from the run directories")
    elif not accounted:
        target.notes.append("Slurm accounting (sacct) is off: finished jobs are judged by their run directories")


def _restarts(row: Row) -> str:
    """Restarts recorded by training in attempts.jsonl (one line per start)."""
    starts = len(attempts(Path(row.run_dir))) if row.run_dir else 0
    return str(starts - 1) if starts else ""


def _state_from_files(row: Row) -> str:
    if row.run_dir and (Path(row.run_dir) / "adapter").is_dir():
        return "finished (adapter saved)"
    if row.run_dir and (Path(row.run_dir) / EXPORT_RECORD).is_file():  # an export job's directory
        return "finished (exported)"
    if row.job_id is None:
        return "no adapter yet"
    return "unknown to Slurm"


def last_progress_line(path: Path, tail_bytes: int = 65536) -> str:
    """The last line of a log that says how far the run got (or its last line at all)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - tail_bytes))
            lines = [line.strip() for line in fh.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        return "(no log yet)"
    for line in reversed(lines):
        if PROGRESS_LINE.match(line):
            return line
    return lines[-1] if lines else "(log is empty)"


def _finished(row: Row) -> str:
    """What a finished run came to (its summary.json beside the adapter), or "" for one that has not finished."""
    if not row.run_dir or not (Path(row.run_dir) / "adapter").is_dir():
        return ""
    summary = read_json(Path(row.run_dir) / "summary.json") or {}
    base, final, steps = summary.get("base_val_loss"), summary.get("final_val_loss"), summary.get("steps")
    if not all(isinstance(x, (int, float)) for x in (final, steps)):
        return ""
    measured = f"val_loss base {base:.4f} -> adapter {final:.4f} ({final - base:+.4f})" if isinstance(base, (int, float)) \
        else f"val_loss {final:.4f}"
    return f"finished: {measured} after {steps} steps"


def _progress_from_metrics(row: Row) -> str:
    if not row.run_dir:
        return ""
    try:
        entry = metric_entries(Path(row.run_dir) / "metrics.jsonl")[-1]
    except (OSError, IndexError):
        return ""
    if "val_loss" in entry:
        return f"eval {entry.get('eval', '')} @ step {entry['step']} | val_loss {entry['val_loss']:.4f}"
    return f"step {entry['step']}/{entry.get('max_steps', '?')} | loss {entry['loss']:.4f}"


def format_status(target: Target) -> str:
    lines = [target.title]
    if not target.table:
        r = target.rows[0]
        details = [("job", r.job_id or "-"), ("state", r.state), ("exit code", r.exit_code), ("elapsed", r.elapsed),
                   ("node", r.node), ("restarts", r.restarts), ("run dir", r.run_dir), ("log", r.log), ("progress", r.last)]
        lines += [f"  {k:<10} {v}" for k, v in details if v]
    else:
        header = ("JOB", "STATE", "ELAPSED", "EXIT", "NODE", "RESTARTS", "RUN", "PROGRESS")
        table = [header] + [
            (r.job_id or "-", r.state, r.elapsed, r.exit_code, r.node, r.restarts, r.label, r.last) for r in target.rows
        ]
        widths = [max(len(str(row[i])) for row in table) for i in range(len(header) - 1)]
        lines += ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)) + "  " + str(row[-1]) for row in table]
    lines += [f"note: {n}" for n in target.notes]
    return "\n".join(lines)


def require_known(target: Target) -> None:
    """After fill_states: a bare job id that neither Slurm nor hpclora's job index has is a mistake."""
    if not target.recorded and target.rows[0].state == "unknown to Slurm":
        raise UserError(
            f"job {target.rows[0].job_id} is unknown to Slurm (neither squeue nor sacct has it) and to hpclora's job "
            f"index {registry.index_path()}: check the id (`hpclora status` lists recent jobs)"
        )


def ended(target: Target) -> bool:
    """After fill_states: whether every job of the target has ended or is ending (nothing left to cancel)."""
    states = [r.state.split()[0] for r in target.rows if r.job_id and r.state]
    return bool(states) and all(s in slurm.FINAL_STATES or s in ("COMPLETING", "finished") for s in states)


def cancel_ids(target: Target) -> list[str]:
    """What to scancel: a whole sweep by its array id, else each named job or task."""
    ids = [r.job_id for r in target.rows if r.job_id]
    if target.table and len(ids) > 1 and all("_" in i for i in ids):
        return sorted({i.split("_")[0] for i in ids})
    return ids


def find_log(target: str) -> tuple[Row, Path]:
    """The one log file a `hpclora logs` target names."""
    resolved = resolve(target)
    with_logs = [r for r in resolved.rows if r.log]
    if len(resolved.rows) > 1:
        tasks = ", ".join(r.job_id or "?" for r in resolved.rows)
        raise UserError(f"{target} has {len(resolved.rows)} tasks: name one of {tasks}")
    if not with_logs:
        glob = sorted(Path("logs").glob(f"*-{target}.out")) if JOB_ID.match(target) else []
        if glob:
            return resolved.rows[0], glob[0]
        raise UserError(f"{target}: no log file known (was it run in-process? its output went to the terminal)")
    row = with_logs[0]
    return row, Path(row.log)


def follow(path: Path, job_id: str | None, poll_s: float = 1.0, out=sys.stdout) -> None:
    """Print the log and keep printing what is appended, until the job has left the queue."""
    position, last_check, finished = 0, 0.0, False
    while True:
        if path.exists():
            with open(path, "rb") as fh:
                fh.seek(position)
                chunk = fh.read()
            if chunk:
                out.write(chunk.decode("utf-8", "replace"))
                out.flush()
                position += len(chunk)
        if finished:
            return
        if job_id and slurm.available() and time.time() - last_check > 5 * poll_s:
            last_check = time.time()
            states = slurm.queue_states([job_id.split("_")[0]])
            finished = job_id not in states and not any(k.startswith(job_id + "_") for k in states)
            if finished:
                continue  # one more read picks up the job's last lines
        time.sleep(poll_s)


def job_states(target: str) -> dict[str, str]:
    """The state of each job or array task of a target by id (by run directory for an in-process run), from Slurm,
    or from the run directories where Slurm has forgotten."""
    found = resolve(target)
    fill_states(found)
    return {row.job_id or str(row.run_dir): row.state.split()[0] if row.state else "" for row in found.rows}


def wait(target: str, poll_s: float = 5.0, timeout: float | None = None, say=None, progress=None) -> dict[str, str]:
    """Until every job of a target (a run or sweep directory, or a job id) has ended, requeues included; the final
    state of each by job id (run directory for an in-process run). `say(states)` hears every change, of the states
    or of what `progress()` says (the probe's step). The one wait loop: `Submission.wait` and `hpclora probe` use
    it. Raises TimeoutError after `timeout` s."""
    deadline = None if timeout is None else time.time() + timeout
    last = None
    while True:
        states = job_states(target)
        now = (states, progress() if progress else None)
        if say is not None and now != last:
            say(states)
            last = now
        if states and all(s in slurm.FINAL_STATES or s == "finished" for s in states.values()):
            return states
        if deadline is not None and time.time() > deadline:
            raise TimeoutError(f"{target}: still running after {timeout} s: {states}")
        time.sleep(poll_s)


def status_text(target: str | None) -> str:
    """`hpclora status [TARGET]`."""
    found = resolve(target)
    fill_states(found)
    require_known(found)
    return format_status(found)


def states_by_run_dir(target: str) -> dict[str, str]:
    """Each run directory's job state (a sweep's trials), for `hpclora report`."""
    found = resolve(target)
    fill_states(found)
    return {row.run_dir: row.state for row in found.rows}


def show_log(job: str, follow_it: bool, out=sys.stdout) -> None:
    """`hpclora logs JOB [-f]`: the job's log, and with `follow_it` what is appended until the job leaves the queue."""
    row, path = find_log(job)
    if follow_it:
        follow(path, row.job_id, out=out)
        if not path.exists():
            raise no_log(row, path)
        return
    try:
        out.write(path.read_text(encoding="utf-8", errors="replace"))
    except FileNotFoundError:
        raise no_log(row, path) from None


def no_log(row: Row, path: Path) -> UserError:
    """Why a job has no log: it has not started yet, or it ended (cancelled, failed) before it did."""
    fill_states(Target([row], "", []))
    state = row.state.split()[0] if row.state else ""
    if state in slurm.FINAL_STATES:
        return UserError(f"{path}: no log: job {row.job_id} ended {state} before it started, so it wrote none")
    return UserError(f"{path}: the log does not exist yet (job {row.job_id} {state or 'has not started'}); "
                     "try again with -f to wait for it")
