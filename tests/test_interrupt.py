"""Ctrl-C keeps the work in every way of training here: `hpclora train`, `make demo` and `submit --launcher local`.
The first Ctrl-C checkpoints at the next step boundary and says how to resume; a second one stops at once and says
what was lost. A terminal's Ctrl-C is SIGINT to its foreground process group: each command starts in a session of
its own and the test sends SIGINT to that group, as the terminal would. Steps are paced (tests/slurm/site) so that
the commands wait for the test's keys asleep; every key waits for the line that shows the one before it arrived."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, tiny_run_yaml
from test_resume import logged_steps
from test_slurm import paced
from hpclora.stops import CHECKPOINTED_EXIT

INTERRUPTED_EXIT = 130


class Terminal:
    """A command in a session of its own, its output in a file that the test reads as it grows."""

    def __init__(self, argv: list[str], tmp_path: Path, env: dict):
        self.out = tmp_path / f"terminal-{time.monotonic_ns()}.txt"
        with open(self.out, "w") as fh:
            self.proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_for(self, condition, what: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not condition():
            assert self.proc.poll() is None, f"ended before {what}:\n{self.text()}"
            assert time.time() < deadline, f"no {what} in {timeout} s:\n{self.text()}"
            time.sleep(0.1)

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)

    def ended(self) -> tuple[int, str]:
        return self.proc.wait(timeout=300), self.text()


def interrupted_once(argv: list[str], run_dir: Path, tmp_path: Path, env: dict) -> tuple[int, str]:
    """Ctrl-C once, after two steps."""
    terminal = Terminal(argv, tmp_path, paced(env, 0.5))
    terminal.wait_for(lambda: len(logged_steps(run_dir)) >= 2, "two steps")
    terminal.ctrl_c()
    return terminal.ended()


def interrupted_twice(argv: list[str], tmp_path: Path, env: dict) -> tuple[int, str]:
    """Ctrl-C once, and again while the checkpoint it asked for is written (40 s long, tests/slurm/site)."""
    slow = tmp_path / "slow-checkpoint"
    slow.touch()
    terminal = Terminal(argv, tmp_path, paced(env, 0.5, HPCLORA_TEST_SLOW_CHECKPOINT=str(slow)))
    terminal.wait_for(lambda: "step 2/" in terminal.text(), "two steps")
    terminal.ctrl_c()
    terminal.wait_for(lambda: "this checkpoint takes 40 s" in terminal.text(), "the checkpoint")
    terminal.ctrl_c()
    return terminal.ended()


def hpclora(*args) -> list[str]:
    return [sys.executable, "-m", "hpclora", *map(str, args)]


def test_ctrl_c_in_hpclora_train_checkpoints_and_the_printed_command_resumes(tmp_path, tiny_llama_dir):
    """The checkpoint and the resume are those of any stop signal, which test_resume.py finds exact."""
    config, run_dir = tiny_run_yaml(tmp_path, tiny_llama_dir, train={"max_steps": 8, "save_every": 0}), tmp_path / "run"
    code, out = interrupted_once(hpclora("train", config, "--run-dir", run_dir), run_dir, tmp_path, os.environ)
    assert code == CHECKPOINTED_EXIT, out
    assert "Ctrl-C received: checkpointing at the next step boundary; Ctrl-C again stops at once" in out
    resume = f"hpclora train {run_dir}/config.yaml --run-dir {run_dir}"
    assert f"checkpoint saved; to resume: {resume}" in out and "Traceback" not in out
    stopped_at = max(logged_steps(run_dir))
    done = subprocess.run([sys.executable, "-m", *shlex.split(resume)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"resumed from step {stopped_at}" in done.stdout and logged_steps(run_dir) == list(range(1, 9))


def test_a_second_ctrl_c_stops_at_once_and_says_what_was_lost(tmp_path, tiny_llama_dir):
    config, run_dir = tiny_run_yaml(tmp_path, tiny_llama_dir, train={"max_steps": 50, "save_every": 0}), tmp_path / "run"
    code, out = interrupted_twice(hpclora("train", config, "--run-dir", run_dir), tmp_path, os.environ)
    assert code == INTERRUPTED_EXIT, out
    assert "stopped at once by a second Ctrl-C: what it trained after step 0 is lost (logged up to step" in out
    assert f"there is no checkpoint: it starts over; to resume: hpclora train {run_dir}/config.yaml --run-dir {run_dir}" in out
    assert "Traceback" not in out and not [c for c in (run_dir / "checkpoints").glob("checkpoint-*") if (c / "COMPLETE").exists()]


def test_ctrl_c_in_make_demo_checkpoints_and_make_demo_again_goes_on(tmp_path, tiny_llama_dir):
    config, run_dir = tiny_run_yaml(tmp_path, tiny_llama_dir, train={"max_steps": 8, "save_every": 0}), tmp_path / "demo"
    make = ["make", "--no-print-directory", "-o", "setup", "demo-train", f"BIN={Path(sys.executable).parent}",
            f"DEMO_CONFIG={config}", f"DEMO_RUN={run_dir}"]
    code, out = interrupted_once(make, run_dir, tmp_path, os.environ)
    assert code != 0 and "Ctrl-C received: checkpointing at the next step boundary" in out, out
    assert f"checkpoint saved; to resume: hpclora train {run_dir}/config.yaml --run-dir {run_dir}" in out
    stopped_at = max(logged_steps(run_dir))
    again = subprocess.run(make, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"going on with the interrupted demo in {run_dir}" in again.stdout and f"resumed from step {stopped_at}" in again.stdout
    assert logged_steps(run_dir) == list(range(1, 9)) and (run_dir / "adapter").is_dir()


@pytest.mark.parametrize("twice", [False, True])
def test_ctrl_c_of_a_local_launch_keeps_the_work_and_submit_run_dir_goes_on(tmp_path, tiny_llama_dir, twice):
    config = tiny_run_yaml(tmp_path, tiny_llama_dir, train={"max_steps": 8 if not twice else 50, "save_every": 0})
    argv = hpclora("submit", config, "--launcher", "local")
    if twice:
        code, out = interrupted_twice(argv, tmp_path, os.environ)
        assert code == INTERRUPTED_EXIT, out
        assert "stopped at once by a second Ctrl-C: what it trained after step 0 is lost" in out and "Traceback" not in out
        return
    run_dir = None

    def started():
        nonlocal run_dir
        found = list((tmp_path / "runs").glob("tiny-*"))
        run_dir = found[0] if found else None
        return run_dir is not None and len(logged_steps(run_dir)) >= 2

    terminal = Terminal(argv, tmp_path, paced(os.environ, 0.5))
    terminal.wait_for(started, "two steps")
    terminal.ctrl_c()
    code, out = terminal.ended()
    assert code == CHECKPOINTED_EXIT, out
    resume = f"hpclora submit {run_dir}"
    assert f"checkpoint saved; to resume: {resume}" in out
    assert f"nothing requeues; to resume: {resume}" in out  # the job script says the same
    stopped_at = max(logged_steps(run_dir))
    done = subprocess.run([sys.executable, "-m", *shlex.split(resume)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from step {stopped_at}" in done.stdout and logged_steps(run_dir) == list(range(1, 9))
