"""Loaded by every Python of a test job whose PYTHONPATH leads here (tests/test_slurm.py's `paced`): it changes when
things happen in the job, never what is computed.

HPCLORA_TEST_STEP_S=S   every step ends S seconds later (a sleep where the ranks meet at the step's end): a run
                        meant to outlast the test's signals waits for them asleep instead of training, and
                        checkpointing, step after step, on cores the other tests need.
HPCLORA_TEST_SLOW_CHECKPOINT=FILE   once FILE exists, the next checkpoint rank 0 publishes takes 40 s longer
                        (the file is removed): longer than the 30 s torchrun gives its ranks between TERM and SIGKILL.
"""

import os
import pathlib
import time

if os.environ.get("HPCLORA_TEST_STEP_S"):
    import hpclora.job.distributed as distributed

    step_s, sum_over_ranks = float(os.environ["HPCLORA_TEST_STEP_S"]), distributed.sum_over_ranks

    def paced_sum_over_ranks(values):
        time.sleep(step_s)
        return sum_over_ranks(values)

    distributed.sum_over_ranks = paced_sum_over_ranks

if os.environ.get("HPCLORA_TEST_SLOW_CHECKPOINT"):
    import hpclora.job.checkpoint as checkpoint

    slow, publish = pathlib.Path(os.environ["HPCLORA_TEST_SLOW_CHECKPOINT"]), checkpoint.publish

    def slow_publish(*args, **kwargs):
        if slow.exists():
            slow.unlink()
            print("test: this checkpoint takes 40 s", flush=True)
            time.sleep(40)
        return publish(*args, **kwargs)

    checkpoint.publish = slow_publish
