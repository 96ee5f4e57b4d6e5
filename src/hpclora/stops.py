"""What a stop is, for every part of a job (the training, its job script, the launchers that run it): the signals
that ask training to checkpoint at the next step boundary and stop, and the exit code of a training that did.

Slurm (or the job script that passes it on) sends USR1 before a time limit or on preemption, submitit asks for
USR2, and `scancel` and preemption send TERM.
"""

import os

STOP_SIGNALS = ("USR1", "USR2", "TERM")
# `hpclora cancel` asks for the same stop through a file in the run directory naming the job (any launcher, any
# number of ranks, no signal timing), and the training that stopped for it says so in the stop marker: the job
# script then cancels the job instead of requeueing it.
CANCEL_REQUEST = ".cancel-requested"
CANCELLED = "cancel"
CANCEL_WAIT_S = 300  # how long `hpclora cancel` waits for the checkpoints; the jobs finish the cancel themselves after that


def job_label(env=os.environ) -> str | None:
    """The job as squeue and sacct name it: `<array job>_<task>` for an array task, else its id; None outside Slurm."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")
# EX_TEMPFAIL from sysexits.h: "checkpointed, not finished: run the same command again to continue".
CHECKPOINTED_EXIT = 75
