"""`hpclora submit` and `hpclora sweep`: validate, write the run (or sweep) directory, launch.

A run directory is created before submission and holds everything the job needs: the resolved
config.yaml and the job.sbatch that runs it. A sweep directory holds one trial-NNN run directory per
trial, sweep.json (array task id -> overrides), and one job.sbatch submitted as a single job array.
How the written job starts (sbatch, submitit, here) is launchers.py's.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import config
from ..catalog import hub
from ..config import RunConfig, world_size
from ..errors import ConfigError, NotSubmitted, UserError
from ..rundir import CONFIG_FILE, JOB_FILE, JOB_SCRIPT, SWEEP_FILE, config_hash, mark_run_dir, new_run_dir, write_config, write_json, write_text_atomic
from ..plan import check_before_submit, preflight
from . import registry, render
from .sweep import parse_grid, trials


@dataclass
class PreparedJob:
    """A run or a sweep, resolved and rendered, not yet written or submitted."""

    kind: str  # "run" or "sweep"
    cfg: RunConfig  # the run's config; for a sweep the first trial's (resources are the same for all)
    directory: Path  # the run directory, or the sweep directory
    script: str  # job.sbatch text
    trial_cfgs: list[RunConfig] = field(default_factory=list)
    trial_overrides: list[list[str]] = field(default_factory=list)
    max_parallel: int | None = None
    trials_per_task: int = 1  # sweep --trials-per-node
    handles: list = field(default_factory=list)  # once launched with submitit: its Job objects
    plan_lines: list[str] = field(default_factory=list)  # what the planner said (fits, strategy, slurm.time: auto)

    def array_task(self, trial: int) -> int:
        """The array task that runs `trial`."""
        return trial // self.trials_per_task

    @property
    def run_dirs(self) -> list[Path]:
        if self.kind == "run":
            return [self.directory]
        return [self.directory / f"trial-{i:03d}" for i in range(len(self.trial_cfgs))]

    @property
    def script_path(self) -> Path:
        return self.directory / JOB_SCRIPT

    def log_path(self, job_id: str, task: int | None = None) -> str:
        return render.log_path(self.cfg, job_id, task)


def check_runs(cfgs: list[RunConfig], force: bool, whole_node_gb: float | None = None) -> list[str]:
    """Everything the login node checks before a job is queued: each config's data rows and model context
    (plan.preflight), then the planner (plan.gate), which may refuse and which decides the `auto` settings the
    job's config.yaml records. Returns the planner's lines."""
    warnings = {data["warning"] for cfg in cfgs if (data := preflight.check(cfg)) and data["warning"]}
    said = dict.fromkeys(note for cfg in cfgs for note in preflight.notes(cfg))  # once for a sweep's trials, in order
    return [*sorted(warnings), *said, *check_before_submit(cfgs, force, whole_node_gb)]


def prepare_job(cfg: RunConfig, force: bool = False, python: str = sys.executable, whole_node_gb: float | None = None) -> PreparedJob:
    """One run, checked (check_runs) and rendered: its new run directory (not made yet) and job script."""
    lines = check_runs([cfg], force, whole_node_gb)
    directory = new_run_dir(cfg.run.output_root, cfg.run.name)
    script = render.render_script(cfg, render.Payload(python=python, run_dir=str(directory)))
    return PreparedJob("run", cfg, directory, script, plan_lines=lines)


def prepare_sweep(
    config_path: str, overrides: list[str], grid_specs: list[str], max_parallel: int | None,
    force: bool = False, trials_per_node: int = 1, python: str = sys.executable, whole_node_gb: float | None = None,
) -> PreparedJob:
    """Resolve and check every trial first (check_runs): a bad value in any trial stops the sweep before anything
    is written. `trials_per_node` > 1 packs that many one-GPU (or one-process CPU) trials into each array task."""
    if not grid_specs:
        raise UserError("sweep: give at least one --grid key=value1,value2")
    if max_parallel is not None and max_parallel < 1:
        raise UserError(f"sweep: --max-parallel must be at least 1, got {max_parallel}")
    if trials_per_node < 1:
        raise UserError(f"sweep: --trials-per-node must be at least 1, got {trials_per_node}")
    trial_overrides = trials(parse_grid(grid_specs))
    cfgs, problems = [], []
    for i, extra in enumerate(trial_overrides):
        try:
            cfgs.append(config.load(config_path, [*overrides, *extra]))
        except ConfigError as exc:
            problems += [(f"trial {i} ({' '.join(extra)}): {key}", msg) for key, msg in exc.problems]
    if problems:
        raise ConfigError(problems)
    lines = check_runs(cfgs, force, whole_node_gb)  # may refuse, and fills slurm.time: auto, before anything is rendered
    first = cfgs[0]
    if trials_per_node > 1 and (first.slurm.gpus > 1 or world_size(first) > 1):
        raise UserError(
            f"sweep: --trials-per-node packs trials of one GPU each (or one CPU process), and each of these trials has "
            f"{world_size(first)} ranks (slurm.nodes x slurm.gpus): set slurm.gpus=1, or drop --trials-per-node"
        )
    named = first.run.name  # `my-ja-sweep` stays that, not my-ja-sweep-sweep
    directory = new_run_dir(first.run.output_root, named if re.search(r"sweep$", named, re.IGNORECASE) else f"{named}-sweep")
    payload = render.Payload(python=python, sweep_dir=str(directory), trials=len(cfgs), max_parallel=max_parallel,
                             trials_per_task=trials_per_node)
    script = render.render_script(first, payload, submitted_by="hpclora sweep")
    refuse_per_script_keys(cfgs, trial_overrides, payload, script)
    return PreparedJob("sweep", first, directory, script, cfgs, trial_overrides, max_parallel, trials_per_node, plan_lines=lines)


def refuse_per_script_keys(cfgs: list[RunConfig], trial_overrides: list[list[str]], payload, script: str) -> None:
    """A job array runs one script for all its trials: a grid key that the script holds (cache.hf_home,
    train.cpu_ranks, train.preempt_grace_s, what a container binds, ...) would quietly take the first trial's value
    for every trial. Named by comparing each trial's own script with the first's."""
    varying = set()
    for cfg, extra in zip(cfgs[1:], trial_overrides[1:]):
        changed = [item.partition("=")[0] for item, first in zip(extra, trial_overrides[0]) if item != first]
        # The grid is a full product: each key's values appear in trials that differ from the first in it alone.
        if len(changed) == 1 and render.render_script(cfg, payload, submitted_by="hpclora sweep") != script:
            varying.add(changed[0])
    if varying:
        raise ConfigError([(key, "cannot vary within one sweep: every trial of a job array runs the same job script, and "
                                 "this key is written into it; run a sweep per value instead") for key in sorted(varying)])


def write(job: PreparedJob) -> None:
    """Create the directory (never an existing one) with configs and the job script."""
    job.directory.mkdir(parents=True)
    Path(job.cfg.slurm.log_dir).mkdir(parents=True, exist_ok=True)
    if job.kind == "run":
        mark_run_dir(job.directory)
        write_config(job.directory, job.cfg)
    else:
        for run_dir, cfg in zip(job.run_dirs, job.trial_cfgs):
            run_dir.mkdir()
            mark_run_dir(run_dir)
            write_config(run_dir, cfg)
    write_text_atomic(job.script_path, job.script)
    job.script_path.chmod(0o755)


def launch(job: PreparedJob, launcher) -> tuple[dict, int]:
    """Write, submit, record; for launchers without a scheduler, also run to the end.

    Returns the record kept in job.json / sweep.json and in the user's job index, and the exit code of
    what ran here (0 where a scheduler runs it).
    """
    write(job)
    try:
        started = launcher.start(job)
    except NotSubmitted:
        shutil.rmtree(job.directory, ignore_errors=True)  # nothing was submitted: leave no half-made run behind
        raise
    except BaseException as exc:  # the job may be queued (sbatch answered late, Ctrl-C while it ran): keep what it needs
        if isinstance(exc, UserError):
            raise UserError(f"{exc}; {job.kind} directory kept: {job.directory}") from None
        print(f"error: the submission was interrupted; the job may be queued all the same (`squeue --me`), and its "
              f"{job.kind} directory is kept: {job.directory}", file=sys.stderr)
        raise
    job.handles = started.handles
    entry = {
        "kind": job.kind, "launcher": launcher.name, "job_id": started.job_id, "name": job.cfg.run.name,
        "dir": str(job.directory), "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config_sha256": config_hash(config.to_yaml(job.cfg)), **started.details,
    }
    if job.kind == "run":
        entry["log"] = started.logs[0]
    else:
        entry["trials"] = [
            {"task": job.array_task(i), "trial": i, "overrides": extra, "run_dir": str(d), "log": log}
            for i, (extra, d, log) in enumerate(zip(job.trial_overrides, job.run_dirs, started.logs))
        ]
    record_submission(job, entry)
    return entry, launcher.finish(job, started)


def record_submission(job: PreparedJob, entry: dict) -> None:
    """job.json (run) or sweep.json + one job.json per trial (sweep), and the user's job index."""
    if job.kind == "run":
        write_json(job.directory / JOB_FILE, entry)
    else:
        write_json(job.directory / SWEEP_FILE, entry)
        for trial in entry["trials"]:
            trial_record = {**trial, "job_id": entry["job_id"], "launcher": entry["launcher"], "sweep_dir": entry["dir"],
                            "submitted": entry["submitted"]}
            write_json(Path(trial["run_dir"]) / JOB_FILE, trial_record)
    if entry["job_id"] is not None:
        registry.record(entry)


