"""`hpclora doctor`: what this cluster offers and what would stop a run, found on the login node before the
queue wait. One check per line, `ok`, `warn` or `fail`, each problem with its fix. No torch.

Slurm (cluster.py), the container runtime and image, the run's directories (storage.py), the hub, and the
config if one is given: validated, its data read, planned on the partition's GPU, staged or not. With
`--probe`, one short srun job on the partition answers the same questions for a compute node (node.py).
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from . import cluster, storage
from ..catalog import node
from ..config.credentials import redact
from ..errors import UserError
from ..config.slurm_syntax import slurm_seconds, slurm_time

OK, WARN, FAIL = "ok", "warn", "fail"
LOW_SPACE_GB = {"cache.hf_home": 30.0, "run.output_root": 5.0, "slurm.log_dir": 1.0}  # a 7B model in fp16 is 14 GB
SMALL_HOME_GB = 100.0  # a home quota below this cannot hold more than a few 7B models


@dataclass
class Check:
    status: str
    name: str
    message: str
    fix: str = ""


class Report:
    def __init__(self):
        self.checks: list[Check] = []

    def add(self, status: str, name: str, message: str, fix: str = "") -> None:
        self.checks.append(Check(status, name, message, fix))

    @property
    def failed(self) -> bool:
        return any(c.status == FAIL for c in self.checks)

    def text(self) -> str:
        lines = [f"{c.status:<4}  {c.name:<19} {c.message}" + (f" -> {c.fix}" if c.fix else "") for c in self.checks]
        counts = {s: sum(c.status == s for c in self.checks) for s in (OK, WARN, FAIL)}
        lines.append(f"{counts[OK]} ok, {counts[WARN]} warn, {counts[FAIL]} fail")
        return "\n".join(lines)

    def json(self) -> str:
        return json.dumps({"checks": [asdict(c) for c in self.checks], "failed": self.failed}, indent=2, ensure_ascii=False)


def diagnose(config_path: str | None = None, overrides: list[str] | None = None, partition: str | None = None,
             probe: bool = False) -> Report:
    report = Report()
    cfg = load_config(report, config_path, overrides or [])
    parts = check_slurm(report)
    chosen = choose_partition(report, parts, partition or (cfg.slurm.partition if cfg else None))
    plan = check_config(report, cfg, config_path, chosen) if cfg else None
    if cfg and chosen:
        check_resources(report, cfg, chosen, plan, parts)
    check_container(report, cfg)
    if cfg and chosen and cfg.slurm.gpus > 0:
        check_jobs_torch(report, cfg, chosen)
    check_storage(report, cfg, single_node=parts is not None and cluster.runs_here(chosen.name if chosen else None))
    reached, how = node.hub_reachable()
    report.add(OK if reached else WARN, "network.here", how, "" if reached else
               "models and datasets must be staged from a node that reaches it (`hpclora stage CONFIG`)")
    if probe:
        probe_compute_node(report, cfg, chosen)
    return report


def load_config(report: Report, path: str | None, overrides: list[str]):
    if path is None:
        return None
    from .. import config

    try:
        cfg = config.load(path, overrides)
    except UserError as exc:
        for line in map(redact, exc.lines()):
            report.add(FAIL, "config", line)
        return None
    report.add(OK, "config", f"{path}: valid")
    return cfg


def check_slurm(report: Report) -> list[cluster.Partition] | None:
    from ..catalog.devices import gpu_aliases, gpus_file, known_devices

    devices, aliases = known_devices(), gpu_aliases()

    version = cluster.version()
    parts = cluster.partitions() if version else None
    if version is None or parts is None:
        report.add(WARN, "slurm", "no Slurm answers here (sinfo)", "run doctor on the cluster's login node; "
                   "without Slurm only `hpclora train` and `--launcher local` run")
        return None
    report.add(OK, "slurm", f"{version}, {len(parts)} partition(s), {len(cluster.node_names() or ())} node(s)")
    for p in parts:
        gpus = ", ".join(describe_gpu(g, devices, aliases) for g in p.gpus) or "no GPUs"
        limit = "no time limit" if p.time_limit_s is None else f"time limit {p.time_limit}"
        line = (f"{p.name}{' (default)' if p.default else ''}: {p.nodes} node(s) of up to {p.cpus} CPUs and "
                f"{p.memory_mb / 1024:.1f}G of memory, {gpus}, {limit}")
        unknown = [g.type or "(untyped)" for g in p.gpus if not cluster.planner_names(g.type, devices, aliases)]
        if not p.available:
            report.add(WARN, "slurm.partition", line + ", down", "jobs there wait until an admin brings it up")
        elif unknown:
            report.add(WARN, "slurm.partition", line, f"the planner does not know GPU type {', '.join(unknown)}: describe it in "
                       f"{gpus_file()}, then measure it with `hpclora probe`")
        else:
            report.add(OK, "slurm.partition", line)
    if not any(p.default for p in parts):
        report.add(WARN, "slurm.partition", "no default partition", "set slurm.partition in every config")
    if cluster.accounting_answers():
        report.add(OK, "slurm.accounting", "sacct answers: status and cancel know finished jobs")
    else:
        report.add(WARN, "slurm.accounting", "sacct does not answer (no accounting)",
                   "hpclora status judges finished jobs by their run directories")
    return parts


def describe_gpu(g: cluster.Gres, devices: dict, aliases: dict) -> str:
    names = cluster.planner_names(g.type, devices, aliases)
    planned = f" (planner: {' or '.join(names)})" if names else ""
    return f"{g.count} x gpu:{g.type}{planned}" if g.type else f"{g.count} untyped GPU(s)"


def choose_partition(report: Report, parts, wanted: str | None):
    if parts is None:
        return None
    if wanted is None:
        return next((p for p in parts if p.default), None)
    found = next((p for p in parts if p.name == wanted), None)
    if found is None:
        report.add(FAIL, "slurm.partition", f"no partition '{wanted}' here", f"one of {', '.join(p.name for p in parts)}")
    return found


def planner_device(cfg, part) -> str | None:
    """The planner's GPU for this run on this partition: slurm.gpu_type, else the partition's (smallest) type."""
    from ..catalog.devices import gpu_aliases, known_devices

    if cfg.slurm.gpus == 0:
        return "cpu"
    if cfg.slurm.gpu_type:
        return None  # plan.device_for maps it
    for g in part.gpus if part else []:
        names = cluster.planner_names(g.type, known_devices(), gpu_aliases())
        if names:
            return names[0]
    return None


def check_config(report: Report, cfg, config_path: str, part):
    from ..catalog import hub
    from .. import plan
    from ..plan import preflight

    try:
        data = preflight.check(cfg)
        if data:
            where = cfg.data.path or f"data.sources ({len(cfg.data.sources)} files)"
            report.add(OK, "config.data", f"{where}: {data['rows']:,} rows of {data['format']} data read")
    except UserError as exc:
        for line in exc.lines():
            report.add(FAIL, "config.data", line)
        return None
    missing = hub.missing_from_cache(cfg)
    if missing and cfg.cache.offline_jobs:
        report.add(FAIL, "config.staged", f"the cache at {hub.hf_home(cfg)} lacks {', '.join(missing)}, and jobs run offline",
                   f"on a node with internet: {hub.stage_command(config_path)}")
    elif missing:
        report.add(WARN, "config.staged", f"not staged: jobs will download {', '.join(missing)}",
                   f"compute nodes often have no internet: {hub.stage_command(config_path)}")
    else:
        report.add(OK, "config.staged", f"model and data are local or in the cache at {hub.hf_home(cfg)}")
    try:
        p = plan.make_plan(cfg, planner_device(cfg, part), calibrated=True)
    except UserError as exc:
        report.add(WARN, "config.plan", f"no plan: {exc}")
        return None
    where = f"on {p.device}" + (f" (partition {part.name})" if part else "")
    speed_source = p.tokens_per_s_note.split(":")[0] if p.tokens_per_s_note.startswith("measured") else "estimate"
    summary = (f"{where}: peak {p.peak_gb:.1f} of {p.capacity_gb:.1f} GB, {p.precision}, micro-batch "
               f"{min(p.micro_batch, p.max_micro_batch)} x {p.grad_accum}, ~{p.tokens_per_s:,.0f} tokens/s ({speed_source})"
               + (f", {p.time} for {p.steps} steps" if p.time else ""))
    if p.fits:
        report.add(OK, "config.plan", summary)
    else:
        report.add(FAIL, "config.plan", summary + ": does not fit", plan.fit_advice(p))
    if p.memory_note:  # the plan's own words on slurm.mem
        report.add(WARN if p.memory_short else OK, "slurm.mem", p.memory_note, f"slurm.mem={p.recommended['mem']}" if p.memory_short else "")
    return p


def check_resources(report: Report, cfg, part, p, parts) -> None:
    """The run's request against what the partition's nodes have, and its time against the partition's limit."""
    s = cfg.slurm
    name = f"partition {part.name}"
    for key, problem, fix in cluster.request_problems(s, part, parts):
        report.add(FAIL, key, problem, fix)
    offered = [g for g in part.gpus if not s.gpu_type or (g.type or "").lower() == s.gpu_type.lower()]
    if s.gpus > 0 and offered and max(g.count for g in offered) >= s.gpus:
        report.add(OK, "slurm.gpus", f"{s.gpus} x {offered[0].type or 'gpu'} per node: {name} has {offered[0].count}")
    limit = part.time_limit_s
    asked = slurm_seconds(s.time) if s.time != "auto" else None
    if limit is not None and asked is not None and asked > limit:
        report.add(FAIL, "slurm.time", f"{s.time} is longer than {name}'s limit {part.time_limit}: the job would never start",
                   f"slurm.time={slurm_time(limit)} (the run requeues and resumes across jobs)")
        return
    needed = slurm_seconds(p.recommended["time"]) if p and p.recommended.get("time") else None
    job = min(x for x in (asked, limit, needed) if x is not None) if needed else None
    if needed and job and needed > job:
        jobs = math.ceil(needed / job)
        status = FAIL if jobs - 1 > s.max_requeues else WARN
        report.add(status, "slurm.time", f"the run needs ~{slurm_time(needed)} (planner x 1.3); in jobs of {slurm_time(job)} "
                   f"that is {jobs} jobs, {jobs - 1} requeues (slurm.max_requeues={s.max_requeues})",
                   f"slurm.max_requeues={jobs}" if status == FAIL else "")
    elif needed:
        asked_words = "auto" if asked is None else s.time
        report.add(OK, "slurm.time", f"{asked_words}: ~{slurm_time(needed)} needed (planner x 1.3)" + (f", {name}'s limit {part.time_limit}" if limit else ""))


