"""The text of per-run job scripts: pure functions of the resolved config, tested against golden files.

Every value from a config reaches the script either shell-quoted (`shlex.quote`) in the body, or inside a
double-quoted #SBATCH value that the config checks keep free of quotes, backslashes and line breaks; only the
script's own variables are left for the shell to expand (ShellText). `slurm.setup` lines are pasted as they
are: they are shell code by definition. The job runs `hpclora train <run dir>/config.yaml --run-dir <run dir>`:
it never reads the user's YAML. What the script does once training runs is protocol.py's.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from dataclasses import dataclass

from ..config import RunConfig, ranks_per_node, world_size
from ..config.schema import SlurmSection
from ..config.slurm_syntax import slurm_mem_mib
from ..rundir import CONFIG_FILE, STOPPED_MARKER, run_dir_slug
from . import command, container
from .protocol import IGNORING_STOPS, packed_trial_lines, protocol_lines, rendezvous_lines, thread_lines


@dataclass(frozen=True)
class Payload:
    """Where the run directory is and how to start hpclora, as the job sees them."""

    python: str  # interpreter that runs `-m hpclora` on the host (ignored inside a container)
    run_dir: str = ""  # one run: its directory
    sweep_dir: str = ""  # a sweep: trial directories are <sweep_dir>/trial-NNN, NNN = array task id
    trials: int = 0
    max_parallel: int | None = None  # array tasks at once
    trials_per_task: int = 1  # >1: each array task takes a node's share and runs that many trials side by side


class ShellText(str):
    """A word of the script that is shell text we wrote (our own variables: "$RUN_DIR", "$HEAD:$PORT"), left
    as it is; every other word, whatever it holds, is quoted, so that user text is never expanded."""


RUNTIME = ShellText('"$CONTAINER_RUNTIME"')  # found on the node by container_runtime_lines
RUN_DIR = ShellText('"$RUN_DIR"')
RUN_CONFIG = ShellText(f'"$RUN_DIR/{CONFIG_FILE}"')


def shell_words(words: list[str]) -> str:
    return " ".join(w if isinstance(w, ShellText) else shlex.quote(w) for w in words)


def job_name(cfg: RunConfig) -> str:
    return run_dir_slug(cfg.run.name)


def log_pattern(cfg: RunConfig, array: bool, packed: bool = False) -> str:
    """Slurm's --output pattern: <log_dir>/<job name>-<job id>.out, or -<array id>_<task>.out. Packed
    array tasks log as -<array id>_task<task>.out: each trial writes its own -<array id>_<trial>.out."""
    log_dir = cfg.slurm.log_dir.replace("%", "%%")  # a literal % in a path must not read as a pattern
    return f"{log_dir}/%x-{('%A_task%a' if packed else '%A_%a') if array else '%j'}.out"


def log_path(cfg: RunConfig, job_id: str, task: int | None = None) -> str:
    """The log file of a submitted job (or array task), with the pattern filled in."""
    suffix = job_id if task is None else f"{job_id}_{task}"
    return f"{cfg.slurm.log_dir}/{job_name(cfg)}-{suffix}.out"


def gpu_request(slurm: SlurmSection) -> str | None:
    if slurm.gpus == 0:
        return None
    count = f"{slurm.gpu_type}:{slurm.gpus}" if slurm.gpu_type else str(slurm.gpus)
    return f"--gres=gpu:{count}" if slurm.gpu_flag == "gres" else f"--gpus={count}"


def times_mem(mem: str, k: int) -> str:
    """A Slurm memory size k times over, in Slurm's binary units: 2G x 2 = 4096M."""
    return mem if k == 1 else f"{slurm_mem_mib(mem) * k}M"


