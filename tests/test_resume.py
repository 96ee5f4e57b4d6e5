"""Preemption on CPU, in real processes: a stop signal -> atomic checkpoint -> exit 75 -> the same
command resumes exactly. The Slurm side (requeue from the batch script) is in test_slurm.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpclora.job import checkpoint
from hpclora.stops import CHECKPOINTED_EXIT

from conftest import tiny_run_yaml

STEPS = 24  # 20 training rows / 4 per step = 5 steps per epoch: about 5 epochs


def resume_config(tmp_path: Path, model_dir: Path, data: dict | None = None, **train) -> Path:
    return tiny_run_yaml(
        tmp_path, model_dir, run={"name": "resume"}, data=data or {},
        lora={"dropout": 0.1},  # dropout draws random numbers: the RNG state must be restored too
        train={"max_steps": STEPS, "eval_every": 7, **train},
    )


def train_argv(config: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "hpclora", "train", str(config), "--run-dir", str(run_dir)]


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [e["step"] for e in map(json.loads, path.read_text().splitlines()) if "loss" in e]


def interrupt_after(config: Path, run_dir: Path, step: int, sig=signal.SIGUSR1) -> subprocess.CompletedProcess:
    """Start training, send `sig` once `step` is logged, and return the finished process."""
    proc = subprocess.Popen(train_argv(config, run_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not any(s >= step for s in logged_steps(run_dir)):
        assert proc.poll() is None, f"training ended before step {step}:\n{proc.stdout.read()}"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def adapter_tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    worst = max((ta[k] - tb[k]).abs().max().item() for k in ta)
    assert worst <= 1e-6, f"max abs difference {worst}"
    assert all((ta[k] == tb[k]).all() for k in ta), f"within 1e-6 ({worst}) but not bit-identical"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama_dir):
    """An uninterrupted run with the same config and seed."""
    tmp = tmp_path_factory.mktemp("reference")
    config = resume_config(tmp, tiny_llama_dir)
    done = subprocess.run(train_argv(config, tmp / "run"), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return tmp / "run"


def test_three_interruptions_end_with_the_uninterrupted_adapter(tmp_path, tiny_llama_dir, reference):
    config = resume_config(tmp_path, tiny_llama_dir)
    run_dir = tmp_path / "run"
    # Mid-epoch (step 3 of 5), at an epoch boundary or just after, and after a periodic evaluation (step 7, 14).
    for k, (step, sig) in enumerate([(3, signal.SIGUSR1), (9, signal.SIGTERM), (15, signal.SIGUSR2)]):
        stopped = interrupt_after(config, run_dir, step, sig)
        assert stopped.returncode == CHECKPOINTED_EXIT, stopped.stdout
        saved = checkpoint.step_of(checkpoint.latest(run_dir / "checkpoints"))
        assert saved >= step and f"stopped by {sig.name} at step {saved}/{STEPS}" in stopped.stdout
        if k:
            assert f"resumed from step {previous} (restart {k})" in stopped.stdout
        assert not (run_dir / "adapter").exists()
        previous = saved
    final = subprocess.run(train_argv(config, run_dir), capture_output=True, text=True)
    assert final.returncode == 0, final.stdout + final.stderr
    assert f"resumed from step {previous} (restart 3)" in final.stdout

    assert_same_adapter(run_dir, reference)
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))  # none missing, none twice
    evals = lambda d: [(e["step"], e["eval"]) for e in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "eval" in e]  # noqa: E731
    assert evals(run_dir) == evals(reference) and ((7, "eval") in evals(run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"] == 3 and summary["base_val_loss"] == json.loads((reference / "summary.json").read_text())["base_val_loss"]
    attempts = [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]
    assert [a["restart"] for a in attempts] == [0, 1, 2, 3]


def test_an_unpacked_run_batched_by_length_resumes_exactly(tmp_path, tiny_llama_dir):
    """Unpacked rows are drawn in batches of similar lengths, a shuffle of its own: a run stopped mid-epoch and
    in a later epoch still trains the batches of the uninterrupted one."""
    unpacked = {"packing": False}
    (tmp_path / "ref").mkdir()
    reference = subprocess.run(train_argv(resume_config(tmp_path / "ref", tiny_llama_dir, unpacked), tmp_path / "ref" / "run"),
                               capture_output=True, text=True)
    assert reference.returncode == 0 and "not packed (data.packing=false)" in reference.stdout, reference.stdout + reference.stderr
    config = resume_config(tmp_path, tiny_llama_dir, unpacked)
    for step in (3, 11):
        assert interrupt_after(config, tmp_path / "run", step).returncode == CHECKPOINTED_EXIT
    final = subprocess.run(train_argv(config, tmp_path / "run"), capture_output=True, text=True)
    assert final.returncode == 0 and "(restart 2)" in final.stdout, final.stdout + final.stderr
    assert_same_adapter(tmp_path / "run", tmp_path / "ref" / "run")


KILL_MID_WRITE = """
import os, signal, sys
from hpclora.job import checkpoint
from hpclora.cli import main

