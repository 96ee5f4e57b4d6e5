"""Preemption on CPU: a stop signal -> atomic checkpoint -> exit 75 -> training again in the run directory resumes exactly. The Slurm
side (requeue from the batch script) is in test_slurm.py.

Training runs in this process wherever no other process is needed: a stop is a real signal that training sends
itself at the step boundary it is meant for (StopAt), so no test waits on a clock or races the end of a run. Real
processes are started only to be killed (SIGKILL), to hold a run directory's lock, and for the command line's
own exit code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpclora import config as config_module
from hpclora.cli import main
from hpclora.job import checkpoint
from hpclora.job.preempt import StopRequest
from hpclora.stops import CHECKPOINTED_EXIT

from hpclora.errors import UserError

from conftest import StopAt, file_size_limit, tiny_run_yaml

STEPS = 24  # 20 training rows / 4 per step = 5 steps per epoch: about 5 epochs
WARMUP_STEPS = 4  # a resumed run must also resume its learning-rate schedule


def resume_config(tmp_path: Path, model_dir: Path, data: dict | None = None, **train) -> Path:
    return tiny_run_yaml(
        tmp_path, model_dir, run={"name": "resume"}, data=data or {},
        lora={"dropout": 0.1},  # dropout draws random numbers: the RNG state must be restored too
        train={"max_steps": STEPS, "eval_every": 7, "warmup_ratio": WARMUP_STEPS / STEPS, **train},
    )


def train_here(config: Path, run_dir: Path, stop_at: int | None = None, sig=signal.SIGUSR1, overrides=(), capsys=None):
    """`hpclora train` in this process; with `stop_at`, stopped by `sig` at that step. Returns (TrainedRun, its log)."""
    from hpclora.job.train import train

    cfg = config_module.load(config, list(overrides))
    with StopAt(stop_at, sig) if stop_at else StopRequest() as stop:
        run = train(cfg, run_dir=str(run_dir), stop=stop)
    return run, capsys.readouterr().out if capsys else ""


def train_argv(config: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "hpclora", "train", str(config), "--run-dir", str(run_dir)]


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [e["step"] for e in map(json.loads, path.read_text().splitlines()) if "loss" in e]


def killed_at(argv: list[str], run_dir: Path, step: int) -> subprocess.CompletedProcess:
    """Start a training process and SIGKILL it once `step` is logged (a node failure or an OOM kill)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not any(s >= step for s in logged_steps(run_dir)):
        assert proc.poll() is None, f"training ended before step {step}:\n{proc.stdout.read()}"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.kill()
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


def evals(run_dir: Path) -> list[tuple]:
    return [(e["step"], e["eval"], e["val_loss"]) for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval" in e]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama_dir):
    """An uninterrupted run with the same config and seed."""
    tmp = tmp_path_factory.mktemp("reference")
    run, _ = train_here(resume_config(tmp, tiny_llama_dir), tmp / "run")
    assert run.finished
    rates = [e["lr"] for e in map(json.loads, (tmp / "run" / "metrics.jsonl").read_text().splitlines()) if "lr" in e]
    peak = 2e-4  # train.lr by default
    assert rates[:WARMUP_STEPS] == pytest.approx([peak * (i + 1) / WARMUP_STEPS for i in range(WARMUP_STEPS)])  # none at 0
    return tmp / "run"


def test_three_interruptions_end_with_the_uninterrupted_adapter(tmp_path, tiny_llama_dir, reference, capsys):
    config = resume_config(tmp_path, tiny_llama_dir)
    run_dir = tmp_path / "run"
    # Mid-epoch (step 3 of 5), at an epoch boundary or just after, and after a periodic evaluation (step 7, 14);
    # each stop counts from the step the attempt resumed at.
    stops = [(3, signal.SIGUSR1), (9, signal.SIGTERM), (15, signal.SIGUSR2)]
    previous = 0
    for k, (step, sig) in enumerate(stops):
        run, log = train_here(config, run_dir, step - previous, sig, capsys=capsys)
        assert not run.finished and checkpoint.step_of(checkpoint.latest(run_dir / "checkpoints")) == step
        assert f"stopped by {sig.name} at step {step}/{STEPS}: checkpoint saved" in log
        if k:
            assert f"resumed from step {previous} (restart {k})" in log
        assert not (run_dir / "adapter").exists()
        previous = step
    trained_before_last = checkpoint.read_state(checkpoint.latest(run_dir / "checkpoints"))["trained_s"]  # steps 1-15
    run, log = train_here(config, run_dir, capsys=capsys)
    assert run.finished and f"resumed from step {previous} (restart 3)" in log

    assert_same_adapter(run_dir, reference)
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))  # none missing, none twice
    assert [e[:2] for e in evals(run_dir)] == [e[:2] for e in evals(reference)] and (7, "eval") in [e[:2] for e in evals(run_dir)]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"] == 3 and summary["base_val_loss"] == json.loads((reference / "summary.json").read_text())["base_val_loss"]
    attempts = [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]
    assert [a["restart"] for a in attempts] == [0, 1, 2, 3]
    # The whole run and the last attempt, each said for what it is.
    assert summary["attempt_steps"] == STEPS - 15 and summary["run_trained_s"] > trained_before_last > 0
    assert summary["run_trained_s"] - trained_before_last >= summary["runtime_s"] - 0.2  # this attempt's share holds its own
    seconds = summary["run_trained_s"]  # rounded to 0.1 s: the rate was computed from the unrounded time
    assert summary["tokens"] / (seconds + 0.05) - 0.05 <= summary["run_tokens_per_s"] <= summary["tokens"] / (seconds - 0.05) + 0.05
    assert f"done: {STEPS} steps in " in log and " of training over 4 attempts, " in log and "since the first start" in log
    assert f"this attempt: {STEPS - 15} steps in " in log
    from hpclora.results.report import restart_marks, run_report

    assert restart_marks(run_dir) == [(3, "restart 1: from step 3"), (9, "restart 2: from step 9"), (15, "restart 3: from step 15")]
    report = run_report(run_dir).read_text()
    assert "| tokens/s, whole run |" in report and "| training time, all 4 attempts |" in report
    assert f"| last attempt | {STEPS - 15} steps in " in report


