"""The hand-usable job scripts in jobs/ (train.sbatch, sweep.sbatch), written by the same renderer as the scripts
of `hpclora submit`: the threads and the stop-and-requeue protocol are protocol.py's lines, word for word.
tests/test_launch.py fails when a file in jobs/ differs from what this writes (`HPCLORA_UPDATE_GOLDEN=1` rewrites
them). Unlike per-run scripts they take their resources from sbatch (the #SBATCH defaults below, or the command
line) and the config and overrides as arguments.
"""

from __future__ import annotations

import shlex

from .protocol import IGNORING_STOPS, protocol_lines, rendezvous_lines, thread_lines

TEMPLATES = ("train.sbatch", "sweep.sbatch")

SBATCH_DEFAULTS = [
    "--open-mode=append", "--nodes=1", "--ntasks=1", "--cpus-per-task=8", "--mem=32G", "--gres=gpu:1", "--time=04:00:00",
    "--signal=B:USR1@120", "--requeue",
]
OPTIONS_EXPLAINED = [
    "#",
    "# --output:      stdout and stderr together; the logs/ directory must exist (it does in the repository)",
    "# --open-mode:   a requeued job appends to its log instead of truncating it",
    "# --mem:         host memory: weights pass through it on their way to the GPU",
    "# --gres=gpu:1:  one GPU of any type; gpu:v100:1 asks for a type, gpu:0 or no line at all for none",
    "# --signal, --requeue: 120 s before the time limit (or on preemption) training saves a checkpoint and",
    "#                the job requeues itself, at most HPCLORA_MAX_REQUEUES (default 3) times; each restart",
    "#                resumes from the newest checkpoint in the same run directory",
]
ENVIRONMENT_HINT = [
    "# Environment modules, conda or a virtual environment: load them here, for example",
    "#   module load cuda/11.8",
    '#   source "$HOME/venvs/hpclora/bin/activate"',
]


def world_lines() -> list[str]:
    """The ranks this allocation holds (a rank per GPU on each node), the image (HPCLORA_IMAGE) and how the ranks
    start: several through torchrun, one srun task per node, meeting on localhost or at the first node."""
    return [
        "# To run inside a Singularity/Apptainer image, name it in HPCLORA_IMAGE:",
        "#   HPCLORA_IMAGE=$PWD/hpclora.sif sbatch jobs/train.sbatch CONFIG",
        "IN_IMAGE=()",
        'if [ -n "${HPCLORA_IMAGE:-}" ]; then',
        "    RUNTIME=$(command -v apptainer || command -v singularity) || {",
        '        echo "hpclora: HPCLORA_IMAGE is set but neither apptainer nor singularity is on PATH" >&2',
        "        exit 2",
        "    }",
        "    # apptainer starts the command inside with every signal at its default: training ignores the stops until it",
        "    # listens, as outside an image.",
        f'    IN_IMAGE=("$RUNTIME" exec --nv "$HPCLORA_IMAGE" /bin/sh -c {shlex.quote(IGNORING_STOPS)} hpclora-job)',
        "elif ! command -v hpclora >/dev/null 2>&1; then",
        """    echo "hpclora: the command hpclora is not on this job's PATH ($PATH)" >&2""",
        """    echo '  make it visible above (`module load ...`, or `source "$HOME/venvs/hpclora/bin/activate"`)' \\""",
        """         'or run it in an image: HPCLORA_IMAGE=$PWD/hpclora.sif sbatch ...' >&2""",
        "    exit 2",
        "fi",
        "",
        "NODES=${SLURM_JOB_NUM_NODES:-1} PER_NODE=${SLURM_GPUS_ON_NODE:-1}",
        "RANKS=$([ $((NODES * PER_NODE)) -gt 1 ] && echo true || echo false) SRUN_RANKS=$([ \"$NODES\" -gt 1 ] && echo true || echo false)",
        *thread_lines(),
        "# Rank 0 leaves this file when several ranks stopped at a checkpoint (they end with 0 under torchrun).",
        'STOP_MARKER="$PWD/logs/.hpclora-stopped-$SLURM_JOB_ID"',
        "MAX_REQUEUES=${HPCLORA_MAX_REQUEUES:-3} REQUEUES_SET_BY=HPCLORA_MAX_REQUEUES",
        "if $RANKS; then",
        "    # torchrun starts a rank per GPU. On one node it runs here, and the ranks meet on localhost; on several,",
        "    # one srun task per node runs it, and they meet at the first node (srun kills its tasks at once when it gets",
        "    # a TERM: several nodes have only the time limit's USR1 to checkpoint by). torchrun leaves the stop signals",
        "    # to the ranks, which checkpoint at the next step boundary however long that takes.",
        "    TORCHRUN=(\"${IN_IMAGE[@]}\" python3 -m torch.distributed.run \"--nnodes=$NODES\" \"--nproc-per-node=$PER_NODE\")",
        "    if $SRUN_RANKS; then",
        *(f"        {line}" for line in rendezvous_lines()),
        f"        START=(srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c {shlex.quote(IGNORING_STOPS)} hpclora-ranks",
        '               "${TORCHRUN[@]}" --rdzv-backend=c10d --rdzv-endpoint="$HEAD:$PORT" --rdzv-id="$SLURM_JOB_ID"',
        '               -m hpclora train "${TRAIN[@]}")',
        "    else",
        '        START=("${TORCHRUN[@]}" --standalone -m hpclora train "${TRAIN[@]}")',
        "    fi",
        "else",
        '    START=("${IN_IMAGE[@]}" hpclora train "${TRAIN[@]}")',
        "fi",
    ]


