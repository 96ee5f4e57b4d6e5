"""Loaded by every Python of a test job whose PYTHONPATH leads here (tests/test_slurm.py's `paced`): it changes when
things happen in the job, never what is computed.

HPCLORA_TEST_STEP_S=S   every step ends S seconds later (a sleep where the ranks meet at the step's end): a run
                        meant to outlast the test's signals waits for them asleep instead of training, and
                        checkpointing, step after step, on cores the other tests need.
HPCLORA_TEST_RECORD=FILE   each Python of the job appends one JSON line to FILE: its job, the value of HPCLORA_TEST_RECORD_VAR
                        as it reads it, and whether it sees each folder of HPCLORA_TEST_SEES (one per line): what
                        a container's --env and -B handed the process inside.
HPCLORA_TEST_SLOW_EXIT=S   each Python of the job ends S seconds after its work is done (as freeing a large model or a
                        GPU's context takes): a stop passed on again in that time reaches a process that no longer
                        listens for it.
HPCLORA_TEST_SLOW_CHECKPOINT=FILE   once FILE exists, the next checkpoint rank 0 publishes takes 40 s longer
                        (the file is removed): longer than the 30 s torchrun gives its ranks between TERM and SIGKILL.
"""

import atexit
import json
import os
import pathlib
import time

if os.environ.get("HPCLORA_TEST_RECORD"):
    with open(os.environ["HPCLORA_TEST_RECORD"], "a", encoding="utf-8") as record:
        sees = [p for p in os.environ.get("HPCLORA_TEST_SEES", "").split("\n") if p]
        record.write(json.dumps({"job": os.environ.get("SLURM_JOB_ID"), "value": os.environ.get(os.environ.get("HPCLORA_TEST_RECORD_VAR", "")),
                                 "sees": {p: os.path.isdir(p) for p in sees}}) + "\n")

if os.environ.get("HPCLORA_TEST_SLOW_EXIT"):
    atexit.register(time.sleep, float(os.environ["HPCLORA_TEST_SLOW_EXIT"]))  # registered first: runs last

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