def sbatch_options(cfg: RunConfig, array: str | None = None, trials_per_task: int = 1, requeue: bool = True) -> list[str]:
    """The #SBATCH options for one run (or an array of them), in a fixed order. An array task that runs
    `trials_per_task` trials asks for that many times one trial's GPUs, cores and memory. Without `requeue` (a job
    that starts over rather than resumes): neither the stop signal nor the requeue."""
    k = trials_per_task
    s = dataclasses.replace(cfg.slurm, gpus=cfg.slurm.gpus * k, cpus_per_task=cfg.slurm.cpus_per_task * k, mem=times_mem(cfg.slurm.mem, k))
    options = [
        f"--job-name={job_name(cfg)}",
        f'--output="{log_pattern(cfg, array is not None, k > 1)}"',
        "--open-mode=append",
        f"--nodes={s.nodes}",
        "--ntasks-per-node=1" if world_size(cfg) > 1 else "--ntasks=1",  # one torchrun per node starts the ranks
        f"--cpus-per-task={s.cpus_per_task}",
        f"--mem={s.mem}",
        f"--time={s.time}",
        *([f"--signal=B:USR1@{cfg.train.preempt_grace_s}", "--requeue"] if requeue else ["--no-requeue"]),
    ]
    optional = {
        "gpus": gpu_request(s), "partition": s.partition, "account": s.account, "qos": s.qos,
        "constraint": s.constraint, "exclude": s.exclude,
    }
    for key, value in optional.items():
        if value is not None:
            options.append(value if key == "gpus" else f"--{key}={value}")
    if array is not None:
        options.append(f"--array={array}")
    options.extend(s.extra)
    return options


def array_spec(trials: int, max_parallel: int | None, trials_per_task: int = 1) -> str:
    return f"0-{math.ceil(trials / trials_per_task) - 1}" + (f"%{max_parallel}" if max_parallel else "")


def srun_ranks(cfg: RunConfig, in_step: bool) -> bool:
    """Whether srun starts the ranks (protocol.IGNORING_STOPS): only across several nodes, from the batch shell."""
    return world_size(cfg) > 1 and cfg.slurm.nodes > 1 and not in_step


def job_command(cfg: RunConfig, python: str, in_step: bool = False) -> str:
    """The training command of command.py as shell words, every one quoted but ours: the container runtime
    (found on the node), the run directory and the rendezvous (variables set above it).

    Several ranks: torchrun starts the node's ranks; they meet at the first node (HEAD, PORT), or on localhost
    with a free port when there is one node. On several nodes one srun task per node runs torchrun, ignoring
    the stop signals (protocol.IGNORING_STOPS; the ranks install their own handlers and get stops from `scancel
    --signal`). On one node, and where the script runs inside the job step already (submitit's task) or without
    Slurm (the local launcher, `in_step`): torchrun itself, started with the stop signals ignored by protocol_lines."""
    train = command.train_argv(RUN_DIR, RUN_CONFIG)
    if world_size(cfg) == 1:
        return shell_words([*command.hpclora_argv(cfg, python, RUNTIME), *train])
    rendezvous = (["--standalone"] if cfg.slurm.nodes == 1 else
                  [ShellText("--rdzv-backend=c10d"), ShellText('--rdzv-endpoint="$HEAD:$PORT"'), ShellText('--rdzv-id="$SLURM_JOB_ID"')])
    ranks = [] if not srun_ranks(cfg, in_step) else ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", "-c", IGNORING_STOPS,
                                "hpclora-ranks"]
    return shell_words([*ranks, *command.torchrun_argv(cfg, python, RUNTIME, rendezvous), *train])


def environment_lines(cfg: RunConfig) -> list[str]:
    """command.py's environment as exports (the shared cache, offline switches: see `hpclora stage`)."""
    return [f"export {name}={shlex.quote(value)}" for name, value in command.job_environment(cfg).items()]


def container_runtime_lines(cfg: RunConfig) -> list[str]:
    """Find the container runtime on the compute node, where it runs (it may differ from the login node)."""
    if not cfg.container.image:
        return []
    runtime = cfg.container.runtime
    search = "command -v apptainer || command -v singularity" if runtime == "auto" else f"command -v {runtime}"
    wanted = "apptainer or singularity" if runtime == "auto" else runtime
    nv = [
        "# --nv without an NVIDIA driver on the node binds nothing, and apptainer says nothing: say it here.",
        'command -v nvidia-smi >/dev/null || echo "hpclora: warning: --nv, but $(hostname -s) has no NVIDIA driver (no nvidia-smi):'
        ' the image sees no GPU" >&2',
    ] if container.uses_nv(cfg) else []
    filled = container.filled_binds(cfg)
    return [
        "",
        "# The job runs in the container image named below; find its runtime on this node.",
        f'CONTAINER_RUNTIME=$({search}) || {{ echo "hpclora: {wanted} not found on $(hostname -s)" >&2; exit 2; }}',
        *nv,
        *([f"mkdir -p -- {shell_words(filled)}  # caches the job fills: a bound folder must exist"] if filled else []),
    ]


