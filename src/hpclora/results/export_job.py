"""`hpclora export RUN --submit`: the export as a CPU job of its own, with the memory the merge needs.

A 7B model is merged in fp32 (about 29 GB of host memory), more than a login node gives one user. The job asks for what
plan/merge.py computes, no GPU, and runs the very `hpclora export` a user would run by hand: inside the run's
container image when it has one, with the run's environment (the shared cache, the offline switches), its
slurm.setup lines, its account, QoS and partition, and `slurm.KEY=VALUE` given to `export --submit` (slurm.partition=cpu).
What the login node can check is checked before anything is queued (results/export.export_target, the job's own rule). The job is not
requeued: an export starts over from nothing, and a stopped one leaves nothing under its final name.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import config
from ..config import RunConfig
from ..errors import ConfigError, NotSubmitted, UserError
from ..rundir import CONFIG_FILE, export_dir_name, write_text_atomic
from ..launch import command, registry, slurm
from ..launch.render import RUNTIME, Payload, header_lines, job_name, log_path, node_lines, prelude_lines, shell_words


@dataclass(frozen=True)
class ExportJob:
    cfg: RunConfig  # the job's: the run's config with the export job's name and resources
    run: Path
    target: Path  # the export directory the job writes
    script: str
    script_path: Path


def export_argv(run: Path, quant: str, target: Path, adapter_only: bool) -> list[str]:
    return ["export", str(run), "--quant", quant, "--out", str(target), *(["--adapter-only"] if adapter_only else [])]


def prepare(run_dir, quant: str, out, adapter_only: bool, overrides: list[str] = (), python: str = sys.executable) -> ExportJob:
    """The checked and rendered job (not written or submitted). `overrides`: slurm.* settings of the job, checked as a
    config's are; slurm.mem and slurm.time default to the planner's, not to the training job's."""
    from ..catalog.dims import find_dims
    from ..config.slurm_syntax import slurm_time
    from ..plan.memory import CPU_BASELINE_GB
    from ..plan.merge import merge_job_minutes, merge_memory_gb
    from .export import export_target
    from .llamacpp import find_llama_cpp
    from ..site.cluster import what_no_node_has

    if other := [item for item in overrides if not item.startswith("slurm.")]:
        raise UserError(f"export: {' '.join(other)}: only slurm.* settings (the job's resources) apply to an export")
    run = Path(run_dir).expanduser().resolve()
    target = export_target(run, quant, out, adapter_only).resolve()
    cfg = config.load(run / CONFIG_FILE, overrides, check_files=False)
    if not cfg.container.image:
        find_llama_cpp()  # the job runs this interpreter: it needs llama.cpp as much as an export here would
    given = {item.partition("=")[0] for item in overrides}
    dims, _ = find_dims(cfg)
    memory_gb = CPU_BASELINE_GB + 1 if adapter_only else merge_memory_gb(dims)  # an adapter alone: no model is loaded
    minutes = 30 if adapter_only else merge_job_minutes(dims)
    slurm_cfg = dataclasses.replace(
        cfg.slurm, gpus=0, nodes=1,
        mem=cfg.slurm.mem if "slurm.mem" in given else f"{math.ceil(memory_gb * 1e9 / 2 ** 30)}G",  # Slurm's G is 2^30 bytes
        time=cfg.slurm.time if "slurm.time" in given else slurm_time(60 * minutes),
        extra=cfg.slurm.extra if "slurm.extra" in given else [])  # the training job's extra options may ask for GPUs
    binds = [*cfg.container.binds, str(run), str(target.parent)]  # a run or --out outside run.output_root
    cfg = dataclasses.replace(cfg, slurm=slurm_cfg, container=dataclasses.replace(cfg.container, binds=binds))
    if beyond := what_no_node_has(cfg.slurm):
        raise ConfigError([(key, f"the export job: {problem}") for key, problem in beyond])
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=f"{cfg.run.name}-export"))  # the job's name and log
    memory = f"{memory_gb:.1f} GB, the merge's peak as the planner computes it" if "slurm.mem" not in given else "slurm.mem as given"
    lines = [
        *header_lines(cfg, Payload(python=python, run_dir=str(run)), "hpclora export --submit", requeue=False),
        f"# The export as a CPU job: memory {memory}; no GPU.",  # no user text in a comment: a line break would end it
        *prelude_lines(cfg),
        "PER_NODE=1",
        *node_lines(cfg),
        "",
        f"exec {shell_words([*command.hpclora_argv(cfg, python, RUNTIME), *export_argv(run, quant, target, adapter_only)])}",
        "",
    ]
    return ExportJob(cfg, run, target, "\n".join(lines), run / f"{export_dir_name(quant, adapter_only)}.sbatch")


def submit_export(job: ExportJob, dry_run: bool) -> str:
    """Write the script and sbatch it (record it in the job index for `hpclora status`/`logs`); what to print."""
    if dry_run:
        return f"{job.script}\n# dry run: would write {job.script_path} and run: sbatch {shlex.quote(str(job.script_path))}"
    write_text_atomic(job.script_path, job.script)
    job.script_path.chmod(0o755)
    Path(job.cfg.slurm.log_dir).mkdir(parents=True, exist_ok=True)
    try:
        job_id = slurm.sbatch(str(job.script_path))
    except NotSubmitted:
        job.script_path.unlink(missing_ok=True)
        raise
    log = log_path(job.cfg, job_id)
    registry.record({"kind": "export", "job_id": job_id, "launcher": "sbatch", "name": job_name(job.cfg), "dir": str(job.target),
                     "run": str(job.run), "log": log, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return "\n".join([f"submitted the export as job {job_id} (sbatch): it writes {job.target}", f"log: {log}",
                      f"watch it: hpclora status {job_id}   |   hpclora logs {job_id} -f"])
