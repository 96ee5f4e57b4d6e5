"""Launch without a cluster: rendered scripts against golden files, quoting, slurm config checks, sweep
grids, submitit parameters, status from run directories, and the submitit (debug/local) and local
launchers running a real tiny training. The real-Slurm tests are in test_slurm.py.

Set HPCLORA_UPDATE_GOLDEN=1 to rewrite the golden files after an intended change, then review the diff.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpclora import config, plan
from hpclora.errors import ConfigError
from hpclora.launch import launchers, render, submit, sweep, watch
from hpclora.launch.submitit import parameters, slurm_minutes

from conftest import ROOT, alpaca_rows, tiny_run_yaml, write_jsonl

GOLDEN = Path(__file__).parent / "golden"
PYTHON = "/opt/venvs/hpclora/bin/python"
CLUSTER_KEYS = [
    "run.name=ja-instruct", "run.output_root=/cluster/runs", "data.path=/cluster/data/dolly-ja.jsonl",
    "slurm.log_dir=/cluster/logs", "slurm.partition=gpu", "slurm.gpu_type=v100", "slurm.time=1-12:00:00",
    "slurm.cpus_per_task=6", "slurm.mem=48G", "slurm.account=lab-nlp", "slurm.setup=['module load cuda/11.8']",
    "slurm.extra=['--mail-type=END']", "cache.hf_home=/cluster/hf",
]
CONTAINER_KEYS = ["container.image=/cluster/images/hpclora.sif", "container.binds=[/scratch]", "container.env.OMP_PROC_BIND=close"]


def cluster_config(*extra: str) -> config.RunConfig:
    return config.load(None, [*CLUSTER_KEYS, *extra], check_files=False)


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("HPCLORA_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with HPCLORA_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{name} differs from its golden file (HPCLORA_UPDATE_GOLDEN=1 to accept)"


@pytest.mark.parametrize("image", [False, True])
@pytest.mark.parametrize("kind", ["run", "sweep"])
def test_rendered_scripts_match_golden_files(kind, image):
    cfg = cluster_config(*(CONTAINER_KEYS if image else []))
    if kind == "run":
        payload = render.Payload(python=PYTHON, run_dir="/cluster/runs/ja-instruct-20261122-093000")
    else:
        payload = render.Payload(python=PYTHON, sweep_dir="/cluster/runs/ja-instruct-sweep-20261122-093000", trials=6, max_parallel=2)
    text = render.render_script(cfg, payload, submitted_by=f"hpclora {'submit' if kind == 'run' else 'sweep'}")
    check_golden(f"{kind}{'-container' if image else ''}.sbatch", text)
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_a_sweep_with_trials_per_node_matches_its_golden_file():
    """Five one-GPU trials, two per array task: three tasks of two GPUs each, the last with one trial."""
    cfg = cluster_config("slurm.gpus=1")
    payload = render.Payload(python=PYTHON, sweep_dir="/cluster/runs/ja-instruct-sweep-20261122-093000", trials=5, trials_per_task=2)
    text = render.render_script(cfg, payload, submitted_by="hpclora sweep")
    check_golden("sweep-2-per-node.sbatch", text)
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    assert "#SBATCH --array=0-2\n" in text and "#SBATCH --gres=gpu:v100:2\n" in text and "#SBATCH --cpus-per-task=12\n" in text
    assert "#SBATCH --mem=98304M\n" in text and "%x-%A_task%a.out" in text  # 2 x 48G, in Slurm's binary units


@pytest.mark.parametrize("name, keys", [
    ("run-1node-4gpu", ["slurm.gpus=4"]),
    ("run-2node-4gpu", ["slurm.nodes=2", "slurm.gpus=4"]),
    ("run-2node-4gpu-container", ["slurm.nodes=2", "slurm.gpus=4", *CONTAINER_KEYS]),
])
def test_rendered_multi_rank_scripts_match_golden_files(name, keys):
    """One srun task per node runs torchrun; one node meets on localhost, several at the first node."""
    cfg = cluster_config(*keys)
    text = render.render_script(cfg, render.Payload(python=PYTHON, run_dir="/cluster/runs/ja-instruct-20261122-093000"))
    check_golden(f"{name}.sbatch", text)
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    assert "--ntasks-per-node=1" in text and "--ntasks=1" not in text
    assert ("--standalone" in text) == ("nodes=2" not in " ".join(keys))


@pytest.mark.parametrize("name", ["train.sbatch", "sweep.sbatch"])
def test_the_hand_written_templates_in_jobs_are_what_the_renderer_writes(name):
    """jobs/*.sbatch carry the very protocol lines of every rendered script (one source: launch/protocol.py)."""
    from hpclora.launch import protocol
    from hpclora.launch.templates import render_template

    text = render_template(name)
    path = ROOT / "jobs" / name
    if os.environ.get("HPCLORA_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"jobs/{name} differs from launch/templates.py (HPCLORA_UPDATE_GOLDEN=1 rewrites it)"
    assert "\n".join(protocol.protocol_lines()) in text and "\n".join(protocol.thread_lines()) in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_gpu_request_forms():
    assert render.gpu_request(cluster_config().slurm) == "--gres=gpu:v100:1"
    assert render.gpu_request(cluster_config("slurm.gpus=2", "slurm.gpu_type=null").slurm) == "--gres=gpu:2"
    assert render.gpu_request(cluster_config("slurm.gpu_flag=gpus", "slurm.gpus=4").slurm) == "--gpus=v100:4"
    assert render.gpu_request(cluster_config("slurm.gpus=0", "slurm.gpu_type=null").slurm) is None
    assert not any(o.startswith(("--gres", "--gpus")) for o in render.sbatch_options(cluster_config("slurm.gpus=0", "slurm.gpu_type=null")))


def test_hostile_names_and_paths_reach_the_script_as_inert_strings(tmp_path):
    """The body's values are shlex-quoted: bash reads them back as the very same strings."""
    root = "/cluster/my runs/$(touch pwned)/`touch pwned2`/it's"
    cfg = cluster_config("run.name=x\"; touch pwned; echo \"", f"run.output_root={root}")
    job = submit.prepare_job(cfg, python=PYTHON)
    assert job.directory.parent == Path(root)
    assert job.directory.name.startswith("x-touch-pwned-echo-")
    text = job.script
    run_dir_line = next(line for line in text.splitlines() if line.startswith("RUN_DIR="))
    shown = subprocess.run(["bash", "-c", f'{run_dir_line}\nprintf %s "$RUN_DIR"'], cwd=tmp_path, capture_output=True, text=True)
    assert shown.stdout == str(job.directory)
    assert not any(p.name.startswith("pwned") for p in tmp_path.iterdir())
    assert "--job-name=x-touch-pwned-echo\n" in text


def test_slurm_values_that_could_break_the_script_are_config_errors():
    with pytest.raises(ConfigError) as err:
        cluster_config(
            "slurm.time=2 days", "slurm.mem=lots", "slurm.partition=gpu;rm -rf ~", 'slurm.extra=["--comment=a\\nrm x"]',
            "slurm.log_dir=/cluster/\"logs\"", "slurm.nodes=0", "slurm.gpus=0", 'slurm.setup=["a\\nb"]',
        )
    problems = dict(err.value.problems)
    for key in ("slurm.time", "slurm.mem", "slurm.partition", "slurm.extra[0]", "slurm.log_dir", "slurm.nodes", "slurm.gpu_type", "slurm.setup[0]"):
        assert key in problems, key


def test_log_dir_percent_is_escaped_for_slurm_and_log_paths_are_filled_in():
    cfg = cluster_config("slurm.log_dir=/cluster/100%/logs")
    assert render.log_pattern(cfg, array=False) == "/cluster/100%%/logs/%x-%j.out"
    assert render.log_path(cfg, "123") == "/cluster/100%/logs/ja-instruct-123.out"
    assert render.log_path(cfg, "123", 4) == "/cluster/100%/logs/ja-instruct-123_4.out"


def test_grid_values_split_on_top_level_commas_only():
    assert sweep.split_values("8,16, 32") == ["8", "16", "32"]
    assert sweep.split_values("[q_proj,v_proj],[q_proj]") == ["[q_proj,v_proj]", "[q_proj]"]
    assert sweep.split_values("'a,b',c") == ["'a,b'", "c"]
    grid = sweep.parse_grid(["lora.r=8,16", "train.lr=1e-4,2e-4,3e-4"])
    trials = sweep.trials(grid)
    assert len(trials) == 6
    assert trials[0] == ["lora.r=8", "train.lr=1e-4"] and trials[1] == ["lora.r=8", "train.lr=2e-4"]
    assert trials[-1] == ["lora.r=16", "train.lr=3e-4"]


def test_bad_grids_are_reported_together():
    with pytest.raises(ConfigError) as err:
        sweep.parse_grid(["lora.r", "slurm.gpus=1,2", "run.output_root=a,b", "lora.r=4,8", "lora.r=2"])
    problems = dict(err.value.problems)
    assert "lora.r" in problems and "slurm.gpus" in problems and "run.output_root" in problems
    assert "given twice" in problems["lora.r"]


def test_a_sweep_validates_every_trial_before_anything_is_written(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(4))
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"run: {{output_root: {tmp_path / 'runs'}}}\ndata: {{path: {data}}}\n")
    with pytest.raises(ConfigError) as err:
        submit.prepare_sweep(str(cfg_path), [], ["lora.r=0,8", "train.lr=1e-4,2"], None)
    keys = [key for key, _ in err.value.problems]
    assert "trial 0 (lora.r=0 train.lr=1e-4): lora.r" in keys
    assert "trial 3 (lora.r=8 train.lr=2): train.lr" in keys
    assert not (tmp_path / "runs").exists()


def test_a_64_trial_sweep_is_one_array_script(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(4))
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"run: {{output_root: {tmp_path / 'runs'}}}\ndata: {{path: {data}}}\n")
    grid = ["lora.r=4,8,16,32", "train.lr=1e-4,2e-4,3e-4,4e-4", "lora.dropout=0,0.05,0.1,0.2"]
    job = submit.prepare_sweep(str(cfg_path), ["train.max_steps=10", "slurm.gpus=0"], grid, 8, python=PYTHON)
    assert len(job.trial_cfgs) == 64 and len(job.run_dirs) == 64
    assert job.script.count("#SBATCH --array=0-63%8\n") == 1
    submit.write(job)
    assert {p.name for p in job.directory.iterdir()} >= {"job.sbatch", "trial-000", "trial-063"}
    trial = config.load(job.run_dirs[63] / "config.yaml")
    assert (trial.lora.r, trial.train.lr, trial.lora.dropout, trial.train.max_steps) == (32, 4e-4, 0.2, 10)
    # the planner's choices, made on the login node, are what the job trains with
    assert (trial.data.packing, trial.train.gradient_checkpointing) == (True, False)


def test_slurm_time_in_minutes():
    assert [slurm_minutes(t) for t in ("30", "90:30", "04:00:00", "1-00", "1-02:30", "2-00:00:01")] == [30, 91, 240, 1440, 1590, 2881]


def test_submitit_gets_the_same_resources_as_the_script():
    params = parameters(cluster_config("slurm.qos=long"), array_parallelism=2)
    assert params["slurm_gres"] == "gpu:v100:1" and params["slurm_partition"] == "gpu" and params["slurm_qos"] == "long"
    assert params["timeout_min"] == 2160 and "slurm_time" not in params and params["slurm_mem"] == "48G"
    assert params["cpus_per_task"] == 6 and params["slurm_array_parallelism"] == 2
    assert params["slurm_additional_parameters"] == {"requeue": True, "mail-type": "END"}
    assert params["slurm_setup"][0].startswith("export SRUN_CPUS_PER_TASK=") and "module load cuda/11.8" in params["slurm_setup"]
    assert parameters(cluster_config("slurm.gpu_flag=gpus")).get("slurm_additional_parameters", {})["gpus"] == "v100:1"


def test_last_progress_line_prefers_progress_and_errors(tmp_path):
    log = tmp_path / "x.out"
    log.write_text("hpclora: job 1 started\nstep 3/10 | loss 1.0\nsome library chatter\nhpclora: job 1 ended with exit code 0\n")
    assert watch.last_progress_line(log) == "step 3/10 | loss 1.0"
    log.write_text("step 3/10 | loss 1.0\nTraceback (most recent call last):\n  File x\nRuntimeError: CUDA out of memory\nhpclora: job 1 ended\n")
    assert watch.last_progress_line(log) == "RuntimeError: CUDA out of memory"
    assert watch.last_progress_line(tmp_path / "missing.out") == "(no log yet)"


LIGHT_COMMANDS = {
    "submit --dry-run": ["submit", "{cfg}", "--dry-run"],
    "sweep --dry-run": ["sweep", "{cfg}", "--grid", "lora.r=4,8", "--dry-run"],
    "status": ["status", "{run}"],
    "logs": ["logs", "{run}"],
}


@pytest.mark.parametrize("name", list(LIGHT_COMMANDS))
def test_login_node_commands_do_not_import_heavy_libraries(name, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(4))
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"run: {{output_root: {tmp_path / 'runs'}}}\ndata: {{path: {data}}}\n")
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("")
    (run / "job.json").write_text(json.dumps({"kind": "run", "launcher": "sbatch", "job_id": None, "name": "r1", "dir": str(run), "log": str(tmp_path / "r1.out")}))
    (tmp_path / "r1.out").write_text("step 1/2 | loss 1.0\n")
    argv = [a.format(cfg=cfg_path, run=run) for a in LIGHT_COMMANDS[name]]
    code = (
        "import sys; from hpclora.cli import main; rc = main(sys.argv[1:]); "
        "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules)); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout


def test_local_launcher_runs_the_job_payload_in_process(tmp_path, tiny_llama_dir, monkeypatch, capfd):
    """... and the job says why each `auto` setting has the value submit decided for it (run.decided)."""
    monkeypatch.setenv("HPCLORA_STATE_DIR", str(tmp_path / "state"))
    cfg = config.load(tiny_run_yaml(tmp_path, tiny_llama_dir))
    assert cfg.train.gradient_checkpointing == "auto" and cfg.data.packing == "auto"
    job = submit.prepare_job(cfg)
    entry, code = submit.launch(job, launchers.Local())
    assert code == 0 and entry["job_id"] is None and (job.directory / "adapter" / "adapter_config.json").exists()
    written = config.load(job.directory / "config.yaml")
    assert written.train.gradient_checkpointing is False and written.data.packing is True
    assert written.run.decided["train.gradient_checkpointing"].startswith("auto, decided at submit for cpu: the run fits in ")
    log = capfd.readouterr().out
    assert f"gradient checkpointing off: {written.run.decided['train.gradient_checkpointing']}" in log
    assert "data: auto, decided at submit: packed: several examples per row" in log
    assert (job.directory / "job.sbatch").exists() and json.loads((job.directory / "job.json").read_text())["launcher"] == "local"
    target = watch.resolve(str(job.directory))
    watch.fill_states(target)
    assert target.rows[0].state == "finished (adapter saved)"
    assert target.rows[0].last.startswith("finished: val_loss base ") and target.rows[0].last.endswith(" after 3 steps")


@pytest.mark.parametrize("cluster", ["debug", "local"])
def test_submitit_without_slurm_trains_a_sweep(tmp_path, tiny_llama_dir, monkeypatch, cluster):
    """submitit's debug (in-process) and local (child process) executors: the same payload, no Slurm."""
    monkeypatch.setenv("HPCLORA_STATE_DIR", str(tmp_path / "state"))
    job = submit.prepare_sweep(str(tiny_run_yaml(tmp_path, tiny_llama_dir)), [], ["lora.r=2,4"], None)
    entry, code = submit.launch(job, launchers.Submitit(cluster))
    assert code == 0
    for i, run_dir in enumerate(job.run_dirs):
        adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
        assert adapter["r"] == [2, 4][i]
    manifest = json.loads((job.directory / "sweep.json").read_text())
    assert [t["overrides"] for t in manifest["trials"]] == [["lora.r=2"], ["lora.r=4"]]
    assert manifest["launcher"] == "submitit" and manifest["cluster"] == cluster and entry["job_id"]
    assert (job.directory / "submitit").is_dir()


def test_status_of_an_unknown_target_is_a_user_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hpclora", "status", str(tmp_path / "nope")], capture_output=True, text=True)
    assert proc.returncode == 2 and "neither a job id" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", [
    ["validate"], ["plan", "--gpu", "cpu"], ["submit", "--dry-run"], ["submit"], ["submit", "--launcher", "local"],
    ["sweep", "--grid", "lora.r=4,8", "--dry-run"], ["sweep", "--grid", "lora.r=4,8"],
])
def test_a_bad_row_fails_on_the_login_node_before_anything_is_written(tmp_path, command):
    """Today's jobs would have been queued and failed at row 3; here every command stops with train's own error."""
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(2) + ['{"instruction": "no answer"}'] + alpaca_rows(5))
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(json.dumps({"run": {"output_root": str(tmp_path / "runs")}, "data": {"path": str(data)},
                                    "slurm": {"gpus": 0, "log_dir": str(tmp_path / "logs")}}))
    proc = subprocess.run([sys.executable, "-m", "hpclora", command[0], str(cfg_path), *command[1:]], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: {data}:3: missing field 'output'" in proc.stderr.splitlines()
    assert not (tmp_path / "runs").exists() and not (tmp_path / "logs").exists()


def test_data_in_another_encoding_is_refused_by_submit_with_the_conversion(tmp_path):
    data = tmp_path / "ja.jsonl"
    data.write_bytes('{"instruction": "富士山の高さは？", "output": "3776メートルです。"}\n'.encode("shift_jis"))
    proc = subprocess.run([sys.executable, "-m", "hpclora", "submit", "--dry-run", str(ROOT / "configs" / "demo-cpu.yaml"),
                           f"data.path={data}"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "looks like Shift_JIS (Windows CP932) (line 1 then reads '{\"instruction\": \"富士山の高さは？" in proc.stderr
    assert "; convert it with `iconv -f CP932 -t UTF-8" in proc.stderr


def test_max_length_beyond_the_model_context_is_refused_before_the_queue(tmp_path):
    for command in (["validate"], ["plan", "--gpu", "a100-80gb"], ["submit", "--dry-run"]):
        proc = subprocess.run([sys.executable, "-m", "hpclora", command[0], str(ROOT / "configs" / "open-calm-7b-qlora-dolly-ja.yaml"),
                               *command[1:], "data.max_length=4096"], capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert ("error: data.max_length: 4096 tokens do not fit the context of cyberagent/open-calm-7b, 2048 tokens "
                "(max_position_embeddings, from built-in table): use at most 2048") in proc.stderr


@pytest.mark.parametrize("name, directory", [("ja", "ja-sweep-"), ("my-ja-sweep", "my-ja-sweep-"), ("lr_Sweep", "lr_Sweep-")])
def test_a_sweeps_directory_says_sweep_once(tmp_path, cli, name, directory):
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(4))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run: {{name: {name}, output_root: {tmp_path / 'runs'}}}\ndata: {{path: {data}}}\n")
    done = cli("sweep", cfg, "--grid", "lora.r=4,8", "--dry-run")
    assert done.returncode == 0, done.stderr
    written = Path(done.stdout.split("# would run: sbatch ")[1].split()[0]).parent
    assert written.name.startswith(directory) and "-sweep-sweep" not in written.name.lower()


def test_elapsed_times_read_the_same_while_a_job_runs_and_after():
    """squeue says `2:32` (minutes:seconds) where sacct says `00:02:32`: status shows both the second way."""
    from hpclora.launch.slurm import as_clock

    assert [as_clock(t) for t in ("2:32", "0:05", "1:02:03", "3-04:05:06")] == ["00:02:32", "00:00:05", "01:02:03", "3-04:05:06"]


@pytest.mark.parametrize("grid", ["cache.hf_home=/tmp/a,/tmp/b", "train.cpu_ranks=1,2", "train.preempt_grace_s=60,90"])
def test_a_sweep_refuses_to_vary_what_its_one_job_script_holds(tmp_path, cli, grid):
    """Every task of the array runs one script: a key written into it would take the first trial's value in all."""
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(4))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run: {{output_root: {tmp_path / 'runs'}}}\ndata: {{path: {data}}}\nslurm: {{gpus: 0, cpus_per_task: 2, mem: 12G}}\n")
    done = cli("sweep", cfg, "--grid", grid, "--grid", "lora.r=4,8", "--dry-run")
    key = grid.split("=")[0]
    assert done.returncode == 2 and f"error: {key}: cannot vary within one sweep" in done.stderr, done.stderr
    assert "lora.r" not in done.stderr and not (tmp_path / "runs").exists()


def test_a_path_the_file_system_cannot_hold_is_an_error_line_not_a_traceback(tmp_path, cli):
    too_long = tmp_path / ("x" * 300)
    for command in (["status", too_long], ["logs", too_long], ["report", too_long], ["validate", too_long]):
        done = cli(*command)
        assert done.returncode == 2 and "file name is longer than 255 bytes" in done.stderr, (command, done.stderr)
