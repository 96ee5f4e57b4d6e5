"""`hpclora submit RUN_DIR`: go on with a submitted run (or sweep, or one trial of it) that stopped at a checkpoint
and did not requeue: cancelled, out of requeues, failed. It submits the directory's own job again, with the launcher
it was submitted with, and records the new job in job.json (or sweep.json) and the job index, so that `status` and
`logs` follow the run to its newest job. Training resumes from the newest checkpoint; finished trials are skipped.
"""

from __future__ import annotations

import time
from pathlib import Path

from .. import config
from ..errors import UserError
from ..rundir import CONFIG_FILE, JOB_FILE, JOB_SCRIPT, SWEEP_FILE, config_hash
from . import slurm
from .launchers import launcher
from .submit import PreparedJob, describe_launched, record_submission
from .cancel import ended_state
from .watch import fill_states, read_record, resolve


def resubmit(directory: Path, overrides: list[str]) -> int:
    """Submit the job of a run, sweep or trial directory again (see above) and say so; the exit code of what ran here
    (launchers without a scheduler)."""
    if overrides:
        raise UserError(f"submit {directory}: a run directory goes on as it was submitted, without {' '.join(overrides)}; "
                        "changed settings make a new run (`hpclora submit CONFIG key=value`)")
    directory = target = directory.resolve()
    record = read_record(directory / SWEEP_FILE) or read_record(directory / JOB_FILE)
    tasks = None
    if record and "sweep_dir" in record:  # one trial: its task of the sweep's array
        tasks, directory = {record["task"]}, Path(record["sweep_dir"])
        record = read_record(directory / SWEEP_FILE)
    if record is None:
        raise UserError(f"{directory}: not a submitted run or sweep (no job.json or sweep.json); a run trained by hand "
                        f"goes on with `hpclora train {directory / CONFIG_FILE} --run-dir {directory}`")
    _refuse_while_active(target)
    script = (directory / JOB_SCRIPT).read_text(encoding="utf-8")
    if record["kind"] == "run":
        if (directory / "adapter").is_dir():
            raise UserError(f"{directory}: the run has finished (adapter saved): nothing to resume")
        job = PreparedJob("run", config.load(str(directory / CONFIG_FILE)), directory, script)
        how = launcher(record["launcher"], record.get("cluster") if record.get("cluster") not in (None, "auto") else None)
        started = how.start(job)
        entry = _entry(record, job, how.name, started.job_id, started.details)
        entry["log"] = started.logs[0]
    else:
        if record["launcher"] != "sbatch":
            raise UserError(f"{directory}: only sweeps submitted with sbatch go on as a job array again; go on with each "
                            "unfinished trial here: `hpclora train TRIAL_DIR/config.yaml --run-dir TRIAL_DIR`")
        todo = sorted({t["task"] for t in record["trials"]
                       if (tasks is None or t["task"] in tasks) and not (Path(t["run_dir"]) / "adapter").is_dir()})
        if not todo:
            raise UserError(f"{directory}: every trial asked for has finished (adapter saved): nothing to resume")
        first = config.load(str(Path(record["trials"][0]["run_dir"]) / CONFIG_FILE))
        job = PreparedJob("sweep", first, directory, script)
        job_id = slurm.sbatch(str(job.script_path), f"--array={','.join(map(str, todo))}")
        entry = _entry(record, job, "sbatch", job_id, {})
        entry["trials"] = [{**t, "log": job.log_path(job_id, t["trial"]) if t["task"] in todo else t["log"]} for t in record["trials"]]
    record_submission(job, entry)
    print(describe_launched(entry, job))
    return how.finish(job, started) if job.kind == "run" else 0


def _entry(record: dict, job: PreparedJob, launcher_name: str, job_id: str | None, details: dict) -> dict:
    """The record of the new submission, as submit writes it, with the job it resumes."""
    return {"kind": job.kind, "launcher": launcher_name, "job_id": job_id, "name": job.cfg.run.name, "dir": str(job.directory),
            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config_sha256": config_hash(config.to_yaml(job.cfg)),
            "resumes": record.get("job_id"), **details}


def _refuse_while_active(target: Path) -> None:
    """A job of this run (or of the sweep's trials) that is still queued or running resumes by itself: a second one
    would train beside it. Each run's newest job, as `status` finds it (submitted again by hpclora or by hand)."""
    if not slurm.available():
        return
    found = resolve(str(target))
    fill_states(found)
    active = [f"{row.job_id} ({row.state.split()[0]})" for row in found.rows
              if row.job_id and row.state[:1].isupper() and not ended_state(row.state)]  # Slurm's states, not the files'
    if active:
        raise UserError(f"{target}: job {', '.join(active)} has not ended: it resumes by itself after a stop "
                        f"(`hpclora cancel {active[0].split()[0]}` ends it, keeping a checkpoint)")