publish = checkpoint.publish
def publish_then_die(staged, root, state, keep):
    if checkpoint.step_of(staged) == {step}:
        (staged / checkpoint.STATE).write_text('{{"half": ')  # half a file, no marker: then the power goes
        os.kill(os.getpid(), signal.SIGKILL)
    return publish(staged, root, state, keep)
checkpoint.publish = publish_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_while_writing_a_checkpoint_loses_only_that_checkpoint(tmp_path, tiny_llama_dir, reference):
    config = resume_config(tmp_path, tiny_llama_dir, save_every=5)
    run_dir = tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, "-c", KILL_MID_WRITE.format(step=10), "train", str(config), "--run-dir", str(run_dir)],
        capture_output=True, text=True,
    )
    assert killed.returncode == -signal.SIGKILL
    assert (run_dir / "checkpoints" / checkpoint.STAGING / "checkpoint-10").is_dir()  # the half-written one
    assert checkpoint.step_of(checkpoint.latest(run_dir / "checkpoints")) == 5

    resumed = subprocess.run(train_argv(config, run_dir), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from step 5 (restart 1)" in resumed.stdout
    assert_same_adapter(run_dir, reference)
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))
    kept = [p.name for p in checkpoint.complete_checkpoints(run_dir / "checkpoints")]
    assert kept == ["checkpoint-20", "checkpoint-24"]  # train.keep_checkpoints = 2 (the last step saves too)
    assert not (run_dir / "checkpoints" / checkpoint.STAGING).exists()


def test_a_checkpoint_without_its_marker_is_never_used(tmp_path):
    root = tmp_path / "checkpoints"
    for step, marked in ((4, True), (8, True), (12, False)):
        (root / f"checkpoint-{step}").mkdir(parents=True)
        if marked:
            (root / f"checkpoint-{step}" / checkpoint.COMPLETE).write_text("ok\n")
    assert checkpoint.latest(root).name == "checkpoint-8"
    checkpoint.discard_partial(root)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-4", "checkpoint-8"]


def test_resuming_with_a_different_config_is_refused(tmp_path, tiny_llama_dir):
    config = resume_config(tmp_path, tiny_llama_dir)
    run_dir = tmp_path / "run"
    assert interrupt_after(config, run_dir, 2).returncode == CHECKPOINTED_EXIT
    before = (run_dir / "config.yaml").read_text()
    other = subprocess.run([*train_argv(config, run_dir), "train.lr=1e-3"], capture_output=True, text=True)
    assert other.returncode == 2 and "holds checkpoints of a different config" in other.stderr
    assert "Traceback" not in other.stderr
    assert (run_dir / "config.yaml").read_text() == before  # the run's own config is left as it was


def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_one_before_it_resumes(tmp_path, tiny_llama_dir, reference):
    config = resume_config(tmp_path, tiny_llama_dir, save_every=5)
    run_dir = tmp_path / "run"
    assert interrupt_after(config, run_dir, 12).returncode == CHECKPOINTED_EXIT
    newest = checkpoint.latest(run_dir / "checkpoints")
    older = checkpoint.step_of(checkpoint.complete_checkpoints(run_dir / "checkpoints")[-2])
    weights = newest / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated under its COMPLETE marker

    resumed = subprocess.run(train_argv(config, run_dir), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"{newest.name} is damaged (adapter_model.safetensors does not match its checksum" in resumed.stdout
    assert f"resumed from step {older} (restart 1)" in resumed.stdout and "Traceback" not in resumed.stderr
    assert (run_dir / "checkpoints" / f"damaged-{newest.name}").is_dir()  # kept for a look, never used
    assert_same_adapter(run_dir, reference)
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))