def test_the_command_line_exits_75_on_a_stop_and_the_same_command_resumes(tmp_path, tiny_llama_dir, reference):
    """The exit code a job script reads: 75, checkpointed, not finished; and the same command line goes on. A
    process is needed for the signal to come from outside (its handler is installed before the slow imports)."""
    config = resume_config(tmp_path, tiny_llama_dir)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(train_argv(config, run_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not logged_steps(run_dir):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == CHECKPOINTED_EXIT, out
    assert "TERM received: checkpointing at the next step boundary" in out and f"checkpoint saved; to resume: hpclora train {run_dir}/config.yaml --run-dir {run_dir}" in out
    assert main(["train", str(config), "--run-dir", str(run_dir)]) == 0
    assert_same_adapter(run_dir, reference)


def test_an_unpacked_run_batched_by_length_resumes_exactly(tmp_path, tiny_llama_dir, capsys):
    """Unpacked rows are drawn in batches of similar lengths, a shuffle of its own: a run stopped mid-epoch and
    in a later epoch still trains the batches of the uninterrupted one."""
    unpacked = {"packing": False}
    (tmp_path / "ref").mkdir()
    _, log = train_here(resume_config(tmp_path / "ref", tiny_llama_dir, unpacked), tmp_path / "ref" / "run", capsys=capsys)
    assert "not packed (data.packing=false)" in log
    config = resume_config(tmp_path, tiny_llama_dir, unpacked)
    train_here(config, tmp_path / "run", 3)
    train_here(config, tmp_path / "run", 11 - 3)
    run, log = train_here(config, tmp_path / "run", capsys=capsys)
    assert run.finished and "(restart 2)" in log
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


def test_a_kill_while_writing_a_checkpoint_or_a_metrics_line_loses_only_that_checkpoint(tmp_path, tiny_llama_dir, reference, capsys):
    config = resume_config(tmp_path, tiny_llama_dir, save_every=5)
    run_dir = tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, "-c", KILL_MID_WRITE.format(step=10), "train", str(config), "--run-dir", str(run_dir)],
        capture_output=True, text=True,
    )
    assert killed.returncode == -signal.SIGKILL
    assert (run_dir / "checkpoints" / checkpoint.STAGING / "checkpoint-10").is_dir()  # the half-written one
    assert checkpoint.step_of(checkpoint.latest(run_dir / "checkpoints")) == 5
    with open(run_dir / "metrics.jsonl", "a") as fh:  # and a metrics line cut the same way
        fh.write('{"step": 11, "loss": 10.8')
    cut = len((run_dir / "metrics.jsonl").read_text().splitlines())

    run, log = train_here(config, run_dir, capsys=capsys)
    assert run.finished and "resumed from step 5 (restart 1)" in log
    assert f"metrics.jsonl: line {cut} is not a whole entry (cut by a kill while it was written?): dropped" in log
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


def test_resuming_with_a_different_config_is_refused(tmp_path, tiny_llama_dir, capsys):
    config = resume_config(tmp_path, tiny_llama_dir)
    run_dir = tmp_path / "run"
    train_here(config, run_dir, 2)
    before = (run_dir / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["train", str(config), "--run-dir", str(run_dir), "train.lr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "holds checkpoints of a different config" in err and "Traceback" not in err
    assert (run_dir / "config.yaml").read_text() == before  # the run's own config is left as it was


def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_one_before_it_resumes(tmp_path, tiny_llama_dir, reference, capsys):
    config = resume_config(tmp_path, tiny_llama_dir, save_every=5)
    run_dir = tmp_path / "run"
    train_here(config, run_dir, 12)
    newest = checkpoint.latest(run_dir / "checkpoints")
    older = checkpoint.step_of(checkpoint.complete_checkpoints(run_dir / "checkpoints")[-2])
    weights = newest / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated under its COMPLETE marker

    run, log = train_here(config, run_dir, capsys=capsys)
    assert run.finished
    assert f"{newest.name} is damaged (adapter_model.safetensors does not match its checksum" in log
    assert f"resumed from step {older} (restart 1)" in log
    assert (run_dir / "checkpoints" / f"damaged-{newest.name}").is_dir()  # kept for a look, never used
    assert_same_adapter(run_dir, reference)
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))


