"""What a stop is, for every part of a job (the training, its job script, the launchers that run it): the signals
that ask training to checkpoint at the next step boundary and stop, and the exit code of a training that did.

Slurm (or the job script that passes it on) sends USR1 before a time limit or on preemption, submitit asks for
USR2, and `scancel` and preemption send TERM.
"""

STOP_SIGNALS = ("USR1", "USR2", "TERM")
# EX_TEMPFAIL from sysexits.h: "checkpointed, not finished: run the same command again to continue".
CHECKPOINTED_EXIT = 75
