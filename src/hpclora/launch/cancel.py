"""`hpclora cancel`: end a job without losing its work.

scancel sends TERM and, KillWait later (30 s by default), KILL: a training step and its checkpoint that take longer
are lost. So a job that is training is asked instead, by a request file in its run directory, to checkpoint at its
next step boundary; its job script then cancels the job rather than requeueing it, and the job ends CANCELLED with
its checkpoint whole. Jobs that have not begun training (pending, or still in their setup) have nothing to lose
and are cancelled at once, as is everything with `--now`.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import UserError
from ..rundir import attempts, resume_command
from ..stops import CANCEL_REQUEST, CANCEL_WAIT_S
from . import slurm
from .watch import Row, cancel_ids, ended, fill_states, require_known, resolve

POLL_S = 2.0


def cancel(target: str, now: bool = False, wait_s: float = CANCEL_WAIT_S, say=print) -> list[str]:
    """Cancel every job of a target that has not ended, keeping the work of those that train (see above); what
    was done, in words. `say` hears the waiting as it happens."""
    found = resolve(target)
    ids = cancel_ids(found)
    if not ids:
        raise UserError(f"{target}: no Slurm job to cancel (it ran in-process)")
    fill_states(found)
    require_known(found)
    if ended(found):
        return [f"{target}: already ended ({', '.join(sorted({r.state for r in found.rows}))}): nothing to cancel"]
    training = [] if now else [r for r in found.rows if _is_training(r)]
    if not training:
        for job_id in ids:
            slurm.cancel(job_id)
        lost = " (at once: what it trained since its last checkpoint is lost)" if now else ""
        return [f"cancelled {job_id}{lost}" for job_id in ids]

    for row in found.rows:  # nothing to save: pending tasks, jobs still in their setup
        if row not in training and row.job_id and not ended_state(row.state):
            slurm.cancel(row.job_id)
            say(f"cancelled {row.job_id} (it had not begun training)")
    for row in training:
        (Path(row.run_dir) / CANCEL_REQUEST).write_text(f"{row.job_id}\n", encoding="utf-8")
        say(f"job {row.job_id}: asked to save a checkpoint at its next step boundary and end; waiting up to "
            f"{wait_s:.0f} s (`hpclora cancel {row.job_id} --now` stops it at once, losing the steps since its last checkpoint)")
    waiting = {row.job_id: row for row in training}
    deadline = time.time() + wait_s
    while waiting and time.time() < deadline:
        time.sleep(POLL_S)
        states, _ = slurm.job_states(sorted({job_id.split("_")[0] for job_id in waiting}))
        for job_id in [j for j in waiting if j not in states or ended_state(states[j].state)]:
            waiting[job_id].state = states[job_id].state if job_id in states else waiting[job_id].state
            del waiting[job_id]
    done = [_saved(r) for r in training if r.job_id not in waiting]
    return done + [f"job {job_id}: still saving its checkpoint after {wait_s:.0f} s; it cancels itself once the checkpoint "
                   f"is whole (`hpclora status {job_id}` shows when; `hpclora cancel {job_id} --now` stops it at once)"
                   for job_id in waiting]


def ended_state(state: str) -> bool:
    return bool(state) and state.split()[0] in slurm.FINAL_STATES


def _is_training(row: Row) -> bool:
    """Whether this job has begun training in its run directory (the last start there is this job's): only then
    is there work to save."""
    if not (row.job_id and row.run_dir and row.state.startswith("RUNNING")):
        return False
    started = attempts(Path(row.run_dir))
    return bool(started) and started[-1].get("slurm_job") == row.job_id


def _saved(row: Row) -> str:
    """How the job ended: what its log says it saved, in its own words, and how to go on; or that it finished
    (or failed) before it could stop."""
    try:
        lines = Path(row.log).read_text(encoding="utf-8", errors="replace").splitlines() if row.log else []
    except OSError:
        lines = []
    said = [line.strip().split(": ")[0] for line in lines if line.lstrip().startswith("stopped by ")]
    if not said:
        return f"job {row.job_id} ended {row.state.split()[0] if row.state else ''} before it stopped: its log has the rest"
    return f"cancelled {row.job_id}: {said[-1]}: checkpoint saved; to resume: {resume_command(Path(row.run_dir))}"
