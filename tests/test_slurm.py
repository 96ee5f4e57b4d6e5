"""Launch tests against a real Slurm (accounting, a node with two fake GPUs, and two nodes in network namespaces of
their own for jobs of several nodes: tests/slurm/up.sh).

They submit tiny real training runs with `hpclora submit`/`sweep`, the hand-written jobs/*.sbatch
templates and submitit, and check sacct's verdict, the run directories and what status/logs report.
Without a reachable Slurm they skip; with HPCLORA_REQUIRE_SLURM=1 (as .ci/run sets) they fail instead.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, require_slurm, tiny_run_yaml
from hpclora.job.gpu_expected import TRAIN_ON_CPU_VAR

SECRET = "hf_do_not_leak_0123456789"


@pytest.fixture(scope="module", autouse=True)
def cluster():
    require_slurm()


@pytest.fixture
def env(tmp_path):
    """The submitting shell's environment: a secret token in it, the job index kept per test."""
    return {
        **os.environ,
        "HF_TOKEN": SECRET,
        "HPCLORA_STATE_DIR": str(tmp_path / "state"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }


def hpclora(*args, env, cwd, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "hpclora", *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"hpclora {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def job_id_from(stdout: str) -> str:
    line = next(l for l in stdout.splitlines() if l.startswith("submitted "))
    return line.split(" as job ")[1].split()[0]


def wait_for(job_id: str, tasks: int = 0, timeout: float = 300) -> dict[str, tuple[str, str]]:
    """sacct's final (state, exit code) of a job, or of each of its `tasks` array tasks."""
    final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State,ExitCode"], capture_output=True, text=True).stdout
        rows = {r[0]: (r[1].split()[0], r[2]) for r in (l.split("|") for l in out.splitlines()) if len(r) == 3}
        rows = {k: v for k, v in rows.items() if "[" not in k}  # `123_[1-2]`: tasks not started yet
        if len(rows) >= max(tasks, 1) and all(state in final for state, _ in rows.values()):
            return rows
        time.sleep(1)
    raise AssertionError(f"job {job_id} not finished after {timeout}s: {rows}")


PACING_SITE = ROOT / "tests" / "slurm" / "site"


def paced(env: dict, step_s: float, **more: str) -> dict:
    """`env` for jobs whose every step ends `step_s` seconds later, asleep (tests/slurm/site/sitecustomize.py): a run
    that waits for the test's signals then spends the wait idle, not training on the cores the other tests share."""
    path = os.pathsep.join(filter(None, [str(PACING_SITE), env.get("PYTHONPATH")]))
    return {**env, "PYTHONPATH": path, "HPCLORA_TEST_STEP_S": str(step_s), **more}


def files_under(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()]


def test_a_job_with_a_hostile_name_runs_and_status_logs_and_follow_report_it(tmp_path, tiny_llama_dir, env):
    """One job carries the checks of a whole life on the cluster: a run name and paths made of shell syntax run
    without executing anything; the token reaches the job through the environment only (the setup line checks)
    and is written nowhere; `logs -f` follows until the job leaves the queue; status and logs find it by id and by
    run directory; and without accounting, status judges the finished run by its directory."""
    root = tmp_path / "my runs" / "$(touch pwned1)" / "`touch pwned2`"
    logs = tmp_path / "logs $(touch pwned3)" / "100%"
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir, slurm={"setup": ['[ -n "${HF_TOKEN:-}" ] || { echo "no HF_TOKEN in the job"; exit 3; }']})
    out = hpclora("submit", cfg, "lora.r=4", 'run.name=x"; touch pwned; echo "', f"run.output_root={root}", f"slurm.log_dir={logs}",
                  env=env, cwd=tmp_path).stdout
    job_id = job_id_from(out)
    followed = hpclora("logs", job_id, "-f", env=env, cwd=tmp_path).stdout  # returns once the job has left the queue
    assert followed.rstrip().endswith("with exit code 0") and "adapter saved to" in followed
    assert wait_for(job_id) == {job_id: ("COMPLETED", "0:0")}

    (run_dir,) = root.iterdir()
    assert run_dir.name.startswith("x-touch-pwned-echo-") and json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["r"] == 4
    record = json.loads((run_dir / "job.json").read_text())
    log = Path(record["log"])
    assert record["job_id"] == job_id and log == logs / f"x-touch-pwned-echo-{job_id}.out"
    assert f"run directory: {run_dir}" in out and f"log: {log}" in out
    everything = [p.name for p in tmp_path.rglob("*")] + [p.name for p in Path.cwd().iterdir()]
    assert not [n for n in everything if n.startswith("pwned")]

    text = log.read_text()
    assert f"job {job_id} | node " in text and f"config sha256 {record['config_sha256']}" in text
    assert "adapter saved to" in text and "Traceback" not in text and followed == text
    for path in files_under(run_dir, logs, tmp_path / "state"):
        assert SECRET not in path.read_text(errors="replace"), f"secret leaked into {path}"
    for target in (job_id, run_dir):
        status = hpclora("status", target, env=env, cwd=tmp_path).stdout
        assert "COMPLETED" in status and "0:0" in status and str(log) in status, status
        assert "progress   finished: val_loss base " in status and " steps" in status
    assert job_id in hpclora("status", env=env, cwd=tmp_path).stdout
    assert hpclora("logs", job_id, env=env, cwd=tmp_path).stdout == text

    # A cluster without slurmdbd cannot run beside the test cluster on one machine, so `sacct` is replaced by a
    # script that answers exactly as Slurm 22.05 does when accounting is off; squeue stays real.
    shim = tmp_path / "no-accounting"
    shim.mkdir()
    (shim / "sacct").write_text("#!/bin/sh\necho 'sacct: error: Slurm accounting storage is disabled' >&2\nexit 1\n")
    (shim / "sacct").chmod(0o755)
    status = hpclora("status", job_id, env={**env, "PATH": f"{shim}{os.pathsep}{env['PATH']}"}, cwd=tmp_path).stdout
    assert "finished (adapter saved)" in status and "accounting (sacct) is off" in status
    assert "progress   finished: val_loss base " in status


def test_cancel_of_a_job_that_has_not_begun_training_is_at_once_and_logs_say_why_there_is_none(tmp_path, tiny_llama_dir, env):
    """One job still in its setup, one pending: nothing to save, so both are cancelled at once."""
    slow = tiny_run_yaml(tmp_path, tiny_llama_dir, slurm={"setup": ["sleep 300"]})
    setting_up = job_id_from(hpclora("submit", slow, "run.name=slow", env=env, cwd=tmp_path).stdout)
    pending = job_id_from(hpclora("submit", slow, "run.name=later", "slurm.extra=[--begin=now+3600]", env=env, cwd=tmp_path).stdout)
    log = tmp_path / "logs" / f"later-{pending}.out"
    waiting = hpclora("logs", pending, env=env, cwd=tmp_path, check=False)
    assert waiting.returncode == 2 and waiting.stderr.strip() == (
        f"error: {log}: the log does not exist yet (job {pending} PENDING); try again with -f to wait for it")
    for job_id in (setting_up, pending):
        assert hpclora("cancel", job_id, env=env, cwd=tmp_path).stdout.strip() == f"cancelled {job_id}"
        assert wait_for(job_id)[job_id][0] == "CANCELLED"
        assert "CANCELLED" in hpclora("status", job_id, env=env, cwd=tmp_path).stdout
    for follow in ([], ["-f"]):
        never = hpclora("logs", pending, *follow, env=env, cwd=tmp_path, check=False)
        assert never.returncode == 2 and never.stderr.strip() == f"error: {log}: no log: job {pending} ended CANCELLED before it started, so it wrote none"


def test_cancel_of_a_training_job_keeps_a_whole_checkpoint_though_a_step_outlasts_killwait(tmp_path, tiny_llama_dir, env):
    kill_wait = int(next(l.split("=")[1].split()[0] for l in subprocess.run(["scontrol", "show", "config"], capture_output=True,
                                                                           text=True).stdout.splitlines() if l.startswith("KillWait")))
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir, train={"max_steps": 50, "log_every": 1, "save_every": 0})
    # Every step lasts 3 s longer than KillWait, after which scancel's TERM is followed by KILL.
    job_id = job_id_from(hpclora("submit", cfg, "run.name=long", env=paced(env, kill_wait + 3), cwd=tmp_path).stdout)
    (run_dir,) = (tmp_path / "runs").iterdir()
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").is_file() or '"loss"' not in (run_dir / "metrics.jsonl").read_text():
        assert time.time() < deadline, f"job {job_id} logged no step"
        time.sleep(0.5)
    asked = time.time()
    done = hpclora("cancel", job_id, env=env, cwd=tmp_path).stdout
    took = time.time() - asked
    assert f"job {job_id}: asked to save a checkpoint at its next step boundary and end" in done
    said = done.strip().splitlines()[-1]
    assert said.startswith(f"cancelled {job_id}: stopped by `hpclora cancel` at step ")
    assert said.endswith(f"checkpoint saved; to resume: hpclora submit {run_dir}")
    step = int(said.split(" at step ")[1].split("/")[0])
    assert wait_for(job_id)[job_id][0] == "CANCELLED"
    log = (tmp_path / "logs" / f"long-{job_id}.out").read_text()
    assert (f"`hpclora cancel` asked for it: cancelling job {job_id} instead of requeueing; to resume: hpclora submit {run_dir}" in log
            and "requeueing job" not in log)
    saved = run_dir / "checkpoints" / f"checkpoint-{step}"
    assert (saved / "COMPLETE").is_file() and (saved / "adapter_model.safetensors").is_file()
    assert not (run_dir / "adapter").exists()
    elapsed = [0.0] + [e["elapsed_s"] for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in e]
    step_s = [b - a for a, b in zip(elapsed, elapsed[1:])]
    assert len(step_s) == step and min(step_s) > kill_wait, step_s  # every step outlasted KillWait: scancel would lose it
    assert took > kill_wait