def check_container(report: Report, cfg) -> None:
    from ..catalog.node import find_runtime

    image = cfg.container.image if cfg else None
    runtime = find_runtime(cfg.container.runtime if cfg else "auto")
    if runtime is None and cfg and not image:
        report.add(OK, "container", "container.image is null: jobs run on the host's Python (no apptainer or singularity here)")
    elif runtime is None:
        report.add(FAIL if image else WARN, "container", "neither apptainer nor singularity is on PATH",
                   "`module load apptainer` (or singularity), or set container.image: null to run on the host")
    else:
        report.add(OK, "container", f"{runtime}: {node.runtime_version(runtime) or 'version unknown'}")
    if image:
        path = Path(image).expanduser()
        if not path.is_file():
            report.add(FAIL, "container.image", f"{image}: not found", "build it (`hpclora container build`) and copy it to shared storage")
        elif not os.access(path, os.R_OK):
            report.add(FAIL, "container.image", f"{image}: not readable", f"chmod a+r {image}")
        else:
            report.add(OK, "container.image", f"{image}: {path.stat().st_size / 1e9:.1f} GB, readable")
    if cfg and cfg.slurm.gpus > 0 and (cfg.container.nv is not False) and image:
        driver, gpus = node.nvidia_gpus()
        if driver:
            report.add(OK, "container.nv", f"--nv binds NVIDIA driver {driver} ({', '.join(gpus)})")
        else:
            report.add(WARN, "container.nv", "no NVIDIA driver on this node (usual on a login node): --nv is untested here",
                       "`hpclora doctor CONFIG --probe` asks a compute node")


