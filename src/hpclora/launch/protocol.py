"""The shell text every hpclora job runs, written once: its threads, its stop-and-requeue protocol, and the
trials an array task runs side by side. The per-run scripts of `hpclora submit` and `sweep` (render.py), the
hand-usable templates in jobs/ (templates.py) and the submitit and local launchers (command.run_job) all run
these same lines, so that a stop signal, a cancel and a requeue mean the same whichever started the job.

The protocol reads a few shell variables its script sets first:
    PER_NODE      training processes on this node (threads are the allocation's cores shared among them)
    RANKS         true when they are several ranks under torchrun, else false
    SRUN_RANKS    true when srun starts them (several nodes), false when torchrun runs in this shell's job step
    START         the command that trains (a bash array)
    STOP_MARKER   the file rank 0 leaves when training stopped at a checkpoint: `<step> <stop or cancel>`, then the one
                  way to resume (rundir.resume_command), which the script says where nothing requeues
    MAX_REQUEUES  how often the job requeues itself, and REQUEUES_SET_BY, the setting that says so
"""

from __future__ import annotations

from ..stops import CANCELLED, CHECKPOINTED_EXIT, STOP_SIGNALS
from ..rundir import STOP_MARKER_VAR

# How often a stop signal is passed on again until training has ended: one that arrives while training is still
# starting (its handlers not yet installed, the signal ignored) would otherwise be lost.
RESEND_STOP_S = 5


def thread_lines() -> list[str]:
    """Torch threads: the allocation's cores (all of this machine's outside Slurm), shared by the node's ranks."""
    return [
        "# Slurm 22.05+: srun does not inherit --cpus-per-task; torch threads follow the allocation, shared by the ranks.",
        'export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"',
        "CPUS=${SLURM_CPUS_PER_TASK:-$(nproc)}",
        "export OMP_NUM_THREADS=$(( CPUS / PER_NODE > 0 ? CPUS / PER_NODE : 1 ))",
        "export PYTHONUNBUFFERED=1  # progress lines reach the log as they are printed",
    ]


def rendezvous_lines() -> list[str]:
    """Where the ranks of several nodes meet: the job's first node, on a port from its id (resolved on the host,
    where scontrol is; below Linux's ephemeral ports, apart from other jobs sharing a node)."""
    return [
        'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        "PORT=$((20000 + SLURM_JOB_ID % 10000))",
    ]


IGNORE_STOPS = f"trap '' {' '.join(STOP_SIGNALS)}"  # what training starts with, until its own handlers are installed
# torchrun answers TERM (which slurmstepd sends every process of a job's steps on scancel and preemption) by
# stopping its ranks and killing them 30 s later, however far their checkpoint has got. Told to leave TERM alone, it
# keeps the TERM it was started ignoring (IGNORE_STOPS, IGNORING_STOPS) and waits for its ranks, which get the stop
# themselves. (A torchrun that predates this setting still has its 30 s.)
TORCHRUN_SIGNALS = "export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT  # torchrun leaves TERM to the ranks"
# `sh -c IGNORING_STOPS NAME COMMAND...` runs COMMAND with the stop signals ignored until it installs its own handlers
# (and after it removes them), where IGNORE_STOPS cannot reach:
# - the srun task that runs torchrun on each node of several, which torchrun would otherwise die of (USR1, USR2) or
#   answer by killing its ranks (TERM, above). One node needs no srun, and must not have one: srun answers a TERM of
#   its own by killing its tasks at once ("forcing job termination"), so torchrun runs in the batch shell's step and
#   the ranks get their stops from it;
# - the command inside a container image: apptainer starts it with every signal at its default, whatever the job
#   script ignored, so a stop passed on again just after training stopped listening would kill it (exit 138).
IGNORING_STOPS = f'trap "" {" ".join(STOP_SIGNALS)}; exec "$@"'