def test_status_follows_a_run_to_its_newest_job_whichever_way_it_went_on(tmp_path, tiny_llama_dir, env):
    """Cancelled twice, the run goes on the advised way (`hpclora submit RUN_DIR`, recorded) and then by hand
    (`sbatch RUN_DIR/job.sbatch`, which no index has): status of every kind shows the newest job and its true state."""
    # Paced, the first two jobs are cancelled long before their end; the third, unpaced, trains the rest at once.
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir, train={"max_steps": 40, "log_every": 1, "save_every": 0})
    first = job_id_from(hpclora("submit", cfg, env=paced(env, 1), cwd=tmp_path).stdout)
    (run_dir,) = (tmp_path / "runs").iterdir()
    resume = f"hpclora submit {run_dir}"
    trained_steps(run_dir, 0, 2)
    assert hpclora("cancel", first, env=env, cwd=tmp_path).stdout.strip().endswith(f"checkpoint saved; to resume: {resume}")
    assert wait_for(first)[first][0] == "CANCELLED"
    assert f"instead of requeueing; to resume: {resume}" in (tmp_path / "logs" / f"tiny-{first}.out").read_text()

    resubmitted = hpclora("submit", run_dir, env=paced(env, 1), cwd=tmp_path).stdout
    second = job_id_from(resubmitted)
    assert f"watch it: hpclora status {second}" in resubmitted and str(run_dir) in resubmitted
    refused = hpclora("submit", run_dir, env=env, cwd=tmp_path, check=False)
    assert refused.returncode == 2 and f"job {second} (" in refused.stderr and "has not ended" in refused.stderr
    for target in ((), (first,), (second,), (run_dir,)):
        status = hpclora("status", *target, env=env, cwd=tmp_path).stdout
        assert second in status and "CANCELLED" not in status, (target, status)
    trained_steps(run_dir, 1, 2)
    hpclora("cancel", second, env=env, cwd=tmp_path)
    assert wait_for(second)[second][0] == "CANCELLED"

    third = subprocess.run(["sbatch", "--parsable", str(run_dir / "job.sbatch")], env=env, cwd=tmp_path, capture_output=True,
                           text=True, check=True).stdout.strip()
    assert wait_for(third) == {third: ("COMPLETED", "0:0")}
    for target in ((), (first,), (second,), (run_dir,)):
        status = hpclora("status", *target, env=env, cwd=tmp_path).stdout
        assert third in status and "COMPLETED" in status and "CANCELLED" not in status, (target, status)
        assert "restarts" not in status or "2" in status
    assert f"tiny-{third}.out" in hpclora("status", run_dir, env=env, cwd=tmp_path).stdout
    assert metrics_steps(run_dir) == list(range(1, 41))
    finished = hpclora("submit", run_dir, env=env, cwd=tmp_path, check=False)
    assert finished.returncode == 2 and "the run has finished (adapter saved): nothing to resume" in finished.stderr