def test_a_second_training_in_the_same_run_directory_is_refused_until_the_first_dies(tmp_path, tiny_llama_dir):
    config = resume_config(tmp_path, tiny_llama_dir, max_steps=2000, eval_every=0)
    run_dir = tmp_path / "run"
    first = subprocess.Popen(train_argv(config, run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not logged_steps(run_dir):
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        second = subprocess.run(train_argv(config, run_dir), capture_output=True, text=True)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"is in use by another `hpclora train` (host {os.uname().nodename}, pid {first.pid}" in second.stderr
        fresh = subprocess.run([*train_argv(config, run_dir), "--fresh"], capture_output=True, text=True)
        assert fresh.returncode == 2 and (run_dir / "metrics.jsonl").exists()  # --fresh does not empty a run in use
    finally:
        first.kill()
        first.wait()
    third = subprocess.run([*train_argv(config, run_dir), "train.max_steps=2", "--fresh"], capture_output=True, text=True)
    assert third.returncode == 0, third.stdout + third.stderr  # the lock died with its holder


def test_a_restart_before_any_checkpoint_logs_every_step_once_and_reuses_the_base_evaluation(tmp_path, tiny_llama_dir, reference):
    """An OOM kill or a node failure before the first save: nothing to resume, but nothing logged twice."""
    config = resume_config(tmp_path, tiny_llama_dir)
    run_dir = tmp_path / "run"
    killed = interrupt_after(config, run_dir, 3, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL and checkpoint.latest(run_dir / "checkpoints") is None
    again = subprocess.run(train_argv(config, run_dir), capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "restart 1 from step 0 (no checkpoint yet)" in again.stdout
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))
    evals = lambda d: [(e["step"], e["eval"], e["val_loss"]) for e in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "eval" in e]  # noqa: E731
    assert evals(run_dir) == evals(reference)  # one base evaluation, with the same number
    assert_same_adapter(run_dir, reference)


def test_a_stop_signal_after_the_last_step_finishes_the_run_instead_of_claiming_a_checkpoint(tmp_path, tiny_llama_dir):
    from hpclora import config as config_module
    from hpclora.job.preempt import StopRequest
    from hpclora.job.train import train

    class SignalAfterTheLastStep(StopRequest):
        """Sends this process a real SIGUSR1 just after the last step boundary was checked (step 3 of 3),
        a moment no outside sender can hit reliably."""

        reads = 0

        @property
        def requested(self):
            self.reads += 1
            if self.reads == 4:
                os.kill(os.getpid(), signal.SIGUSR1)
            return self.signal_name is not None

    cfg = config_module.load(tiny_run_yaml(tmp_path, tiny_llama_dir, train={"max_steps": 3, "save_every": 0}))
    with SignalAfterTheLastStep() as stop:
        run = train(cfg, run_dir=str(tmp_path / "run"), stop=stop)
    assert stop.signal_name == "SIGUSR1" and run.finished
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    assert run.summary["final_val_loss"] is not None and run.summary["steps"] == 3


def test_train_refuses_run_directories_it_did_not_make_and_fresh_removes_only_its_own_files(tmp_path, tiny_llama_dir, capsys):
    """`--run-dir` on a user's directory (a thesis and their data) or on a file is refused with exit 2 and
    nothing changed; `--fresh` on a real run directory removes what hpclora wrote, and refuses where a user's
    file was added to it."""
    from hpclora.cli import main

    config = tiny_run_yaml(tmp_path, tiny_llama_dir, train={"max_steps": 1})
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "thesis.txt").write_text("three years of work")
    (mine / "data" / "rows.jsonl").write_text("{}\n")
    (tmp_path / "a-file").write_text("not a directory")
    for target, flags, expected in ((mine, ["--fresh"], "is not a run directory of hpclora and holds data, thesis.txt"),
                                    (mine, [], "is not a run directory of hpclora"),
                                    (tmp_path / "a-file", [], "a file of that name exists")):
        assert main(["train", str(config), "--run-dir", str(target), *flags]) == 2
        assert expected in capsys.readouterr().err
    assert (mine / "thesis.txt").read_text() == "three years of work" and (mine / "data" / "rows.jsonl").exists()
    assert sorted(p.name for p in mine.iterdir()) == ["data", "thesis.txt"] and (tmp_path / "a-file").is_file()

    run_dir = tmp_path / "run"
    assert main(["train", str(config), "--run-dir", str(run_dir)]) == 0
    (run_dir / "notes.txt").write_text("my notes on this run")
    assert main(["train", str(config), "--run-dir", str(run_dir), "--fresh"]) == 2
    assert "holds what hpclora did not write (notes.txt)" in capsys.readouterr().err
    assert (run_dir / "adapter").is_dir() and (run_dir / "notes.txt").exists()
    (run_dir / "notes.txt").unlink()
    before = (run_dir / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    assert main(["train", str(config), "--run-dir", str(run_dir), "--fresh"]) == 0
    assert (run_dir / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns != before
    assert len((run_dir / "attempts.jsonl").read_text().splitlines()) == 1  # started over
