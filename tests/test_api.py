"""The Python API, used only through what `hpclora` exports, as a notebook or a user's submitit script would:
errors as exceptions, a plan, runs and sweeps on the real test Slurm through sbatch and submitit, waiting and
reading summaries, and hpclora's job function in the user's own submitit AutoExecutor, requeued once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import hpclora

from conftest import ROOT, require_slurm, tiny_run_yaml, write_jsonl
from test_slurm import metrics_steps, requeue_records, signal_after, wait_for


@pytest.fixture(autouse=True)
def own_job_index(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCLORA_STATE_DIR", str(tmp_path / "state"))


def test_config_and_data_errors_are_exceptions_naming_the_key_or_row(tmp_path, tiny_llama_dir):
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir)
    with pytest.raises(hpclora.ConfigError) as caught:
        hpclora.load_config(cfg, ["lora.r=0", "train.lr=-1"])
    assert [key for key, _ in caught.value.problems] == ["lora.r", "train.lr"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}, "{not json"])
    with pytest.raises(hpclora.DataError) as caught:
        hpclora.load_config(cfg, [f"data.path={bad}"])
    assert caught.value.path == str(bad) and caught.value.row == 2
    assert isinstance(caught.value, hpclora.UserError)


def test_a_plan_without_torch():
    code = ("import sys, hpclora; cfg = hpclora.load_config(None, ['model.name=meta-llama/Llama-2-7b-hf', 'quant.bits=4', "
            "'data.path=owner/dataset'], check_data=False); p = hpclora.plan_run(cfg, 'v100-16gb'); "
            "print(p.fits, p.precision, [m for m in ('torch', 'transformers', 'peft') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.split() == ["True", "fp16", "[]"], done.stderr


def test_submit_with_sbatch_wait_and_read_the_summary(tmp_path, tiny_llama_dir):
    require_slurm()
    cfg = hpclora.load_config(tiny_run_yaml(tmp_path, tiny_llama_dir))
    run = hpclora.submit(cfg)
    assert run.kind == "run" and run.job_id.isdigit() and run.jobs == []
    assert run.wait(timeout=300, poll_s=1) == {run.job_id: "COMPLETED"}
    summary = hpclora.read_summary(run.run_dirs[0])
    assert summary["steps"] == 3 and summary["final_val_loss"] is not None
    assert run.summaries() == [summary]


def test_a_sweep_through_submitit_returns_its_jobs(tmp_path, tiny_llama_dir):
    require_slurm()
    import submitit

    sweep = hpclora.sweep(tiny_run_yaml(tmp_path, tiny_llama_dir), {"lora.r": [2, 4]}, launcher="submitit")
    assert sweep.kind == "sweep" and len(sweep.jobs) == 2 and all(isinstance(j, submitit.Job) for j in sweep.jobs)
    results = [job.result() for job in sweep.jobs]  # the job function returns the run's summary
    assert [r["steps"] for r in results] == [3, 3]
    assert set(sweep.wait(timeout=120, poll_s=1).values()) == {"COMPLETED"}
    ranks = [json.loads((d / "adapter" / "adapter_config.json").read_text())["r"] for d in sweep.run_dirs]
    assert ranks == [2, 4]


def test_the_job_function_in_a_users_own_executor_checkpoints_requeues_and_resumes(tmp_path, tiny_llama_dir, monkeypatch):
    """USR2, what submitit has Slurm send before the time limit, makes hpclora's job function checkpoint and requeue
    the job, which resumes from the checkpoint; stopped again it is out of requeues (slurm.max_requeues=1), and
    `result()` says so. The run is too long to end by itself, so no signal races its last step."""
    require_slurm()
    import submitit

    from test_slurm import LONG_RUN, attempt, paced

    for name, value in paced({}, 1).items():  # the job inherits this process's environment
        monkeypatch.setenv(name, value)

    cfg = hpclora.load_config(tiny_run_yaml(tmp_path, tiny_llama_dir, train=LONG_RUN, slurm={"max_requeues": 1}))
    run_dir = hpclora.prepare_run(cfg)
    assert (run_dir / "config.yaml").is_file() and not (run_dir / "adapter").exists()
    executor = submitit.AutoExecutor(folder=tmp_path / "my-submitit", slurm_max_num_timeout=2)
    executor.update_parameters(**hpclora.executor_parameters(cfg))
    job = executor.submit(hpclora.TrainingJob(), str(run_dir))
    signal_after(job.job_id, run_dir, 0, 5, ["--signal=USR2"])
    signal_after(job.job_id, run_dir, 1, 3, ["--signal=USR2"])
    with pytest.raises(submitit.core.utils.FailedJobError, match="the job was not requeued"):
        job.result()
    assert wait_for(job.job_id)[job.job_id] == ("FAILED", "1:0")
    assert requeue_records(job.job_id) == ["REQUEUED", "FAILED"]
    assert attempt(run_dir, 1)["resumed_from"] >= 5
    steps = metrics_steps(run_dir)
    assert steps == list(range(1, steps[-1] + 1))  # resumed from its checkpoint: no step twice, none missing


def test_the_submitit_example_in_jobs_runs_as_documented(tmp_path, tiny_llama_dir):
    require_slurm()
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir)
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "submitit_launch.py"), str(cfg), "lora.r=2"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "plan: peak" in done.stdout and "submitted job " in done.stdout and "done: 3 steps, val_loss " in done.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "jobs" / "submitit_launch.py"), str(cfg), "lora.r=0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "lora.r" in bad.stderr and "Traceback" not in bad.stderr