def test_sweep_is_one_job_array_with_a_run_directory_per_trial(tmp_path, tiny_llama_dir, env):
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir)
    out = hpclora("sweep", cfg, "train.max_steps=2", "--grid", "lora.r=2,4,8", "--max-parallel", "2", env=env, cwd=tmp_path).stdout
    job_id = job_id_from(out)
    states = wait_for(job_id, tasks=3)
    assert states == {f"{job_id}_{i}": ("COMPLETED", "0:0") for i in range(3)}

    (sweep_dir,) = (tmp_path / "runs").iterdir()
    manifest = json.loads((sweep_dir / "sweep.json").read_text())
    assert manifest["job_id"] == job_id and [t["overrides"] for t in manifest["trials"]] == [["lora.r=2"], ["lora.r=4"], ["lora.r=8"]]
    assert "#SBATCH --array=0-2%2" in (sweep_dir / "job.sbatch").read_text()
    for trial in manifest["trials"]:
        adapter = json.loads((Path(trial["run_dir"]) / "adapter" / "adapter_config.json").read_text())
        assert adapter["r"] == int(trial["overrides"][0].split("=")[1])
        assert Path(trial["log"]) == tmp_path / "logs" / f"tiny-{job_id}_{trial['task']}.out"

    status = hpclora("status", sweep_dir, env=env, cwd=tmp_path).stdout
    assert [l.split()[:2] for l in status.splitlines() if l.startswith(job_id)] == [[f"{job_id}_{i}", "COMPLETED"] for i in range(3)]
    overview = hpclora("status", env=env, cwd=tmp_path).stdout
    (row,) = [l for l in overview.splitlines() if l.startswith(f"{job_id} ")]
    assert "3 COMPLETED" in row and "tiny (sweep, 3 trials)" in row
    log = hpclora("logs", f"{job_id}_1", env=env, cwd=tmp_path).stdout
    assert f"(array {job_id}_1)" in log and str(sweep_dir / "trial-001") in log
    assert f"hpclora: job {job_id}_1 on " in log and f"hpclora: job {job_id}_1 ended " in log  # as squeue names it
    assert "give one of" not in log
    ambiguous = hpclora("logs", job_id, env=env, cwd=tmp_path, check=False)
    assert ambiguous.returncode == 2 and f"{job_id}_0, {job_id}_1, {job_id}_2" in ambiguous.stderr


def test_trials_per_node_runs_two_trials_side_by_side_in_one_array_task_and_cancel_keeps_both(tmp_path, tiny_llama_dir, env):
    """`sweep --trials-per-node 2` on one-GPU trials: one array task asks for 2 GPUs (the test cluster's fake
    ones: their device files exist, the tiny model trains on the CPU) and runs both trials at once, one GPU
    each, each with its own run directory, log and checkpoints. `hpclora cancel` of the task then asks both to
    checkpoint: each keeps a whole checkpoint of its own, and the task ends CANCELLED, not requeued."""
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir, train=LONG_RUN, slurm={"gpus": 1, "gpu_type": "v100"})
    env = {**env, TRAIN_ON_CPU_VAR: "1"}  # no GPU this torch could use: the CPU, as told
    out = hpclora("sweep", cfg, "--grid", "lora.r=2,4", "--trials-per-node", "2", env=paced(env, 0.5), cwd=tmp_path).stdout
    job_id = job_id_from(out)
    (sweep_dir,) = (tmp_path / "runs").iterdir()
    script = (sweep_dir / "job.sbatch").read_text()
    assert "#SBATCH --array=0-0" in script and "#SBATCH --gres=gpu:v100:2" in script and "#SBATCH --mem=4096M" in script
    manifest = json.loads((sweep_dir / "sweep.json").read_text())
    run_dirs = [Path(trial["run_dir"]) for trial in manifest["trials"]]
    wait_until(lambda: all(any(s >= 3 for s in metrics_steps(run_dir)) for run_dir in run_dirs), "both trials training")  # at once

    done = hpclora("cancel", job_id, env=env, cwd=tmp_path).stdout
    assert wait_for(job_id, tasks=1) == {f"{job_id}_0": ("CANCELLED", "0:0")}  # one task for two trials
    assert requeue_records(job_id) == ["CANCELLED"]
    gpus = set()
    for trial, run_dir in zip(manifest["trials"], run_dirs):
        assert trial["task"] == 0 and Path(trial["log"]) == tmp_path / "logs" / f"tiny-{job_id}_{trial['trial']}.out"
        log = Path(trial["log"]).read_text()
        assert str(run_dir) in log and "Traceback" not in log and "`hpclora cancel` asked for a stop" in log
        gpus.add(log.split(", GPU ")[1].split()[0])
        said = f"cancelled {job_id}_0: stopped by `hpclora cancel` at step "
        step = max(metrics_steps(run_dir))
        saved = run_dir / "checkpoints" / f"checkpoint-{step}"
        assert f"{said}{step}/" in done and (saved / "COMPLETE").is_file() and not (run_dir / "adapter").exists()
        assert json.loads((saved / "adapter_config.json").read_text())["r"] == 2 * (trial["trial"] + 1)
    assert gpus == {"0", "1"}  # one GPU each
    task_log = (tmp_path / "logs" / f"tiny-{job_id}_task0.out").read_text()
    assert "trial 0 in" in task_log and "trial 1 in" in task_log and "instead of requeueing" in task_log
    status = hpclora("status", sweep_dir, env=env, cwd=tmp_path).stdout
    assert [l.split()[:2] for l in status.splitlines() if l.startswith(job_id)] == [[f"{job_id}_0", "CANCELLED"]] * 2


