"""The text of per-run sbatch scripts: pure functions of the resolved config, tested against golden files.

Every value from a config reaches the script either shell-quoted (`shlex.quote`) in the body, or
inside a double-quoted #SBATCH value that the config checks keep free of quotes, backslashes and line
breaks. Only `slurm.setup` lines are pasted as they are: they are shell code by definition.
The job runs `hpclora train <run dir>/config.yaml --run-dir <run dir>`: it never reads the user's YAML.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from dataclasses import dataclass

from ..config import RunConfig, SlurmSection, run_dir_slug
from ..config.slurm_syntax import slurm_mem_gb
from ..rundir import STOPPED_MARKER
from . import command as job


@dataclass(frozen=True)
class Payload:
    """Where the run directory is and how to start hpclora, as the job sees them."""

    python: str  # interpreter that runs `-m hpclora` on the host (ignored inside a container)
    run_dir: str = ""  # one run: its directory
    sweep_dir: str = ""  # a sweep: trial directories are <sweep_dir>/trial-NNN, NNN = array task id
    trials: int = 0
    max_parallel: int | None = None  # array tasks at once
    trials_per_task: int = 1  # >1: each array task takes a node's share and runs that many trials side by side


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
    """A Slurm memory size k times over: 32G x 2 = 64000M."""
    return mem if k == 1 else f"{math.ceil(slurm_mem_gb(mem) * 1000 * k)}M"


def sbatch_options(cfg: RunConfig, array: str | None = None, trials_per_task: int = 1) -> list[str]:
    """The #SBATCH options for one run (or an array of them), in a fixed order. An array task that runs
    `trials_per_task` trials asks for that many times one trial's GPUs, cores and memory."""
    k = trials_per_task
    s = dataclasses.replace(cfg.slurm, gpus=cfg.slurm.gpus * k, cpus_per_task=cfg.slurm.cpus_per_task * k, mem=times_mem(cfg.slurm.mem, k))
    options = [
        f"--job-name={job_name(cfg)}",
        f'--output="{log_pattern(cfg, array is not None, k > 1)}"',
        "--open-mode=append",
        f"--nodes={s.nodes}",
        "--ntasks-per-node=1" if job.world_size(cfg) > 1 else "--ntasks=1",  # one torchrun per node starts the ranks
        f"--cpus-per-task={s.cpus_per_task}",
        f"--mem={s.mem}",
        f"--time={s.time}",
        f"--signal=B:USR1@{cfg.train.preempt_grace_s}",
        "--requeue",
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


class ShellText(str):
    """A word of the script that is shell text we wrote (our own variables: "$RUN_DIR", "$HEAD:$PORT"), left
    as it is; every other word, whatever it holds, is quoted, so that user text is never expanded."""


RUNTIME = ShellText('"$CONTAINER_RUNTIME"')  # found on the node by container_runtime_lines
RUN_DIR = ShellText('"$RUN_DIR"')
RUN_CONFIG = ShellText('"$RUN_DIR/config.yaml"')


def shell_words(words: list[str]) -> str:
    return " ".join(w if isinstance(w, ShellText) else shlex.quote(w) for w in words)


def job_command(cfg: RunConfig, python: str) -> str:
    """The training command of job.py as shell words, every one quoted but ours: the container runtime
    (found on the node), the run directory and the rendezvous (variables set above it).

    Several ranks: one srun task per node runs torchrun, which starts the node's ranks; they meet at the
    first node (HEAD, PORT: see rank_lines), or on localhost with a free port when there is one node. The
    task ignores USR1/USR2 (torchrun would die of them); the ranks install their own handlers and get the
    stop signals from `scancel --signal` (run_and_requeue_lines)."""
    train = job.train_argv(RUN_DIR, RUN_CONFIG)
    if job.world_size(cfg) == 1:
        return shell_words([*job.hpclora_argv(cfg, python, RUNTIME), *train])
    rendezvous = (["--standalone"] if cfg.slurm.nodes == 1 else
                  [ShellText('--rdzv-backend=c10d'), ShellText('--rdzv-endpoint="$HEAD:$PORT"'), ShellText('--rdzv-id="$SLURM_JOB_ID"')])
    ranks = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", "-c", 'trap "" USR1 USR2; exec "$@"', "hpclora-ranks"]
    return shell_words([*ranks, *job.torchrun_argv(cfg, python, RUNTIME, rendezvous), *train])


def rank_lines(cfg: RunConfig) -> list[str]:
    """For several ranks: their threads, and where they meet (the first node, resolved here on the host)."""
    per_node = job.ranks_per_node(cfg)
    lines = [
        "",
        f"# {job.world_size(cfg)} training ranks: {per_node} per node on {cfg.slurm.nodes} node(s), started by torchrun.",
        f"export OMP_NUM_THREADS=$(( ${{SLURM_CPUS_PER_TASK:-1}} / {per_node} > 0 ? ${{SLURM_CPUS_PER_TASK:-1}} / {per_node} : 1 ))",
    ]
    if cfg.slurm.nodes > 1:
        lines += [
            'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
            f"PORT=$(({job.RDZV_PORT_BASE} + SLURM_JOB_ID % {job.RDZV_PORT_SPAN}))  # from the job id: below the ephemeral ports, apart from other jobs",
        ]
    return lines


def environment_lines(cfg: RunConfig) -> list[str]:
    """job.py's environment as exports (the shared cache, offline switches: see `hpclora stage`)."""
    return [f"export {name}={shlex.quote(value)}" for name, value in job.job_environment(cfg).items()]


def container_runtime_lines(cfg: RunConfig) -> list[str]:
    """Find the container runtime on the compute node, where it runs (it may differ from the login node)."""
    if not cfg.container.image:
        return []
    runtime = cfg.container.runtime
    search = "command -v apptainer || command -v singularity" if runtime == "auto" else f"command -v {runtime}"
    wanted = "apptainer or singularity" if runtime == "auto" else runtime
    return [
        "",
        "# The job runs in the container image named below; find its runtime on this node.",
        f'CONTAINER_RUNTIME=$({search}) || {{ echo "hpclora: {wanted} not found on $(hostname -s)" >&2; exit 2; }}',
    ]


def run_and_requeue_lines(command: str, max_requeues: str, ranks: bool = False, start: str | None = None) -> list[str]:
    """Run training in the background, pass Slurm's signals on to it, and requeue the job when it
    answers with CHECKPOINTED_EXIT (75). The same text is in jobs/*.sbatch, written out by hand.
    With several `ranks` the signal goes to every process of the job's steps (scancel), and a stop is
    known by the marker rank 0 leaves (the ranks end with 0: torchrun would report 75 as a failure).
    `start` replaces the line that starts `command` (packed trials: their function, which passes signals on)."""
    if ranks:  # every process of the job's steps; torchrun itself ignores USR1 (job_command)
        on_signal = on_repeat = 'scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || true'
    else:
        on_signal, on_repeat = 'kill -s "$1" "$child" 2>/dev/null || true', 'kill -s "$stop" "$child" 2>/dev/null || true'
    lines = [
        'echo "hpclora: job ${SLURM_JOB_ID} on $(hostname -s) started $(date \'+%F %T\') (restart ${SLURM_RESTART_COUNT:-0})"',
        "# Slurm signals this shell: USR1 before the time limit (--signal=B:USR1@...), TERM on preemption.",
        "# Training runs in the background so that the signal can be passed on; it then saves a checkpoint",
        "# at the next step boundary and exits with 75, meaning \"checkpointed, not finished\".",
        'child="" stop=""',
        f'forward() {{ stop=$1; if [ -n "$child" ]; then {on_signal}; fi; }}',
        "trap 'forward USR1' USR1",
        "trap 'forward TERM' TERM",
        *([f'rm -f "$RUN_DIR/{STOPPED_MARKER}"'] if ranks else []),
        "# Training starts with these signals ignored, so that one arriving before it is ready cannot kill it.",
        start or f"(trap '' USR1 TERM; exec {command}) &",
        "child=$!",
        "# Wait for training. Once a stop is asked for, repeat it every 5 s until training has taken note.",
        'while kill -0 "$child" 2>/dev/null; do',
        f'    if [ -n "$stop" ]; then {on_repeat}; sleep 5 & wait $! || true',
        '    else wait "$child" || true; fi  # a trapped signal ends `wait` early',
        "done",
        "status=0",
        'wait "$child" || status=$?',
        *([f'if [ -f "$RUN_DIR/{STOPPED_MARKER}" ]; then status=75; fi  # checkpointed, not finished'] if ranks else []),
    ]
    return lines + [
        'if [ "$status" -eq 75 ]; then',
        "    # On the host, not in the container (which has no scontrol). A job that scancel cancelled is",
        "    # COMPLETING by now and stays cancelled; a running one (time limit ahead, preemption) is requeued,",
        "    # runs this script again, and training resumes from its newest checkpoint in $RUN_DIR.",
        '    state=$(squeue -h -j "$SLURM_JOB_ID" -o %T 2>/dev/null || true)',
        '    if [ -n "$state" ] && [ "$state" != RUNNING ]; then',
        '        echo "hpclora: checkpoint saved; job ${SLURM_JOB_ID} is ${state} (cancelled): not requeueing; submit this script again to resume"',
        f'    elif [ "${{SLURM_RESTART_COUNT:-0}}" -lt {max_requeues} ]; then',
        f'        echo "hpclora: checkpoint saved; requeueing job ${{SLURM_JOB_ID}} (restart $((${{SLURM_RESTART_COUNT:-0}} + 1)) of at most {max_requeues})"',
        '        scontrol requeue "$SLURM_JOB_ID"',
        "        exit 0",
        "    else",
        f'        echo "hpclora: checkpoint saved, but the job was requeued {max_requeues} times already (slurm.max_requeues): not requeueing; submit this script again to resume" >&2',
        "    fi",
        "fi",
        'echo "hpclora: job ${SLURM_JOB_ID} ended $(date \'+%F %T\') with exit code $status"',
        'exit "$status"',
    ]


def packed_trial_lines(cfg: RunConfig, payload: Payload, command: str) -> list[str]:
    """An array task that runs `payload.trials_per_task` single-GPU trials side by side, one GPU each (of the
    task's CUDA_VISIBLE_DEVICES), each with its own run directory and log (the one an unpacked array task
    would have). `run_trials` passes stop signals on to every trial; each checkpoints, and if any did, it
    answers 75, the task requeues (run_and_requeue_lines) and runs again the trials not yet finished."""
    k, cpus = payload.trials_per_task, cfg.slurm.cpus_per_task
    log = shlex.quote(f"{cfg.slurm.log_dir}/{job_name(cfg)}-") + '"${SLURM_ARRAY_JOB_ID}_${trial}.out"'
    return [
        f"# This array task runs up to {k} trials side by side (ids task x {k} and on), one GPU and {cpus} core(s) each.",
        "run_trials() (",
        "    pids=() slot=0 status=0",
        '    pass_on() { for pid in "${pids[@]}"; do kill -s "$1" "$pid" 2>/dev/null || true; done; }',
        "    trap 'pass_on USR1' USR1",
        "    trap 'pass_on TERM' TERM",
        "    # The task's GPUs as Slurm's cgroup shows them; where it sets no CUDA_VISIBLE_DEVICES, the first ones of the node.",
        '    IFS=, read -r -a gpus <<< "${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((${SLURM_GPUS_ON_NODE:-0} - 1)))}"',
        f"    for trial in $(seq $((SLURM_ARRAY_TASK_ID * {k})) $((SLURM_ARRAY_TASK_ID * {k} + {k - 1}))); do",
        f'        [ "$trial" -lt {payload.trials} ] || break',
        '        RUN_DIR="$SWEEP_DIR/trial-$(printf %03d "$trial")"',
        f"        LOG={log}",
        '        gpu="${gpus[$slot]:-}" slot=$((slot + 1))',
        '        if [ -d "$RUN_DIR/adapter" ]; then echo "hpclora: trial $trial finished already"; continue; fi',
        '        echo "hpclora: trial $trial in $RUN_DIR${gpu:+ on GPU $gpu}, log $LOG"',
        '        echo "hpclora: trial $trial of job ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} on $(hostname -s)${gpu:+, GPU $gpu}" >> "$LOG"',
        f'        (trap \'\' USR1 TERM; export OMP_NUM_THREADS={cpus}; if [ -n "$gpu" ]; then export CUDA_VISIBLE_DEVICES="$gpu"; fi',
        f'         exec {command}) >> "$LOG" 2>&1 &',
        '        pids+=("$!")',
        "    done",
        '    for pid in "${pids[@]}"; do  # 75 (checkpointed: run again) over 0, a failure over both',
        '        while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done',
        '        code=0; wait "$pid" || code=$?',
        '        if [ "$code" -ne 0 ] && { [ "$status" -eq 0 ] || [ "$status" -eq 75 ]; }; then status=$code; fi',
        "    done",
        '    exit "$status"',
        ")",
    ]


def render_script(cfg: RunConfig, payload: Payload, submitted_by: str = "hpclora submit") -> str:
    """The whole sbatch script for one run, or for a sweep's job array when `payload.sweep_dir` is set."""
    sweep = bool(payload.sweep_dir)
    packed = sweep and payload.trials_per_task > 1
    array = array_spec(payload.trials, payload.max_parallel, payload.trials_per_task) if sweep else None
    lines = [
        "#!/bin/bash",
        f"# Written by `{submitted_by}` for run {job_name(cfg)}. Resubmit by hand with: sbatch <this file>",
        f"# Logs: {log_pattern(cfg, sweep, packed)}   (follow with `tail -f` or `hpclora logs JOB -f`)",
    ]
    lines += [f"#SBATCH {option}" for option in sbatch_options(cfg, array, payload.trials_per_task if packed else 1)]
    lines += ["", "set -eo pipefail"]
    if cfg.slurm.setup:
        lines += ["", "# slurm.setup, as written in the config:"] + list(cfg.slurm.setup)
    lines += [
        "set -u",
        "",
        "# Slurm 22.05+: srun does not inherit --cpus-per-task; torch threads follow the allocation.",
        'export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"',
        'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
        *environment_lines(cfg),
        *container_runtime_lines(cfg),
        *(rank_lines(cfg) if job.world_size(cfg) > 1 else []),
        "",
    ]
    command = job_command(cfg, payload.python)
    start = None
    if packed:
        lines += [f"SWEEP_DIR={shlex.quote(payload.sweep_dir)}", *packed_trial_lines(cfg, payload, command)]
        start = "run_trials &"
    elif sweep:
        lines += [
            f"SWEEP_DIR={shlex.quote(payload.sweep_dir)}",
            "# sweep.json in SWEEP_DIR maps each array task id to its trial's overrides.",
            'RUN_DIR="$SWEEP_DIR/trial-$(printf %03d "$SLURM_ARRAY_TASK_ID")"',
        ]
    else:
        lines.append(f"RUN_DIR={shlex.quote(payload.run_dir)}")
    lines += ["", *run_and_requeue_lines(command, str(cfg.slurm.max_requeues), job.world_size(cfg) > 1, start), ""]
    return "\n".join(lines)