def prelude_lines(cfg: RunConfig, with_setup: bool = True) -> list[str]:
    """What every job script runs first: errors stop it, then slurm.setup as written (not where submitit's own script
    ran it already), then unset variables are errors too."""
    setup = ["", "# slurm.setup, as written in the config:", *cfg.slurm.setup] if with_setup and cfg.slurm.setup else []
    return ["", "set -eo pipefail", *setup, "set -u", ""]


def node_lines(cfg: RunConfig) -> list[str]:
    """The job's threads, environment and container runtime on its node (after PER_NODE is set)."""
    return [*thread_lines(), *environment_lines(cfg), *container_runtime_lines(cfg)]


def header_lines(cfg: RunConfig, payload: Payload, submitted_by: str, requeue: bool = True) -> list[str]:
    sweep = bool(payload.sweep_dir)
    packed = sweep and payload.trials_per_task > 1
    array = array_spec(payload.trials, payload.max_parallel, payload.trials_per_task) if sweep else None
    return [
        "#!/bin/bash",
        f"# Written by `{submitted_by}` for run {job_name(cfg)}. To go on after it stopped: hpclora submit <this directory>",
        f"# Logs: {log_pattern(cfg, sweep, packed)}   (follow with `tail -f` or `hpclora logs JOB -f`)",
        *(f"#SBATCH {option}" for option in sbatch_options(cfg, array, payload.trials_per_task if packed else 1, requeue)),
    ]


def render_script(cfg: RunConfig, payload: Payload, submitted_by: str = "hpclora submit", in_step: bool = False) -> str:
    """The whole job script for one run, or for a sweep's job array when `payload.sweep_dir` is set. `in_step`:
    the same job as the submitit and local launchers run it (command.run_job): no #SBATCH lines and no
    slurm.setup (submitit's own script runs those), torchrun started directly (job_command)."""
    sweep = bool(payload.sweep_dir)
    packed = sweep and payload.trials_per_task > 1
    if in_step:
        lines = ["#!/bin/bash", f"# The job of run {job_name(cfg)}, run by the submitit or local launcher (in a job step, or here)."]
    else:
        lines = header_lines(cfg, payload, submitted_by)
    lines += [
        *prelude_lines(cfg, with_setup=not in_step),
        f"PER_NODE={ranks_per_node(cfg)} RANKS={'true' if world_size(cfg) > 1 else 'false'} SRUN_RANKS={str(srun_ranks(cfg, in_step)).lower()}"
        + (f"  # {world_size(cfg)} training ranks, {ranks_per_node(cfg)} per node on {cfg.slurm.nodes} node(s), started by torchrun"
           if world_size(cfg) > 1 else ""),
        *node_lines(cfg),
        *(["", *rendezvous_lines()] if world_size(cfg) > 1 and cfg.slurm.nodes > 1 else []),
        "",
    ]
    train = job_command(cfg, payload.python, in_step)
    start = None
    if packed:
        log_prefix = shlex.quote(f"{cfg.slurm.log_dir}/{job_name(cfg)}-")
        lines += [f"SWEEP_DIR={shlex.quote(payload.sweep_dir)}", 'STOP_MARKER="$SWEEP_DIR/.stopped-$SLURM_ARRAY_TASK_ID"',
                  *packed_trial_lines(payload.trials, payload.trials_per_task, cfg.slurm.cpus_per_task, log_prefix, train)]
        start = "run_trials &"
    elif sweep:
        lines += [
            f"SWEEP_DIR={shlex.quote(payload.sweep_dir)}",
            "# sweep.json in SWEEP_DIR maps each array task id to its trial's overrides.",
            'RUN_DIR="$SWEEP_DIR/trial-$(printf %03d "$SLURM_ARRAY_TASK_ID")"',
        ]
    else:
        lines.append(f"RUN_DIR={shlex.quote(payload.run_dir)}")
    if not packed:
        lines += [f'STOP_MARKER="$RUN_DIR/{STOPPED_MARKER}"', f"START=({train})"]
    lines += [f"MAX_REQUEUES={cfg.slurm.max_requeues} REQUEUES_SET_BY=slurm.max_requeues", "",
              *(protocol_lines(start) if start else protocol_lines()), ""]
    return "\n".join(lines)