def test_a_job_whose_data_vanished_after_submission_fails_with_the_error_in_its_log(tmp_path, tiny_llama_dir, env):
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir, slurm={"setup": ["sleep 2"]})  # time to remove the file
    out = hpclora("submit", cfg, env=env, cwd=tmp_path).stdout
    (tmp_path / "data.jsonl").unlink()
    job_id = job_id_from(out)
    assert wait_for(job_id) == {job_id: ("FAILED", "2:0")}
    (run_dir,) = (tmp_path / "runs").iterdir()
    log = (tmp_path / "logs" / f"tiny-{job_id}.out").read_text()
    assert f"error: data.path: file not found: {tmp_path / 'data.jsonl'}" in log and "Traceback" not in log
    status = hpclora("status", job_id, env=env, cwd=tmp_path).stdout
    assert "FAILED" in status and "progress   error: data.path: file not found" in status
    assert not (run_dir / "adapter").exists()


def test_a_gpu_job_that_has_no_usable_gpu_stops_at_once_saying_what_it_asked_found_and_the_fix(tmp_path, tiny_llama_dir, env):
    """The job gets one of the test node's GPUs (a device file Slurm hands out; no GPU exists here) and this machine's
    torch, a CPU build: it must stop instead of training on the CPU."""
    import torch

    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir, slurm={"gpus": 1, "gpu_type": "v100", "partition": "debug"})
    job_id = job_id_from(hpclora("submit", cfg, env=env, cwd=tmp_path).stdout)
    assert wait_for(job_id) == {job_id: ("FAILED", "2:0")}  # a user error: not requeued
    log = (tmp_path / "logs" / f"tiny-{job_id}.out").read_text()
    assert f"asked: slurm.gpus=1 in Slurm job {job_id}, which Slurm gave GPUs (SLURM_GPUS_ON_NODE=1)" in log
    assert f"found: torch {torch.__version__} (CPU only, no CUDA)" in log and "fix:" in log
    assert "device cpu" not in log and "Traceback" not in log
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert not (run_dir / "metrics.jsonl").exists()
    assert "asked for a GPU and has none it can use" in hpclora("status", job_id, env=env, cwd=tmp_path).stdout


def test_a_hand_written_template_without_hpclora_on_its_path_says_how_to_make_it_visible(tmp_path, tiny_llama_dir, env):
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir)
    (tmp_path / "logs").mkdir(exist_ok=True)
    bare = {**env, "PATH": "/usr/local/bin:/usr/bin:/bin"}  # a login shell without the environment loaded
    job_id = subprocess.run(["sbatch", "--parsable", "--gres=gpu:0", "--cpus-per-task=1", "--mem=2G", "--time=10:00",
                             str(ROOT / "jobs" / "train.sbatch"), str(cfg)], env=bare, cwd=tmp_path,
                            capture_output=True, text=True, check=True).stdout.strip()
    assert wait_for(job_id) == {job_id: ("FAILED", "2:0")}
    log = (tmp_path / "logs" / f"hpclora-{job_id}.out").read_text()
    assert "hpclora: the command hpclora is not on this job's PATH (/usr/local/bin:/usr/bin:/bin)" in log
    assert 'source "$HOME/venvs/hpclora/bin/activate"' in log and "HPCLORA_IMAGE=$PWD/hpclora.sif" in log
    assert "command not found" not in log and "not found\n" not in log