def check_jobs_torch(report: Report, cfg, part) -> None:
    """Whether the torch jobs import has kernels for the GPUs the run may get on this partition."""
    from ..catalog.devices import gpu_aliases, known_devices
    from .job_torch import jobs_torch, kernel_verdicts

    devices, aliases = known_devices(), gpu_aliases()
    offered = [g for g in part.gpus if not cfg.slurm.gpu_type or (g.type or "").lower() == cfg.slurm.gpu_type.lower()]
    gpus = {n: devices[n].capability for g in offered for n in cluster.planner_names(g.type, devices, aliases)[:1] if devices[n].capability}
    if not gpus:
        return
    build, where = jobs_torch(cfg)
    if build is None:
        report.add(WARN, "torch.kernels", f"which torch jobs run is not known: {where}", "`hpclora doctor CONFIG --probe` asks a compute node")
        return
    for message, fix in kernel_verdicts(build, gpus):
        report.add(FAIL if fix else OK, "torch.kernels", f"{message} (in {where})", fix or "")


def check_storage(report: Report, cfg, single_node: bool) -> None:
    from ..catalog.hub import hf_home

    places = {"cache.hf_home": str(hf_home(cfg)) if cfg else os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")}
    if cfg:
        places["run.output_root"] = cfg.run.output_root
        places["slurm.log_dir"] = cfg.slurm.log_dir
    home = Path.home().resolve()
    for key, path in places.items():
        place = storage.inspect(path)
        where = f"{place.path} ({place.fs_type} at {place.mount}, {place.free_gb:,.0f} GB free)"
        if not place.writable:
            report.add(FAIL, key, f"{where}: not writable here", f"point {key} at a directory you may write")
            continue
        if not place.exists:
            where += f": does not exist yet (will be created in {place.existing})"
        if place.node_local_path:
            report.add(WARN if single_node else FAIL, key, f"{where}: node-local", f"set {key} to shared storage (project or work directory)")
        elif not place.shared and not single_node:
            report.add(WARN, key, f"{where}: a local file system, which other nodes may not see", f"set {key} to shared storage if jobs cannot find it")
        elif place.free_gb < LOW_SPACE_GB[key]:
            report.add(WARN, key, f"{where}: little space left", "free some, or move it to larger storage")
        else:
            report.add(OK, key, where + ("; a single-node cluster: jobs run on this node" if not place.shared else ""))
        used = storage.quota(place)
        if used:
            status = WARN if used[0] >= 0.9 * used[1] else OK
            report.add(status, key + ".quota", f"{used[0]:.1f} of {used[1]:.1f} GB used on {place.mount}",
                       "free space before staging models" if status == WARN else "")
        if key == "cache.hf_home" and place.path.is_relative_to(home):
            limit = used[1] if used else None
            if limit is not None and limit < SMALL_HOME_GB:
                report.add(WARN, key, f"the Hugging Face cache is in your home directory, whose quota is {limit:.0f} GB",
                           "set cache.hf_home (or HF_HOME) to project or work storage: one 7B model is 14 GB")


def probe_compute_node(report: Report, cfg, part) -> None:
    """One short srun job on the partition: does a compute node reach the hub, see its GPUs and the runtime?"""
    if part is None:
        report.add(FAIL, "probe", "no partition to probe (no Slurm, or no default partition)", "pass --partition P")
        return
    argv = ["srun", f"--partition={part.name}", "--nodes=1", "--ntasks=1", "--time=5", "--mem=1G",
            "--cpus-per-task=1", "--job-name=hpclora-doctor"]
    gpu = bool(part.gpus) and (cfg is None or cfg.slurm.gpus > 0)  # a CPU run's node need not show a GPU
    if gpu:
        kind = cfg.slurm.gpu_type if cfg and cfg.slurm.gpu_type else part.gpus[0].type
        argv.append(f"--gres=gpu:{kind + ':' if kind else ''}1")
    argv += [sys.executable, "-m", "hpclora.catalog.node"]
    done = node.run(argv, timeout=600)
    try:
        facts = json.loads(done.stdout.strip().splitlines()[-1]) if done and done.returncode == 0 else None
    except (json.JSONDecodeError, IndexError):
        facts = None
    if facts is None:
        report.add(FAIL, "probe", f"srun on {part.name} gave no answer: {(done.stderr.strip() if done else 'srun not found')[:300]}",
                   "is the partition up, and is this Python on a file system the nodes share?")
        return
    host = facts["host"]
    report.add(OK if facts["hub_reachable"] else WARN, "network.compute", f"{host}: {facts['hub']}",
               "" if facts["hub_reachable"] else "jobs must run offline from a staged cache (cache.offline_jobs: true)")
    if gpu:
        report.add(OK if facts["nvidia_driver"] else FAIL, "gpu.compute",
                   f"{host}: driver {facts['nvidia_driver']}, {', '.join(facts['gpus'])}" if facts["nvidia_driver"]
                   else f"{host}: nvidia-smi does not answer: no NVIDIA driver, so --nv has nothing to bind",
                   "" if facts["nvidia_driver"] else "ask the admins; check the partition's GPUs with `sinfo -o %G`")
    runtime = facts["container_runtime"]
    if runtime:
        report.add(OK, "container.compute", f"{host}: {runtime} {facts['container_runtime_version'] or ''}".rstrip())
    elif cfg and not cfg.container.image:
        report.add(OK, "container.compute", f"{host}: no apptainer or singularity, and none needed (container.image is null)")
    else:
        report.add(FAIL if cfg else WARN, "container.compute", f"{host}: no apptainer or singularity on PATH",
                   "load it in slurm.setup (`module load apptainer`)")