def train_template() -> str:
    """jobs/train.sbatch: `sbatch jobs/train.sbatch CONFIG [key=value ...]`."""
    return "\n".join([
        "#!/bin/bash",
        "# Fine-tune one LoRA/QLoRA run with hpclora as a Slurm batch job.",
        "#",
        "#   sbatch jobs/train.sbatch configs/open-calm-7b-qlora-dolly-ja.yaml [key=value ...]",
        "#",
        "# Submit from the repository root: the log goes to logs/<job name>-<job id>.out, and",
        "# `tail -f logs/hpclora-<job id>.out` shows progress, one line per logging step.",
        "# Options given to sbatch win over the #SBATCH lines below, e.g.",
        "#   sbatch --partition=gpu --gres=gpu:v100:1 --time=12:00:00 jobs/train.sbatch CONFIG",
        "# The run directory is <run.output_root>/<run.name>-<job id>; it stays the same if the job is requeued.",
        "#",
        "# Several GPUs, one node or more: ask for them and the script starts one rank per GPU through torchrun",
        "# (DDP, or FSDP per train.distributed), one srun task per node:",
        "#   sbatch --gres=gpu:4 jobs/train.sbatch CONFIG                                  # 4 GPUs of one node",
        "#   sbatch --nodes=2 --ntasks-per-node=1 --gres=gpu:4 jobs/train.sbatch CONFIG    # 8 GPUs on 2 nodes",
        "#",
        "# `hpclora submit CONFIG` writes a script like this one for each run, with the resources from the",
        "# config's `slurm:` section, checks the config first, and records the job for `hpclora status/logs`.",
        "#",
        "#SBATCH --job-name=hpclora",
        "#SBATCH --output=logs/%x-%j.out",
        *(f"#SBATCH {option}" for option in SBATCH_DEFAULTS),
        *OPTIONS_EXPLAINED,
        "",
        "set -eo pipefail",
        "",
        "if [ $# -lt 1 ]; then",
        '    echo "usage: sbatch jobs/train.sbatch CONFIG.yaml [key=value ...]" >&2',
        "    exit 2",
        "fi",
        'TRAIN=("$@")',
        "",
        *ENVIRONMENT_HINT,
        "",
        "set -u",
        *world_lines(),
        "",
        *protocol_lines(),
        "",
    ])


def sweep_template() -> str:
    """jobs/sweep.sbatch: `sbatch --array=0-N jobs/sweep.sbatch CONFIG TRIALS [key=value ...]`."""
    return "\n".join([
        "#!/bin/bash",
        "# A hyperparameter sweep as ONE Slurm job array: array task N trains with the overrides on line N+1",
        "# of a trials file.",
        "#",
        "#   printf '%s\\n' 'lora.r=8 train.lr=1e-4' 'lora.r=16 train.lr=1e-4' 'lora.r=16 train.lr=2e-4' > trials.txt",
        "#   sbatch --array=0-2%2 jobs/sweep.sbatch configs/open-calm-3b-lora.yaml trials.txt [key=value ...]",
        "#",
        "# `--array=0-2%2`: tasks 0 to 2 (one per line of trials.txt), at most 2 running at once.",
        "# Overrides after the trials file apply to every trial. A trial's overrides are separated by spaces,",
        "# so values cannot contain spaces here (`hpclora sweep` has no such limit).",
        "# Each trial's run directory is <run.output_root>/<run.name>-<array job id>_<task id>, and its log",
        "# logs/<job name>-<array job id>_<task id>.out. Several GPUs per task train as train.sbatch does.",
        "#",
        "# `hpclora sweep CONFIG --grid lora.r=8,16 --grid train.lr=1e-4,2e-4` builds the trials, checks",
        "# every trial's config, and submits a script like this one with a manifest of the trials.",
        "#",
        "#SBATCH --job-name=hpclora-sweep",
        "#SBATCH --output=logs/%x-%A_%a.out",
        *(f"#SBATCH {option}" for option in SBATCH_DEFAULTS),
        "",
        "set -eo pipefail",
        "",
        'if [ $# -lt 2 ] || [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then',
        '    echo "usage: sbatch --array=0-N jobs/sweep.sbatch CONFIG.yaml TRIALS.txt [key=value ...]" >&2',
        "    exit 2",
        "fi",
        "CONFIG=$1 TRIALS=$2",
        "shift 2",
        "# This task's line of the trials file, split into overrides.",
        'LINE=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$TRIALS")',
        'if [ -z "$LINE" ]; then',
        '    echo "hpclora: $TRIALS has no line $((SLURM_ARRAY_TASK_ID + 1)) for array task $SLURM_ARRAY_TASK_ID" >&2',
        "    exit 2",
        "fi",
        'read -r -a TRIAL <<< "$LINE"',
        'TRAIN=("$CONFIG" "$@" "${TRIAL[@]}")',
        "",
        *ENVIRONMENT_HINT,
        "",
        "set -u",
        *world_lines(),
        "",
        'echo "hpclora: array task ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}: ${TRIAL[*]}"',
        *protocol_lines(),
        "",
    ])


def render_template(name: str) -> str:
    return {"train.sbatch": train_template, "sweep.sbatch": sweep_template}[name]()