def test_hand_written_templates_run_as_documented(tmp_path, tiny_llama_dir, env):
    """`sbatch jobs/train.sbatch CONFIG k=v` and `sbatch --array=0-1 jobs/sweep.sbatch CONFIG TRIALS`."""
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir)
    (tmp_path / "logs").mkdir()
    (tmp_path / "trials.txt").write_text("lora.r=2 train.max_steps=2\nlora.r=4 train.max_steps=2\n")
    resources = ["--cpus-per-task=1", "--mem=2G", "--time=10:00"]
    env = {**env, TRAIN_ON_CPU_VAR: "1"}  # the templates ask for a GPU (--gres=gpu:1): the test node's are device files

    def sbatch(*args):
        done = subprocess.run(["sbatch", "--parsable", *resources, *map(str, args)], env=env, cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    single = sbatch(ROOT / "jobs" / "train.sbatch", cfg, "lora.r=16")
    array = sbatch("--array=0-1", ROOT / "jobs" / "sweep.sbatch", cfg, tmp_path / "trials.txt", "run.name=hand")
    assert wait_for(single) == {single: ("COMPLETED", "0:0")}
    assert wait_for(array, tasks=2) == {f"{array}_0": ("COMPLETED", "0:0"), f"{array}_1": ("COMPLETED", "0:0")}

    assert json.loads((tmp_path / "runs" / f"tiny-{single}" / "adapter" / "adapter_config.json").read_text())["r"] == 16
    log = (tmp_path / "logs" / f"hpclora-{single}.out").read_text()
    assert f"job {single} | node" in log and "adapter saved to" in log
    for task, r in ((0, 2), (1, 4)):
        run_dir = tmp_path / "runs" / f"hand-{array}_{task}"
        assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["r"] == r
        assert f"(array {array}_{task})" in (tmp_path / "logs" / f"hpclora-sweep-{array}_{task}.out").read_text()


def newest_checkpoint_step(run_dir: Path) -> int:
    return max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*"))


def stop_locally_at(argv: list[str], run_dir_glob: str, tmp_path: Path, env: dict, step: int) -> Path:
    """Run `argv` (a local hpclora) until its run directory logged `step`, then stop it with USR1 as a user's kill
    would; its run directory, with a checkpoint of every step (train.save_every: 1)."""
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def reached():
            assert proc.poll() is None, proc.stdout.read()
            dirs = list((tmp_path / "runs").glob(run_dir_glob))
            return bool(dirs) and any(s >= step for s in metrics_steps(dirs[0]))
        wait_until(reached, f"step {step} of {run_dir_glob}")
        proc.send_signal(signal.SIGUSR1)
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 75 and "Traceback" not in output, output[-3000:]
    (run_dir,) = (tmp_path / "runs").glob(run_dir_glob)
    return run_dir


def same_weights(a: Path, b: Path, tolerance: float = 0.0) -> None:
    from safetensors.torch import load_file

    ours, theirs = load_file(a), load_file(b)
    assert ours.keys() == theirs.keys() and ours
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert worst <= tolerance, f"{a} and {b} differ by {worst}"


LONG_RUN = {"max_steps": 100000, "eval_every": 0, "log_every": 1, "save_every": 1, "keep_checkpoints": 1000}


def test_the_hand_written_template_runs_a_rank_per_gpu_and_a_stopped_world_requeues_and_resumes_exactly(tmp_path, tiny_llama_dir, env):
    """`sbatch --gres=gpu:v100:2 jobs/train.sbatch`: two ranks through srun and torchrun (the test cluster's GPUs are
    fake, so the ranks train on the CPU with gloo). TERM to every process of the job, as slurmstepd sends it on
    preemption, torchrun included, while a checkpoint takes 40 s: no rank is killed, the world stops at one step,
    rank 0 leaves the marker, the template requeues (HPCLORA_MAX_REQUEUES=1) and the world resumes; stopped again by
    USR1 to the batch shell, it is out of requeues. Its last checkpoint is the one an uninterrupted two-rank run
    (the local launcher) writes at that step. The run is too long to end by itself: every signal waits for the step
    it is meant for, none races the end."""
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir, train=LONG_RUN, lora={"dropout": 0.0})
    (tmp_path / "logs").mkdir(exist_ok=True)  # the template logs to logs/ where it is submitted
    slow = tmp_path / "slow-checkpoint"
    job_env = paced(env, 1, HPCLORA_MAX_REQUEUES="1", HPCLORA_TEST_SLOW_CHECKPOINT=str(slow), **{TRAIN_ON_CPU_VAR: "1"})
    done = subprocess.run(["sbatch", "--parsable", "--gres=gpu:v100:2", "--cpus-per-task=2", "--mem=4G", "--time=10:00",
                           str(ROOT / "jobs" / "train.sbatch"), str(cfg), "run.name=two"],
                          env=job_env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    run_dir = tmp_path / "runs" / f"two-{job_id}"
    log_path = tmp_path / "logs" / f"hpclora-{job_id}.out"
    trained_steps(run_dir, 0, 5)
    slow.touch()  # TERM follows once a checkpoint is being written
    wait_until(lambda: "this checkpoint takes 40 s" in log_path.read_text(), "the slow checkpoint")
    subprocess.run(["scancel", "--signal=TERM", "--full", job_id], check=True)
    resumed = signal_after(job_id, run_dir, 1, 3, ["--signal=USR1", "--batch"])
    assert wait_for(job_id) == {job_id: ("FAILED", "75:0")}
    assert requeue_records(job_id) == ["REQUEUED", "FAILED"]
    last = newest_checkpoint_step(run_dir)
    assert metrics_steps(run_dir) == list(range(1, last + 1)) and not (run_dir / "adapter").exists()
    log = log_path.read_text()
    assert log.count("world 2 ranks (gloo)") == 2 and "requeueing job" in log and f"resumed from step {resumed}" in log
    assert resumed > 5  # the checkpoint written while TERM arrived, or the one after it
    assert (f"requeued 1 times already (HPCLORA_MAX_REQUEUES): not requeueing; to resume: sbatch jobs/train.sbatch "
            f"{run_dir}/config.yaml --run-dir {run_dir}") in log
    assert "Traceback" not in log and "ChildFailedError" not in log  # a stop is no failure, for torchrun either
    assert not list((tmp_path / "logs").glob(".hpclora-stopped-*"))

    reference = stop_locally_at([sys.executable, "-m", "hpclora", "submit", str(cfg), "run.name=reference", "train.cpu_ranks=2",
                                 "slurm.cpus_per_task=2", "slurm.mem=4G", "--launcher", "local"], "reference-*", tmp_path, env, last)
    same_weights(run_dir / "checkpoints" / f"checkpoint-{last}" / "adapter_model.safetensors",
                 reference / "checkpoints" / f"checkpoint-{last}" / "adapter_model.safetensors", 1e-6)


TWO_NODES = {"partition": "two", "nodes": 2, "mem": "2G"}  # node1 and node2: tests/slurm/up.sh


def test_a_job_of_two_nodes_trains_one_world_across_them_and_a_usr1_requeues_and_resumes_exactly(tmp_path, tiny_llama_dir, env):
    """slurm.nodes=2 on the test cluster's partition `two`, whose nodes each run their slurmd in a network and UTS
    namespace of their own (own hostname, own address on a bridge): one srun task and torchrun per node, the ranks
    meet through c10d at the head node's address, across the bridge, and train one world. USR1 to the batch shell
    (the time limit's signal) checkpoints both ranks, the job requeues and resumes; USR1 again, it is out of
    requeues. Its last checkpoint is the one a one-node two-rank run writes at that step; status and logs show it.
    The run is too long to end by itself: no signal races it."""
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir, train={**LONG_RUN, "cpu_ranks": 1}, lora={"dropout": 0.0},
                        slurm={**TWO_NODES, "max_requeues": 1})
    job_id = job_id_from(hpclora("submit", cfg, env=paced(env, 1), cwd=tmp_path).stdout)
    (run_dir,) = (tmp_path / "runs").iterdir()
    script = (run_dir / "job.sbatch").read_text()
    assert "#SBATCH --nodes=2\n" in script and "SRUN_RANKS=true" in script and "--rdzv-endpoint=\"$HEAD:$PORT\"" in script
    signal_after(job_id, run_dir, 0, 3, ["--signal=USR1", "--batch"])
    resumed = signal_after(job_id, run_dir, 1, 3, ["--signal=USR1", "--batch"])
    assert wait_for(job_id) == {job_id: ("FAILED", "75:0")}
    assert requeue_records(job_id) == ["REQUEUED", "FAILED"]
    nodes = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "NodeList"], capture_output=True, text=True).stdout.split()
    assert set(nodes) == {"node[1-2]"}
    last = newest_checkpoint_step(run_dir)
    assert metrics_steps(run_dir) == list(range(1, last + 1)) and resumed >= 3
    saved = run_dir / "checkpoints" / f"checkpoint-{last}"
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in saved.iterdir()}
    log = (tmp_path / "logs" / f"tiny-{job_id}.out").read_text()
    assert log.count("world 2 ranks (gloo)") == 2 and f"resumed from step {resumed}" in log and "requeueing job" in log
    assert "requeued 1 times already (slurm.max_requeues): not requeueing" in log and "Traceback" not in log
    status = hpclora("status", job_id, env=env, cwd=tmp_path).stdout
    assert "node[1-2]" in status and "restarts   1" in status
    assert f"resumed from step {resumed}" in hpclora("logs", job_id, env=env, cwd=tmp_path).stdout

    reference = stop_locally_at([sys.executable, "-m", "hpclora", "submit", str(cfg), "run.name=reference", "slurm.nodes=1",
                                 "train.cpu_ranks=2", "slurm.cpus_per_task=2", "slurm.mem=4G", "--launcher", "local"],
                                "reference-*", tmp_path, env, last)
    same_weights(saved / "adapter_model.safetensors", reference / "checkpoints" / f"checkpoint-{last}" / "adapter_model.safetensors", 1e-6)