def describe_launched(entry: dict, job: PreparedJob) -> str:
    """What `submit`, `sweep` and `probe` print once a job is submitted (or has run here)."""
    what = "sweep" if job.kind == "sweep" else "run"
    lines = [f"submitted {what} as job {entry['job_id']} ({entry['launcher']})"] if entry["job_id"] is not None else []
    lines.append(f"{what} directory: {entry['dir']}")
    if entry.get("log"):
        lines.append(f"log: {entry['log']}")
    for trial in entry.get("trials", []):
        lines.append(f"  task {trial['task']}" + (f", trial {trial['trial']}" if job.trials_per_task > 1 else "")
                     + f": {' '.join(trial['overrides'])} -> {trial['run_dir']}" + (f"\n      log: {trial['log']}" if trial["log"] else ""))
    if entry["job_id"] is not None and entry.get("cluster") not in ("local", "debug"):  # a Slurm job (sbatch or submitit)
        first = entry["job_id"] if job.kind == "run" else f"{entry['job_id']}_0"
        lines.append(f"watch it: hpclora status {entry['job_id']}   |   hpclora logs {first} -f")
    return "\n".join(lines)


def describe_dry_run(job: PreparedJob, launcher) -> str:
    """`--dry-run`: the job script, and what would be written and run."""
    if job.kind == "run":
        return f"{job.script}\n# dry run: would write {job.directory}/{{{CONFIG_FILE},{JOB_SCRIPT}}} and run: {launcher.describe(job)}"
    trials = "\n".join(f"#   task {job.array_task(i)}: trial {i}: {' '.join(extra)}" for i, extra in enumerate(job.trial_overrides))
    return (f"{job.script}\n# dry run: {len(job.trial_cfgs)} trials as one job array in {job.directory}:\n{trials}\n"
            f"# would run: {launcher.describe(job)}")


def staging_warning(cfg: RunConfig, config_path: str | None) -> str | None:
    """Where jobs run offline and the shared cache lacks what the run needs: the warning that says how to stage it."""
    missing = hub.missing_from_cache(cfg) if cfg.cache.offline_jobs else []
    if not missing:
        return None
    return (f"warning: jobs run offline, and the Hugging Face cache at {hub.hf_home(cfg)} lacks {', '.join(missing)}: "
            f"run `{hub.stage_command(config_path)}` on a node with internet first, or the job will stop at once")
