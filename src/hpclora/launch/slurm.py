"""The Slurm commands hpclora calls: sbatch, squeue, sacct, scontrol, scancel. Arguments are argv lists,
never shell strings. States come from squeue while a job is known to the controller and from sacct
(accounting) after that; a cluster without accounting still answers for queued and running jobs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

from ..config.slurm_syntax import slurm_seconds, slurm_time
from ..errors import NotSubmitted, UserError

# Job states after which nothing more will happen to a job (sacct's spelling).
FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED",
}


@dataclass
class JobState:
    job_id: str  # `123`, or `123_4` for an array task
    state: str  # RUNNING, PENDING, COMPLETED, FAILED, ... ("CANCELLED by 0" is shortened to CANCELLED)
    elapsed: str = ""
    exit_code: str = ""  # `0:0` = exit code 0, signal 0
    node: str = ""
    reason: str = ""  # why a pending job waits

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


def available() -> bool:
    return shutil.which("sbatch") is not None


class NoAnswer(UserError):
    """A Slurm command that did not answer in time."""


def run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        raise UserError(f"{argv[0]}: command not found. Run this on a Slurm login node (or use --launcher local).")
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise NoAnswer(f"{argv[0]} did not answer within {timeout:.0f} s (the Slurm controller is busy or down): try again later") from None


def sbatch_timeout_s() -> float:
    """How long sbatch may take to answer: $HPCLORA_SBATCH_TIMEOUT_S, 120 s by default (a busy controller
    answers late; Slurm's own retries take about a minute)."""
    try:
        return float(os.environ.get("HPCLORA_SBATCH_TIMEOUT_S") or 120)
    except ValueError:
        raise UserError(f"HPCLORA_SBATCH_TIMEOUT_S: expected seconds, got {os.environ['HPCLORA_SBATCH_TIMEOUT_S']!r}") from None


def sbatch(script: str, *options: str) -> str:
    """Submit a script file; return the job id. Slurm's refusal is NotSubmitted, with its message. When sbatch
    does not answer in time the job may be queued all the same: the queue is asked for a job of this very
    script, and without one this is a UserError that says the job's fate is unknown (never NotSubmitted)."""
    timeout = sbatch_timeout_s()
    try:
        done = run(["sbatch", "--parsable", *options, script], timeout=timeout)
    except NoAnswer:
        for _ in range(3):  # the controller may record the submission a moment after sbatch was stopped
            if (job_id := queued_job_of(script)) is not None:
                print(f"warning: sbatch did not answer within {timeout:.0f} s, but job {job_id} of {script} is queued: recorded",
                      file=sys.stderr)
                return job_id
            time.sleep(2)
        raise UserError(
            f"sbatch did not answer within {timeout:.0f} s (HPCLORA_SBATCH_TIMEOUT_S), and no job of {script} is in the queue "
            "yet: it may still appear. Check with `squeue --me`; the run directory is kept for it"
        ) from None
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().replace("sbatch: error: ", "")
        raise NotSubmitted(f"sbatch refused the job: {message}")
    job_id = done.stdout.strip().split(";")[0]  # `--parsable` prints `id` or `id;cluster`
    if not job_id.isdigit():  # an sbatch option that submits nothing, or a wrapper that prints something else
        said = " ".join((done.stdout + done.stderr).split())[:300] or "nothing"
        raise NotSubmitted(f"sbatch queued no job (it said: {said})")
    return job_id


def queued_job_of(script: str) -> str | None:
    """The id of this user's queued or running job whose batch script is `script`, or None."""
    try:
        done = subprocess.run(["squeue", "--noheader", "--me", "--format=%i|%o"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    for line in done.stdout.splitlines() if done.returncode == 0 else []:
        job_id, _, command = line.strip().partition("|")
        if command == script:
            return job_id.split("_")[0]  # an array's tasks: the array id
    return None


def cancel(job_id: str) -> None:
    done = run(["scancel", job_id])
    if done.returncode != 0:
        raise UserError(f"scancel {job_id}: {done.stderr.strip()}")


def queue_states(job_ids: list[str]) -> dict[str, JobState]:
    """Pending and running jobs (array tasks one by one) from squeue."""
    done = run(["squeue", "--noheader", "--array", "--jobs", ",".join(job_ids), "--format=%i|%T|%M|%N|%r"])
    states = {}
    if done.returncode != 0:  # squeue errors on ids it no longer knows: they are simply not queued
        return states
    for line in done.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 5:
            job_id, state, elapsed, node, reason = parts
            states[job_id] = JobState(job_id, state, as_clock(elapsed), "", node, "" if reason == "None" else reason)
    return states


def as_clock(elapsed: str) -> str:
    """squeue's elapsed time (`2:32`, minutes and seconds) as sacct and the logs show durations (`00:02:32`)."""
    try:
        return slurm_time(slurm_seconds(elapsed))
    except ValueError:
        return elapsed


def accounting_states(job_ids: list[str]) -> dict[str, JobState] | None:
    """Every job's latest record from sacct; None when accounting is off.

    Array tasks that have not started yet appear in sacct as one `123_[2-5%2]` line: squeue lists those.
    """
    done = run([
        "sacct", "--noheader", "--parsable2", "--allocations", "--duplicates",
        "--jobs", ",".join(job_ids), "--format=JobID,State,Elapsed,ExitCode,NodeList",
    ])
    if done.returncode != 0:
        return None
    states = {}
    for line in done.stdout.splitlines():  # with --duplicates the newest record of a requeued job comes last
        parts = line.split("|")
        if len(parts) == 5 and "[" not in parts[0]:
            job_id, state, elapsed, exit_code, node = parts
            states[job_id] = JobState(job_id, state.split()[0], elapsed, exit_code, "" if node == "None assigned" else node)
    return states


def job_states(job_ids: list[str]) -> tuple[dict[str, JobState], bool]:
    """States of jobs and array tasks, and whether accounting answered.

    The queue is asked first, as it is current; accounting fills in finished jobs.
    """
    accounted = accounting_states(job_ids)
    states = dict(accounted or {})
    states.update(queue_states(job_ids))
    return states, accounted is not None


def log_from_controller(job_id: str) -> str | None:
    """StdOut of a job the controller still remembers (for jobs submitted without hpclora)."""
    done = run(["scontrol", "show", "job", "--oneliner", job_id])
    match = re.search(r"\bStdOut=(\S.*?)(?= \w+=|$)", done.stdout) if done.returncode == 0 else None
    return match.group(1) if match else None