def test_a_sweep_task_of_two_nodes_trains_its_trial_across_both(tmp_path, tiny_llama_dir, env):
    """One trial (the array of any sweep runs its tasks alike; each of two nodes here would run one after the other)."""
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir, train={"max_steps": 2, "cpu_ranks": 1}, slurm=TWO_NODES)
    job_id = job_id_from(hpclora("sweep", cfg, "--grid", "lora.r=4", env=env, cwd=tmp_path).stdout)
    assert wait_for(job_id, tasks=1) == {f"{job_id}_0": ("COMPLETED", "0:0")}
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "NodeList"], capture_output=True, text=True).stdout
    assert out.split() == ["node[1-2]"]
    (sweep_dir,) = (tmp_path / "runs").iterdir()
    (trial,) = json.loads((sweep_dir / "sweep.json").read_text())["trials"]
    assert json.loads((Path(trial["run_dir"]) / "adapter" / "adapter_config.json").read_text())["r"] == 4
    log = Path(trial["log"]).read_text()
    assert "world 2 ranks (gloo)" in log and "adapter saved to" in log
    assert "#SBATCH --nodes=2\n" in (sweep_dir / "job.sbatch").read_text()


def metrics_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e["step"] for e in map(json.loads, lines) if "loss" in e]


def wait_until(condition, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def attempt(run_dir: Path, restart: int) -> dict | None:
    """Attempt `restart`'s line of attempts.jsonl, while it is the newest (None before it starts and after)."""
    path = run_dir / "attempts.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[restart]) if len(lines) == restart + 1 else None


def trained_steps(run_dir: Path, restart: int, steps: int) -> int:
    """Wait until attempt `restart` has logged `steps` steps past the checkpoint it resumed from; returns the step it
    resumed from (0 for the first attempt)."""
    def trained():
        now = attempt(run_dir, restart)
        return now is not None and max(metrics_steps(run_dir), default=0) >= (now["resumed_from"] or 0) + steps
    wait_until(trained, f"{steps} steps of attempt {restart}")
    return attempt(run_dir, restart)["resumed_from"] or 0


def signal_after(job_id: str, run_dir: Path, restart: int, steps: int, scancel_args: list[str]) -> int:
    """Once attempt `restart` of the job has logged `steps` steps past the checkpoint it resumed from, signal the job;
    returns the step it resumed from."""
    resumed = trained_steps(run_dir, restart, steps)
    subprocess.run(["scancel", *scancel_args, job_id], check=True)
    return resumed


def requeue_records(job_id: str) -> list[str]:
    out = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines()]


