"""`hpclora export RUN --submit` on the login node: the CPU job it writes for a 7B run, sized by the planner, checked
before anything is queued, with nothing heavy imported. (The job running in the test Slurm: test_export.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import alpaca_rows, write_jsonl

LIGHT = ("import sys; from hpclora.cli import main; rc = main(sys.argv[1:]); "
         "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'peft', 'datasets', 'llama_cpp') if m in sys.modules)); sys.exit(rc)")


@pytest.fixture
def finished_7b_run(tmp_path):
    """A finished run directory of a Llama-2-7B LoRA on a V100 in a container image, as hpclora writes it: its
    resolved config.yaml and an adapter (a whole safetensors file). The model's dimensions come from the built-in
    table, as on a login node without its weights."""
    from safetensors.numpy import save_file
    import numpy as np

    from hpclora import config
    from hpclora.rundir import mark_run_dir, write_config

    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(4))
    yaml = tmp_path / "c.yaml"
    yaml.write_text(json.dumps({
        "model": {"name": "meta-llama/Llama-2-7b-hf"}, "data": {"path": str(data)},
        "run": {"output_root": str(tmp_path / "runs")}, "container": {"image": "/images/hpclora.sif"},
        "slurm": {"partition": "gpu", "gpus": 1, "gpu_type": "v100", "mem": "64G", "cpus_per_task": 8, "account": "lab",
                  "extra": ["--exclusive"], "setup": ["module load apptainer"]},
    }))
    run = tmp_path / "runs" / "llama-ja $(touch pwned)"
    (run / "adapter").mkdir(parents=True)
    mark_run_dir(run)
    write_config(run, config.load(yaml))
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    save_file({"lora_A": np.zeros((8, 16), dtype=np.float32)}, str(run / "adapter" / "adapter_model.safetensors"))
    return run


def light_cli(*argv, cwd):
    done = subprocess.run([sys.executable, "-c", LIGHT, *map(str, argv)], capture_output=True, text=True, cwd=cwd)
    heavy = next((line for line in done.stdout.splitlines() if line.startswith("HEAVY")), None)  # argparse exits first
    return done, heavy


def test_the_export_job_asks_the_merges_memory_and_no_gpu_and_quotes_the_run(finished_7b_run, tmp_path):
    from hpclora.catalog.dims import ModelDims
    from hpclora.catalog.models import KNOWN_DIMS
    from hpclora.plan.merge import merge_memory_gb

    done, heavy = light_cli("export", finished_7b_run, "--submit", "--dry-run", "--quant", "q4_k_m", "slurm.partition=cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert heavy == "HEAVY []"  # the login node's speed: no torch, transformers, peft, llama.cpp
    script = done.stdout.split("\n# dry run:")[0]
    options = [line.split(" ", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]
    gb = merge_memory_gb(ModelDims(*KNOWN_DIMS["meta-llama/Llama-2-7b-hf"]))
    assert 27 < gb < 31  # 6.7 billion parameters merged in fp32, and the interpreter
    assert f"--mem={-(-gb * 1e9 // 2 ** 30):.0f}G" in options and "--partition=cpu" in options and "--account=lab" in options
    assert "--no-requeue" in options and "--cpus-per-task=8" in options and "--ntasks=1" in options
    assert not [o for o in options if "gpu" in o or "gres" in o or o in ("--exclusive", "--requeue") or o.startswith("--signal")]
    assert [o for o in options if o.startswith("--time=")] == ["--time=01:10:00"]  # 15 min + 2 min per GB of fp32 weights
    assert "module load apptainer" in script and "--nv" not in script

    # The run's name and paths reach the job as text: bash parses the script, and the export line is one command.
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    command = next(line for line in script.splitlines() if line.startswith("exec "))
    assert command.endswith(f"/images/hpclora.sif /bin/sh -c 'trap \"\" USR1 USR2 TERM; exec \"$@\"' hpclora-job hpclora export "
                            f"'{finished_7b_run}' --quant q4_k_m --out '{finished_7b_run}/gguf-q4_k_m'")
    assert f"-B {tmp_path} " in command  # the data's directory, which holds the run (and so --out) too
    assert not (finished_7b_run / "gguf-q4_k_m.sbatch").exists()  # a dry run writes nothing

    done, _ = light_cli("export", finished_7b_run, "--submit", "--dry-run", "slurm.mem=48G", "slurm.time=3:00:00", cwd=tmp_path)
    assert done.returncode == 0 and "#SBATCH --mem=48G" in done.stdout and "#SBATCH --time=3:00:00" in done.stdout
    done, _ = light_cli("export", finished_7b_run, "--submit", "--dry-run", "--adapter-only", "--quant", "f16", cwd=tmp_path)
    assert done.returncode == 0 and "#SBATCH --mem=2G" in done.stdout  # an adapter alone loads no model


@pytest.mark.parametrize("argv, said", [
    (["--dry-run"], "--dry-run and slurm.* settings go with --submit"),
    (["slurm.partition=cpu"], "--dry-run and slurm.* settings go with --submit"),
    (["--submit", "lora.r=4"], "lora.r=4: only slurm.* settings (the job's resources) apply to an export"),
    (["--submit", "slurm.time=99:99:99"], "slurm.time:"),
    (["--submit", "--quant", "q9_9"], "invalid choice: 'q9_9'"),
])
def test_the_export_job_refuses_on_the_login_node(finished_7b_run, tmp_path, argv, said):
    done, _ = light_cli("export", finished_7b_run, *argv, cwd=tmp_path)
    assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr


def test_an_unfinished_run_is_refused_before_the_queue(finished_7b_run, tmp_path):
    (finished_7b_run / "adapter" / "adapter_config.json").unlink()
    done, _ = light_cli("export", finished_7b_run, "--submit", "--dry-run", cwd=tmp_path)
    assert done.returncode == 2 and "has no finished adapter yet" in done.stderr


def test_status_finds_an_export_job_by_id_and_judges_it_by_its_directory_once_slurm_forgets(tmp_path, monkeypatch, cli):
    """A job id no Slurm here knows (nor the test Slurm: ids that high are never reached), recorded by export --submit."""
    from hpclora.launch import registry

    monkeypatch.setenv("HPCLORA_STATE_DIR", str(tmp_path / "state"))
    target = tmp_path / "gguf-q8_0"
    target.mkdir()
    (target / "EXPORTED_FROM.json").write_text("{}")
    registry.record({"kind": "export", "job_id": "987654321", "launcher": "sbatch", "name": "r-export", "dir": str(target),
                     "log": str(tmp_path / "r-export-987654321.out")})
    done = cli("status", "987654321")
    assert done.returncode == 0, done.stderr
    assert f"export 987654321 (sbatch) in {target}" in done.stdout and "finished (exported)" in done.stdout