def protocol_lines(start: str = f'({IGNORE_STOPS}; exec "${{START[@]}}") &') -> list[str]:
    """Run training in the background, pass stop signals on to it, and requeue the job when it answers that it
    checkpointed (75, or STOP_MARKER for several ranks); outside Slurm nothing requeues and the job ends with 75.
    `start` is the line that starts training (packed trials: their function, which passes signals on)."""
    return [
        "# The job as squeue and sacct name it: an array task is <array job>_<task>, not its own job id.",
        'JOB_LABEL=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID:-}}',
        'JOB_LABEL=${JOB_LABEL:-${SLURM_JOB_ID:-(not under Slurm)}}',
        'echo "hpclora: job $JOB_LABEL on $(hostname -s) started $(date \'+%F %T\') (restart ${SLURM_RESTART_COUNT:-0})"',
        "# Stop signals: USR1 before the time limit (--signal=B:USR1@... to this shell; submitit's USR2 to its job step),",
        "# TERM on preemption and scancel. Training runs in the background so that they can be passed on; it then saves",
        f"# a checkpoint at the next step boundary and exits with {CHECKPOINTED_EXIT} (\"checkpointed, not finished\"), or, as",
        "# several ranks under torchrun, with 0 and STOP_MARKER left by rank 0.",
        'child="" stop=""',
        'descendants() { local pid; for pid in $(pgrep -P "$1" 2>/dev/null); do echo "$pid"; descendants "$pid"; done; }',
        "send_stop() {  # one rank: to its process; ranks srun started: to every process of the job's steps; else to torchrun's",
        '    if ! $RANKS; then kill -s "$1" "$child" 2>/dev/null || true',
        '    elif $SRUN_RANKS; then scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || true',
        '    else for pid in $(descendants "$child"); do kill -s USR1 "$pid" 2>/dev/null || true; done; fi',
        "}",
        'forward() { if [ -z "$stop" ]; then stop=$1; if [ -n "$child" ]; then send_stop "$1"; fi; fi; }',
        *(f"trap 'forward {name}' {name}" for name in STOP_SIGNALS),
        "trap '' INT  # Ctrl-C of a job run here (--launcher local): training answers it, and this script reports how it ended",
        'rm -f "$STOP_MARKER"',
        f'export {STOP_MARKER_VAR}="$STOP_MARKER"',
        TORCHRUN_SIGNALS,
        "# Training starts with these signals ignored, so that one arriving before it is ready cannot kill it.",
        start,
        "child=$!",
        f"# Wait for training. Once a stop is asked for, repeat it every {RESEND_STOP_S} s until training has ended.",
        'while kill -0 "$child" 2>/dev/null; do',
        f'    if [ -n "$stop" ]; then send_stop "$stop"; sleep {RESEND_STOP_S} & wait $! || true',
        '    else wait "$child" || true; fi  # a trapped signal ends `wait` early',
        "done",
        "status=0",
        'wait "$child" || status=$?',
        f'if $RANKS && [ -f "$STOP_MARKER" ]; then status={CHECKPOINTED_EXIT}; fi  # checkpointed, not finished',
        f'cancelled=false; case "$(head -n 1 "$STOP_MARKER" 2>/dev/null)" in *" {CANCELLED}"*) cancelled=true;; esac  # `hpclora cancel`',
        '# How to go on where nothing requeues, as training says it (rundir.resume_command).',
        'resume=$(sed -n 2p "$STOP_MARKER" 2>/dev/null || true); resume=${resume:-"submit the job again"}',
        'rm -f "$STOP_MARKER"',
        f'if [ "$status" -eq {CHECKPOINTED_EXIT} ]; then',
        '    if [ -z "${SLURM_JOB_ID:-}" ]; then',
        '        echo "hpclora: checkpoint saved; not under Slurm, so nothing requeues; to resume: $resume"',
        '    elif [ "${SLURM_PROCID:-0}" != 0 ]; then',
        '        echo "hpclora: checkpoint saved; task 0 of the job decides whether it requeues"',
        "        exit 0",
        "    else",
        "        # On the host, not in the container (which has no scontrol). A job that scancel cancelled is",
        "        # COMPLETING by now and stays cancelled; a running one (time limit ahead, preemption) is requeued,",
        "        # runs this script again, and training resumes from its newest checkpoint.",
        '        state=$(squeue -h -j "$SLURM_JOB_ID" -o %T 2>/dev/null || true)',
        '        if $cancelled; then',
        '            echo "hpclora: checkpoint saved; \\`hpclora cancel\\` asked for it: cancelling job $JOB_LABEL instead of requeueing; to resume: $resume"',
        '            scancel "$SLURM_JOB_ID" 2>/dev/null || true',
        '        elif [ -n "$state" ] && [ "$state" != RUNNING ]; then',
        '            echo "hpclora: checkpoint saved; job ${SLURM_JOB_ID} is ${state} (cancelled): not requeueing; to resume: $resume"',
        '        elif [ "${SLURM_RESTART_COUNT:-0}" -lt "$MAX_REQUEUES" ]; then',
        '            echo "hpclora: checkpoint saved; requeueing job ${SLURM_JOB_ID} (restart $((${SLURM_RESTART_COUNT:-0} + 1)) of at most $MAX_REQUEUES)"',
        '            scontrol requeue "$SLURM_JOB_ID"',
        "            exit 0",
        "        else",
        '            echo "hpclora: checkpoint saved, but the job was requeued $MAX_REQUEUES times already ($REQUEUES_SET_BY): not requeueing; to resume: $resume" >&2',
        "        fi",
        "    fi",
        "fi",
        'echo "hpclora: job $JOB_LABEL ended $(date \'+%F %T\') with exit code $status"',
        'exit "$status"',
    ]