def test_usr1_term_and_a_time_limit_each_checkpoint_and_requeue_until_the_requeues_run_out(tmp_path, tiny_llama_dir, env):
    """One job through every stop an allocation meets, each in its own attempt: USR1 to the batch shell (what
    `--signal=B:USR1@...` sends before the limit), TERM to it (preemption), and a real time limit, brought close by
    shortening the running job's limit so that Slurm's own signal falls due (train.preempt_grace_s before it). The
    first two requeue; after the third the job is out of requeues (slurm.max_requeues=2), fails with 75 and keeps
    its checkpoint; Slurm never times it out. Every logged step is there once, and the last checkpoint is the one an
    uninterrupted run writes at that step, bit for bit. The run is too long to end by itself: no signal races it."""
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir, train={**LONG_RUN, "preempt_grace_s": 300}, lora={"dropout": 0.1},
                        slurm={"max_requeues": 2, "time": "10"})
    job_id = job_id_from(hpclora("submit", cfg, env=paced(env, 1), cwd=tmp_path).stdout)
    (run_dir,) = (tmp_path / "runs").iterdir()
    signal_after(job_id, run_dir, 0, 3, ["--signal=USR1", "--batch"])
    signal_after(job_id, run_dir, 1, 3, ["--signal=TERM", "--batch"])
    wait_until(lambda: (third := attempt(run_dir, 2)) is not None and max(metrics_steps(run_dir)) >= third["resumed_from"] + 3,
               "three steps of the third attempt")
    # Its limit, in whole minutes, at least a minute past now: more than train.preempt_grace_s (300 s) before the
    # end is now, so Slurm signals at its next check, and the minute left is for the checkpoint.
    elapsed = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%M"], capture_output=True, text=True).stdout.strip()
    seconds = sum(int(part) * 60 ** i for i, part in enumerate(reversed(elapsed.replace("-", ":").split(":"))))
    subprocess.run(["scontrol", "update", f"JobId={job_id}", f"TimeLimit={math.ceil((seconds + 60) / 60)}"], check=True)
    assert wait_for(job_id, timeout=300) == {job_id: ("FAILED", "75:0")}
    assert requeue_records(job_id) == ["REQUEUED", "REQUEUED", "FAILED"]  # never TIMEOUT: each checkpoint came first

    attempts = [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]
    assert [a["slurm_restart_count"] for a in attempts] == [None, "1", "2"]
    last = newest_checkpoint_step(run_dir)
    assert metrics_steps(run_dir) == list(range(1, last + 1)) and not (run_dir / "adapter").exists()
    log = (tmp_path / "logs" / f"tiny-{job_id}.out").read_text()
    assert log.count("checkpoint saved; requeueing job") == 2 and "TERM received" in log and log.count("USR1 received") == 2
    assert "requeued 2 times already (slurm.max_requeues): not requeueing" in log and "(restart 2)" in log
    assert "restarts   2" in hpclora("status", job_id, env=env, cwd=tmp_path).stdout

    # The same config, uninterrupted, with the job's one thread, so that sums round the same way.
    reference = stop_locally_at([sys.executable, "-m", "hpclora", "train", str(cfg), "--run-dir", str(tmp_path / "runs" / "reference-run")],
                                "reference-run", tmp_path, {**env, "OMP_NUM_THREADS": "1"}, last)
    same_weights(run_dir / "checkpoints" / f"checkpoint-{last}" / "adapter_model.safetensors",
                 reference / "checkpoints" / f"checkpoint-{last}" / "adapter_model.safetensors")
    losses = lambda d: [e["loss"] for e in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in e]  # noqa: E731
    assert losses(run_dir) == losses(reference)[:last]

@pytest.mark.parametrize("launcher, now", [("sbatch", True), ("submitit", False)])
def test_a_cancel_of_a_training_job_stays_cancelled(tmp_path, tiny_llama_dir, env, launcher, now):
    """`cancel --now` is scancel: TERM, and training checkpoints and exits 75 as on preemption (in time when its step
    is short), but the job is not requeued. Without --now (here through submitit) the job is asked to checkpoint and
    cancels itself."""
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir, train={**LONG_RUN, "save_every": 0})
    submitted = hpclora("submit", cfg, "--launcher", launcher, env=paced(env, 0.5), cwd=tmp_path).stdout
    job_id = job_id_from(submitted)
    assert f"watch it: hpclora status {job_id}   |   hpclora logs {job_id} -f" in submitted  # sbatch and submitit alike
    (run_dir,) = (tmp_path / "runs").iterdir()
    wait_until(lambda: any(s >= 5 for s in metrics_steps(run_dir)), "step 5")
    done = hpclora("cancel", job_id, *(["--now"] if now else []), env=env, cwd=tmp_path).stdout
    assert done.startswith(f"cancelled {job_id}") if now else f"cancelled {job_id}: stopped by `hpclora cancel` at step " in done
    assert wait_for(job_id)[job_id][0] == "CANCELLED"
    def left_queue():  # the batch shell has ended (COMPLETING until then): a requeue would have happened by now
        return not subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip()
    wait_until(left_queue, "the job to leave the queue")
    assert requeue_records(job_id) == ["CANCELLED"]
    assert (run_dir / "attempts.jsonl").read_text().count("\n") == 1
    assert "already ended (CANCELLED" in hpclora("cancel", job_id, env=env, cwd=tmp_path).stdout
    if launcher == "sbatch":
        log = (tmp_path / "logs" / f"tiny-{job_id}.out").read_text()
        assert "TERM received" in log and "(cancelled): not requeueing" in log


def test_status_and_cancel_of_a_job_slurm_never_had_are_user_errors(tmp_path, env):
    for command in ("status", "cancel"):
        done = hpclora(command, "987654", env=env, cwd=tmp_path, check=False)
        assert done.returncode == 2 and "job 987654 is unknown to Slurm" in done.stderr and "Traceback" not in done.stderr


def test_submit_refuses_what_no_node_of_the_partition_has_and_mem_0_plans_with_a_whole_node(tmp_path, tiny_llama_dir, env):
    """The test cluster's nodes have 2 CPUs and 16000M (partition debug), partition `two` has two nodes: asking more
    would pend forever. submit refuses before writing anything, --dry-run warns; slurm.mem=0 (all of a node's memory)
    is planned against the node's memory, not refused as 0 GB."""
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir)
    for overrides, key, fix in ((["slurm.cpus_per_task=64"], "slurm.cpus_per_task", "set slurm.cpus_per_task=2"),
                                (["slurm.mem=200G"], "slurm.mem", "set slurm.mem=16000M"),
                                (["slurm.partition=two", "slurm.nodes=3"], "slurm.nodes", "set slurm.nodes=2")):
        refused = hpclora("submit", cfg, *overrides, env=env, cwd=tmp_path, check=False)
        assert refused.returncode == 2 and f"error: {key}: " in refused.stderr and fix in refused.stderr, refused.stderr
        assert not (tmp_path / "runs").exists()
        warned = hpclora("submit", cfg, *overrides, "--dry-run", env=env, cwd=tmp_path)
        assert f"warning: {key}: " in warned.stderr
    planned = hpclora("plan", cfg, "slurm.mem=0", env=env, cwd=tmp_path)
    assert "GB of 16.8 GB: fits" in planned.stdout, planned.stdout  # 16000M
    for command in (["submit", cfg], ["sweep", cfg, "--grid", "lora.r=2,4"]):  # the same plan before the queue
        dry = hpclora(*command, "slurm.mem=0", "--dry-run", env=env, cwd=tmp_path)
        assert "of 16.8 GB on cpu" in dry.stderr and "no memory check" not in dry.stderr, dry.stderr


