"""`hpclora report` on real run and sweep directories, and the TensorBoard events every run writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from hpclora.results.report import trial_overrides, trial_style

from conftest import tiny_run_yaml

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_run_report_has_curves_verdict_and_tensorboard_events(real_run, cli):
    events = list((real_run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(real_run / "tensorboard")).Reload().Tags()["scalars"]
    assert "train/loss" in tags and "eval/loss" in tags

    done = cli("report", str(real_run))
    assert done.returncode == 0, done.stderr
    report = (real_run / "report.md").read_text()
    summary = json.loads((real_run / "summary.json").read_text())
    assert f"{summary['base_val_loss']:.4f} (base) -> {summary['final_val_loss']:.4f} (adapter)" in report
    assert "![loss curves](loss.png)" in report
    assert (real_run / "loss.png").read_bytes()[:8] == PNG_MAGIC


def test_sweep_report_ranks_trials_and_marks_the_best(tmp_path, tiny_llama_dir, cli):
    config = tiny_run_yaml(tmp_path, tiny_llama_dir, run={"name": "sw", "output_root": str(tmp_path / "runs")})
    swept = cli("sweep", str(config), "--grid", "train.lr=1e-6,1e-2", "--launcher", "local")
    assert swept.returncode == 0, swept.stderr
    sweep_dir = next(p.parent for p in (tmp_path / "runs").rglob("sweep.json"))

    done = cli("report", str(sweep_dir))
    assert done.returncode == 0, done.stderr
    rows = [line for line in (sweep_dir / "report.md").read_text().splitlines() if line.startswith("| ") and "trial-" in line]
    losses = [json.loads((sweep_dir / t / "summary.json").read_text())["final_val_loss"] for t in ("trial-000", "trial-001")]
    best = "trial-000" if losses[0] < losses[1] else "trial-001"
    assert len(rows) == 2 and rows[0].startswith("| best |") and best in rows[0]
    assert f"{min(losses):.4f}" in rows[0] and f"{max(losses):.4f}" in rows[1]
    assert (sweep_dir / "val_loss.png").read_bytes()[:8] == PNG_MAGIC
    assert (sweep_dir / best / "report.md").is_file()
    # Each trial's own plot is titled with what it changed.
    assert [trial_overrides(sweep_dir / t) for t in ("trial-000", "trial-001")] == ["train.lr=1e-6", "train.lr=1e-2"]
    assert trial_overrides(tmp_path) is None


def test_sweep_trials_each_get_a_look_of_their_own():
    """Forty trials, no two with the same colour and line style, and no two neighbours alike in any of the three."""
    looks = [trial_style(i) for i in range(40)]
    assert len({(look["color"], look["linestyle"]) for look in looks}) == 40
    assert all(a[key] != b[key] for a, b in zip(looks, looks[1:]) for key in ("color", "linestyle", "marker"))


def test_two_evaluations_are_plotted_as_points_not_joined_by_a_line_that_looks_measured(tmp_path):
    from hpclora.results.report import Curves, evaluations_style, plot_run

    assert evaluations_style([(0, 2.7), (30, 1.3)]) == {"marker": "o", "linestyle": "none"}
    assert evaluations_style([(0, 2.7), (10, 1.9), (30, 1.3)])["linestyle"] == ":"
    png = plot_run(Curves(train=[(1, 2.5), (2, 2.0)], val=[(0, 2.7), (2, 1.3)]), "two evaluations", tmp_path / "loss.png")
    assert png.read_bytes().startswith(b"\x89PNG")


def test_report_on_a_directory_that_is_no_run_is_a_clear_error(tmp_path, cli):
    done = cli("report", str(tmp_path))
    assert done.returncode == 2 and "not a run or sweep directory" in done.stderr and "Traceback" not in done.stderr


def test_wandb_runs_offline_on_offline_nodes_and_keeps_its_files_in_the_run(tmp_path, monkeypatch):
    from hpclora.job.tracking import wandb_settings

    monkeypatch.delenv("WANDB_MODE", raising=False)
    settings = wandb_settings("my-project", tmp_path / "run-7", offline=True)
    assert settings == {"project": "my-project", "name": "run-7", "dir": str(tmp_path / "run-7"), "mode": "offline"}
    assert wandb_settings("p", tmp_path, offline=False)["mode"] is None
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the user's own choice wins
    assert wandb_settings("p", tmp_path, offline=True)["mode"] is None


def test_wandb_without_the_package_stops_before_any_work(tmp_path, tiny_llama_dir):
    """wandb is installed with the test extras; a `None` in sys.modules makes it unimportable, as on a
    cluster without it."""
    config = tiny_run_yaml(tmp_path, tiny_llama_dir, run={"name": "wb", "output_root": str(tmp_path / "runs"), "wandb_project": "x"})
    code = "import sys; sys.modules['wandb'] = None; from hpclora.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "train", str(config)], capture_output=True, text=True)
    assert done.returncode == 2 and "run.wandb_project" in done.stderr and "pip install wandb" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_a_real_offline_wandb_run_keeps_its_files_in_the_run_directory_and_no_secret(tmp_path, tiny_llama_dir):
    secret = "wandb_v1_not_a_real_key_0123456789abcdef0123456789abcdef"
    config = tiny_run_yaml(tmp_path, tiny_llama_dir, run={"name": "wb", "output_root": str(tmp_path / "runs"), "wandb_project": "lab-lora"})
    env = {**os.environ, "WANDB_API_KEY": secret, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    env.pop("WANDB_MODE", None)
    done = subprocess.run([sys.executable, "-m", "hpclora", "train", str(config), "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    (offline_run,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert list(offline_run.glob("run-*.wandb"))  # what `wandb sync` uploads later, from a node with internet
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in done.stdout + done.stderr


def test_cut_or_edited_records_and_metrics_lines_are_named_never_a_traceback(real_run, tmp_path, cli):
    """What a kill, a full disk or a hand edit leaves: metrics lines without a loss, a job.json cut short or of
    other fields, a probe's records that lack its numbers. status, report and probe --read say so, or leave the
    line out and say which."""
    import shutil

    run = shutil.copytree(real_run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints", "merged"))
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3}\n{"step": 4, "val_loss": null}\n{"step": "5", "loss": 1.0}\n')
    report = cli("report", run)
    assert report.returncode == 0 and report.stderr.count("not a whole entry: left out of the curves") == 3
    status = cli("status", run)
    summary = json.loads((run / "summary.json").read_text())
    assert status.returncode == 0 and f"finished: val_loss base {summary['base_val_loss']:.4f} -> adapter {summary['final_val_loss']:.4f}" in status.stdout
    for record, problem in (('{"job_id": "1', "not a JSON record (cut short, or edited?)"),
                            ('{"job_id": 5, "log": 7}', "not the record hpclora wrote (kind, job_id, launcher, dir missing")):
        (run / "job.json").write_text(record)
        for command in ("status", "logs"):
            done = cli(command, run)
            assert done.returncode == 2 and problem in done.stderr, (command, done.stderr)
    (run / "probe.json").write_text('{"host": "n1"}')
    (run / "summary.json").write_text('{"tokens_per_s": "fast"}')
    done = cli("probe", "--read", run)
    assert done.returncode == 2 and "lack what it measures (summary.json: tokens_per_s, summary.json: peak_mem_gb)" in done.stderr