def packed_trial_lines(trials: int, per_task: int, cpus: int, log_prefix: str, command: str) -> list[str]:
    """An array task that runs `per_task` single-GPU trials side by side, one GPU each (of the task's
    CUDA_VISIBLE_DEVICES), each with its own run directory and log (the one an unpacked array task would have:
    `log_prefix` + "<array id>_<trial>.out", the prefix already shell text). `run_trials` passes stop signals on to
    every trial; each checkpoints, and if any did, it answers 75, the task requeues (protocol_lines) and runs again
    the trials not yet finished."""
    k = per_task
    return [
        f"# This array task runs up to {k} trials side by side (ids task x {k} and on), one GPU and {cpus} core(s) each.",
        "run_trials() (",
        "    pids=() slot=0 status=0",
        '    pass_on() { for pid in "${pids[@]}"; do kill -s "$1" "$pid" 2>/dev/null || true; done; }',
        *(f"    trap 'pass_on {name}' {name}" for name in STOP_SIGNALS),
        "    # The task's GPUs as Slurm's cgroup shows them; where it sets no CUDA_VISIBLE_DEVICES, the first ones of the node.",
        '    IFS=, read -r -a gpus <<< "${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((${SLURM_GPUS_ON_NODE:-0} - 1)))}"',
        f"    for trial in $(seq $((SLURM_ARRAY_TASK_ID * {k})) $((SLURM_ARRAY_TASK_ID * {k} + {k - 1}))); do",
        f'        [ "$trial" -lt {trials} ] || break',
        '        RUN_DIR="$SWEEP_DIR/trial-$(printf %03d "$trial")"',
        f'        LOG={log_prefix}"${{SLURM_ARRAY_JOB_ID}}_${{trial}}.out"',
        '        gpu="${gpus[$slot]:-}" slot=$((slot + 1))',
        '        if [ -d "$RUN_DIR/adapter" ]; then echo "hpclora: trial $trial finished already"; continue; fi',
        '        echo "hpclora: trial $trial in $RUN_DIR${gpu:+ on GPU $gpu}, log $LOG"',
        '        echo "hpclora: trial $trial of job ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} on $(hostname -s)${gpu:+, GPU $gpu}" >> "$LOG"',
        f'        ({IGNORE_STOPS}; export OMP_NUM_THREADS={cpus}; if [ -n "$gpu" ]; then export CUDA_VISIBLE_DEVICES="$gpu"; fi',
        f'         exec {command}) >> "$LOG" 2>&1 &',
        '        pids+=("$!")',
        "    done",
        f'    for pid in "${{pids[@]}}"; do  # {CHECKPOINTED_EXIT} (checkpointed: run again) over 0, a failure over both',
        '        while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done',
        '        code=0; wait "$pid" || code=$?',
        f'        if [ "$code" -ne 0 ] && {{ [ "$status" -eq 0 ] || [ "$status" -eq {CHECKPOINTED_EXIT} ]; }}; then status=$code; fi',
        "    done",
        '    exit "$status"',
        ")",
    ]