def test_a_late_answer_from_sbatch_keeps_the_run_directory_and_records_the_queued_job(tmp_path, tiny_llama_dir, env):
    """`--wait` makes sbatch answer only once the job has ended, and `--begin` holds the job: sbatch outlasts
    HPCLORA_SBATCH_TIMEOUT_S while the job sits in the queue, as with a busy controller. The job is found in
    the queue by its script and recorded; its run directory stays."""
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir, slurm={"extra": ["--wait", "--begin=now+3600"]})
    late = {**env, "HPCLORA_SBATCH_TIMEOUT_S": "2"}
    out = hpclora("submit", cfg, env=late, cwd=tmp_path)
    job_id = job_id_from(out.stdout)
    try:
        assert "did not answer within 2 s" in out.stderr and f"job {job_id}" in out.stderr
        (run_dir,) = (tmp_path / "runs").iterdir()
        assert json.loads((run_dir / "job.json").read_text())["job_id"] == job_id and (run_dir / "config.yaml").is_file()
        assert "PENDING" in hpclora("status", job_id, env=env, cwd=tmp_path).stdout
    finally:
        subprocess.run(["scancel", job_id])


def test_sbatch_that_never_answers_is_a_clear_error_that_keeps_the_run_directory(tmp_path, tiny_llama_dir, env):
    """A controller that takes the submission but never answers cannot be made here on purpose: an `sbatch`
    on PATH that only sleeps stands in for it. Nothing is in the queue, so the job's fate is unknown: the
    error says so, and the run directory it may need is kept."""
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir)
    shim = tmp_path / "slow-bin"
    shim.mkdir()
    (shim / "sbatch").write_text("#!/bin/sh\nsleep 60\n")
    (shim / "sbatch").chmod(0o755)
    done = hpclora("submit", cfg, env={**env, "HPCLORA_SBATCH_TIMEOUT_S": "1", "PATH": f"{shim}{os.pathsep}{env['PATH']}"},
                   cwd=tmp_path, check=False)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "sbatch did not answer within 1 s" in done.stderr and f"run directory kept: {run_dir}" in done.stderr
    assert (run_dir / "config.yaml").is_file() and (run_dir / "job.sbatch").is_file()
    refused = hpclora("submit", cfg, "slurm.partition=no-such-partition", env=env, cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "sbatch refused the job" in refused.stderr
    assert list((tmp_path / "runs").iterdir()) == [run_dir]  # nothing was queued: nothing of it is left


def dpo_pairs(tmp_path: Path) -> Path:
    from conftest import write_jsonl

    return write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Is {i} a number?", "chosen": f"Yes, {i} is a number.",
                                                   "rejected": f"No, {i} is a word."} for i in range(16)])


def test_a_dpo_sweep_over_beta_is_one_array_whose_report_ranks_the_trials_by_held_out_preference(tmp_path, tiny_llama_dir, env):
    """A preference config through sbatch: `sweep --grid method.beta=...` is one job array of DPO runs (TRL in the job),
    each trial's summary holds its held-out preference, and the sweep's report ranks by it (there is no validation loss)."""
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir, method={"name": "dpo"}, data={"path": str(dpo_pairs(tmp_path)), "val_size": 4},
                        train={"max_steps": 3, "lr": 1e-2}, slurm={"mem": "3G"})
    job_id = job_id_from(hpclora("sweep", cfg, "--grid", "method.beta=0.1,0.5", env=env, cwd=tmp_path).stdout)
    assert wait_for(job_id, tasks=2) == {f"{job_id}_{i}": ("COMPLETED", "0:0") for i in range(2)}
    (sweep_dir,) = (tmp_path / "runs").iterdir()
    trials = json.loads((sweep_dir / "sweep.json").read_text())["trials"]
    for trial, beta in zip(trials, ("0.1", "0.5")):
        summary = json.loads((Path(trial["run_dir"]) / "summary.json").read_text())
        assert summary["method"] == "dpo" and summary["final_preference"]["pairs"] == 4
        assert f"method dpo | beta {beta} | loss sigmoid" in Path(trial["log"]).read_text()
    report = hpclora("report", sweep_dir, env=env, cwd=tmp_path).stdout
    written = (sweep_dir / "report.md").read_text()
    assert "sorted by held-out preference accuracy, then margin" in written and "Best: **trial-00" in written
    assert "| preference accuracy | margin |" in written and str(sweep_dir / "report.md") in report


def test_a_cancelled_dpo_job_goes_on_from_its_checkpoint_to_the_adapter_of_an_uninterrupted_run(tmp_path, tiny_llama_dir, env):
    """`hpclora cancel` of a DPO job between steps (paced, so the cancel lands mid-run), then `hpclora submit RUN_DIR`:
    the adapter of the same run trained without a stop, bit for bit (TRL's trainer state, the reference's passes)."""
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir, method={"name": "dpo"}, data={"path": str(dpo_pairs(tmp_path)), "val_size": 4},
                        train={"max_steps": 6, "lr": 1e-2}, slurm={"mem": "3G"})
    first = job_id_from(hpclora("submit", cfg, env=paced(env, 1), cwd=tmp_path).stdout)
    (run_dir,) = (tmp_path / "runs").iterdir()
    trained_steps(run_dir, 0, 2)
    assert hpclora("cancel", first, env=env, cwd=tmp_path).stdout.strip().endswith(f"checkpoint saved; to resume: hpclora submit {run_dir}")
    assert wait_for(first)[first][0] == "CANCELLED"
    stopped_at = newest_checkpoint_step(run_dir)
    assert 2 <= stopped_at < 6
    second = job_id_from(hpclora("submit", run_dir, env=env, cwd=tmp_path).stdout)
    assert wait_for(second) == {second: ("COMPLETED", "0:0")}
    assert f"resumed from step {stopped_at} (restart 1)" in (tmp_path / "logs" / f"tiny-{second}.out").read_text()
    hpclora("train", cfg, "--run-dir", tmp_path / "whole", env=env, cwd=tmp_path)
    same_weights(run_dir / "adapter" / "adapter_model.safetensors", tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