def test_a_file_system_that_refuses_a_checkpoint_keeps_the_one_before_and_says_how_much_was_needed(tmp_path, tiny_llama_dir, reference, capsys):
    """A full quota, as a file-size limit: the write of checkpoint-10's optimizer state fails mid-file."""
    config = resume_config(tmp_path, tiny_llama_dir, save_every=5)
    run_dir = tmp_path / "run"
    train_here(config, run_dir, 5)
    kept = checkpoint.latest(run_dir / "checkpoints")
    largest = max(f.stat().st_size for f in kept.iterdir())
    with file_size_limit(largest - 1), pytest.raises(UserError) as refused:
        train_here(config, run_dir)
    message = str(refused.value)
    assert message.startswith("a checkpoint was not written: ") and "the file is larger than allowed here (`ulimit -f`)" in message
    assert "MB to write" in message and f"files limited to {(largest - 1) / 1e6:,.1f} MB" in message
    assert "checkpoint-5 is kept, whole: once there is room, resume from it: hpclora train " in message
    assert checkpoint.latest(run_dir / "checkpoints") == kept and checkpoint.damage(kept) is None
    assert not (run_dir / "checkpoints" / checkpoint.STAGING).exists()  # the partial files are gone, their space freed

    run, log = train_here(config, run_dir, capsys=capsys)
    assert run.finished and "resumed from step 5" in log
    assert_same_adapter(run_dir, reference)


def test_a_second_training_in_the_same_run_directory_is_refused_until_the_first_dies(tmp_path, tiny_llama_dir, capsys):
    config = resume_config(tmp_path, tiny_llama_dir, max_steps=100000, eval_every=0)
    run_dir = tmp_path / "run"
    first = subprocess.Popen(train_argv(config, run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not logged_steps(run_dir):
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        assert main(["train", str(config), "--run-dir", str(run_dir)]) == 2
        err = capsys.readouterr().err
        assert f"is in use by another `hpclora train` (host {os.uname().nodename}, pid {first.pid}" in err and "Traceback" not in err
        assert main(["train", str(config), "--run-dir", str(run_dir), "--fresh"]) == 2
        assert (run_dir / "metrics.jsonl").exists()  # --fresh does not empty a run in use
    finally:
        first.kill()
        first.wait()
    assert main(["train", str(config), "--run-dir", str(run_dir), "train.max_steps=2", "--fresh"]) == 0  # the lock died with its holder


def test_a_restart_before_any_checkpoint_logs_every_step_once_and_reuses_the_base_evaluation(tmp_path, tiny_llama_dir, reference, capsys):
    """An OOM kill or a node failure before the first save: nothing to resume, but nothing logged twice."""
    config = resume_config(tmp_path, tiny_llama_dir)
    run_dir = tmp_path / "run"
    killed = killed_at(train_argv(config, run_dir), run_dir, 3)
    assert killed.returncode == -signal.SIGKILL and checkpoint.latest(run_dir / "checkpoints") is None
    run, log = train_here(config, run_dir, capsys=capsys)
    assert run.finished and "restart 1 from step 0 (no checkpoint yet)" in log
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))
    assert evals(run_dir) == evals(reference)  # one base evaluation, with the same number
    assert_same_adapter(run_dir, reference)


def test_a_stop_signal_after_the_last_step_finishes_the_run_instead_of_claiming_a_checkpoint(tmp_path, tiny_llama_dir, capsys):
    """A real SIGUSR1 just after the last step boundary was checked (step 3 of 3)."""
    run, log = train_here(tiny_run_yaml(tmp_path, tiny_llama_dir, train={"max_steps": 3, "save_every": 0}), tmp_path / "run", 4,
                          capsys=capsys)
    assert run.finished
    assert "USR1 asked for a stop after the last step: finishing (final evaluation, adapter) instead of checkpointing" in log
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    assert run.summary["final_val_loss"] is not None and run.summary["steps"] == 3


def test_train_refuses_run_directories_it_did_not_make_and_fresh_removes_only_its_own_files(tmp_path, tiny_llama_dir, capsys):
    """`--run-dir` on a user's directory (a thesis and their data) or on a file is refused with exit 2 and
    nothing changed; `--fresh` on a real run directory removes what hpclora wrote, and refuses where a user's
    file was added to it."""
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
