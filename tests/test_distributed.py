"""Several ranks for real: gloo on this CPU under torchrun (no mock of torch.distributed). Each rank runs
hpclora's own training; a small harness then saves that rank's LoRA weights, so that the ranks can be
compared with each other and with one process over the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import alpaca_rows, tiny_run_yaml, write_jsonl

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
HARNESS = """
import json, os, sys
from peft import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from hpclora import config
from hpclora.job.train import train

config_path, run_dir, out = sys.argv[1:4]
rank = os.environ.get("RANK", "0")
with open(f"{out}/pid{rank}", "w") as fh:
    fh.write(str(os.getpid()))
if os.environ.get("STOP_RANK") == rank:  # a stop signal to this rank at the end of step STOP_AT
    sys.path.insert(0, os.environ["TESTS_DIR"])
    from conftest import StopAt
    with StopAt(int(os.environ["STOP_AT"])) as stop:
        run = train(config.load(config_path, sys.argv[4:]), run_dir=run_dir, stop=stop)
else:
    run = train(config.load(config_path, sys.argv[4:]), run_dir=run_dir)
if any(hasattr(p, "full_tensor") for p in run.model.parameters()):  # FSDP: shards, and no process group left to gather
    weights = load_file(f"{run_dir}/adapter/adapter_model.safetensors") if run.finished else {}  # them (PEFT 0.22 would try)
else:
    weights = get_peft_model_state_dict(run.model)
weights = {k: v.detach().contiguous() for k, v in weights.items()}
save_file(weights, f"{out}/rank{rank}.safetensors")
with open(f"{out}/result{rank}.json", "w") as fh:
    json.dump({"finished": run.finished, "steps": run.summary["steps"]}, fh)
"""


def ddp_config(tmp_path: Path, model_dir: Path, **train) -> Path:
    config = tiny_run_yaml(tmp_path, model_dir, lora={"dropout": 0.0},
                           train={"max_steps": 4, "micro_batch_size": 4, "grad_accum": 1, "eval_every": 2, **train},
                           data={"val_size": 7})  # 7 rows: no even split over 2 ranks x 4 rows
    write_jsonl(tmp_path / "data.jsonl", alpaca_rows(40))
    return config


def harness(tmp_path: Path, config: Path, run_dir: Path, name: str, launcher: list[str], *overrides: str, wait: bool = True,
            stop_rank_at: tuple[int, int] | None = None):
    """Train under `launcher`; `stop_rank_at` (rank, step): that rank gets a stop signal at the end of that step."""
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / "harness.py"
    script.write_text(HARNESS)
    argv = [*launcher, str(script), str(config), str(run_dir), str(out), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if stop_rank_at:
        env.update(STOP_RANK=str(stop_rank_at[0]), STOP_AT=str(stop_rank_at[1]), TESTS_DIR=str(Path(__file__).parent))
    if not wait:
        return out, subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done


def two_ranks(*extra: str) -> list[str]:
    return [*TORCHRUN, "--standalone", "--nproc-per-node", "2", *extra]


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def logged_steps(run_dir: Path) -> list[int]:
    return [e["step"] for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in e]


def val_losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["val_loss"] for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "val_loss" in e}


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, tiny_llama_dir):
    """One process, 4 rows x 2 accumulation = the 2-rank runs' global batch of 8."""
    tmp = tmp_path_factory.mktemp("one-rank")
    config = ddp_config(tmp, tiny_llama_dir)
    out, _ = harness(tmp, config, tmp / "run", "out", [sys.executable], "train.grad_accum=2")
    return weights(out / "rank0.safetensors"), val_losses(tmp / "run")


def test_two_gloo_ranks_train_one_adapter_equal_to_one_rank_over_the_same_global_batch(tmp_path, tiny_llama_dir, one_rank):
    one_rank, one_rank_val = one_rank
    config = ddp_config(tmp_path, tiny_llama_dir)
    run_dir = tmp_path / "run"
    out, done = harness(tmp_path, config, run_dir, "out", two_ranks())
    rank0, rank1 = weights(out / "rank0.safetensors"), weights(out / "rank1.safetensors")
    assert max_difference(rank0, rank1) == 0.0  # DDP: one model, not two copies trained apart
    assert max_difference(rank0, one_rank) <= 1e-6
    assert max_difference(weights(run_dir / "adapter" / "adapter_model.safetensors"), rank0) == 0.0
    # The validation loss over 7 rows split 4 + 3: each row counted once, as by one rank.
    assert sorted(val_losses(run_dir)) == sorted(one_rank_val) == [0, 2, 4]
    assert all(abs(val_losses(run_dir)[s] - one_rank_val[s]) <= 1e-5 * one_rank_val[s] for s in one_rank_val)
    # One voice: rank 0 alone logged, wrote metrics and attempts, and printed.
    assert logged_steps(run_dir) == [1, 2, 3, 4]
    assert len((run_dir / "attempts.jsonl").read_text().splitlines()) == 1
    assert done.stdout.count("adapter saved to") == 1 and done.stdout.count("eval base @ step 0") == 1
    assert "world 2 ranks (gloo)" in done.stdout and "batch 4 x 1 accumulation x 2 ranks = 8 rows/step" in done.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tokens"] > 0 and summary["steps"] == 4


def test_gradient_checkpointing_under_ddp_trains_the_same_adapter(tmp_path, tiny_llama_dir, one_rank):
    one_rank, _ = one_rank
    config = ddp_config(tmp_path, tiny_llama_dir)
    out, _ = harness(tmp_path, config, tmp_path / "run", "out", two_ranks(), "train.gradient_checkpointing=true")
    assert max_difference(weights(out / "rank0.safetensors"), weights(out / "rank1.safetensors")) == 0.0
    assert max_difference(weights(out / "rank0.safetensors"), one_rank) <= 1e-5


def test_a_stop_signal_to_one_rank_stops_every_rank_at_the_same_step_and_the_resume_is_exact(tmp_path, tiny_llama_dir):
    config = ddp_config(tmp_path, tiny_llama_dir, max_steps=30, eval_every=0, log_every=1)
    reference, _ = harness(tmp_path, config, tmp_path / "reference-run", "reference", two_ranks())
    run_dir = tmp_path / "run"
    out, proc = harness(tmp_path, config, run_dir, "stopped", two_ranks(), wait=False)
    deadline = time.time() + 300
    while not ((run_dir / "metrics.jsonl").exists() and any(s >= 3 for s in logged_steps(run_dir))):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.kill(int((out / "pid1").read_text()), signal.SIGUSR1)  # rank 1 only
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    results = [json.loads((out / f"result{r}.json").read_text()) for r in (0, 1)]
    assert results[0] == results[1] and not results[0]["finished"] and results[0]["steps"] < 30
    saved = run_dir / "checkpoints" / f"checkpoint-{results[0]['steps']}"
    assert (saved / "COMPLETE").is_file() and {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in saved.iterdir()}
    assert "stopped by a stop signal to another rank" in output

    resumed, _ = harness(tmp_path, config, run_dir, "resumed", two_ranks())
    assert max_difference(weights(resumed / "rank0.safetensors"), weights(reference / "rank0.safetensors")) == 0.0
    assert logged_steps(run_dir) == list(range(1, 31))


def test_resuming_with_another_world_size_is_refused_with_the_one_to_use(tmp_path, tiny_llama_dir, cli):
    config = ddp_config(tmp_path, tiny_llama_dir, max_steps=2, save_every=2, eval_every=0)
    run_dir = tmp_path / "run"
    harness(tmp_path, config, run_dir, "two", two_ranks())  # ends with a checkpoint of step 2
    (run_dir / "adapter").rename(tmp_path / "adapter-of-2-steps")  # as if stopped there
    one = cli("train", config, "--run-dir", run_dir)
    assert one.returncode == 2
    assert "was written by 2 rank(s) and this training has 1: resume with 2" in one.stderr


def test_the_local_launcher_runs_cpu_ranks_and_a_stop_signal_checkpoints_every_rank(tmp_path, tiny_llama_dir):
    """`submit --launcher local` with train.cpu_ranks=2: torchrun on this machine, through the run's own job
    script; USR1 to hpclora (as a user's kill would send it) reaches both ranks."""
    config = ddp_config(tmp_path, tiny_llama_dir, max_steps=2000, eval_every=0, log_every=1, cpu_ranks=2)
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    env["HPCLORA_STATE_DIR"] = str(tmp_path / "state")
    proc = subprocess.Popen([sys.executable, "-m", "hpclora", "submit", str(config), "slurm.mem=4G", "--launcher", "local"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not list((tmp_path / "runs").glob("*/metrics.jsonl")) or not any(
            s >= 3 for s in logged_steps(next((tmp_path / "runs").iterdir()))):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, output[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "world 2 ranks (gloo)" in output and "checkpoint saved; not under Slurm, so nothing requeues; to resume: hpclora submit " in output and "Traceback" not in output
    (saved,) = (run_dir / "checkpoints").glob("checkpoint-*")
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in saved.iterdir()}
    # The machine's cores shared by the two ranks, as in a Slurm job (they once took all of them each).
    assert json.loads((run_dir / "env.json").read_text())["torch_threads"] == max(1, os.cpu_count() // 2)


@pytest.mark.parametrize("launcher, keys, message", [
    (["submitit", "--cluster", "local"], ["slurm.nodes=2"], "slurm.nodes: 2 nodes need a Slurm job, not submitit's local executor"),
    (["local"], ["slurm.nodes=2"], "slurm.nodes: 2 nodes need a Slurm job: use --launcher sbatch"),
])
def test_launchers_that_cannot_start_a_world_say_so_before_writing_anything(tmp_path, tiny_llama_dir, launcher, keys, message):
    config = ddp_config(tmp_path, tiny_llama_dir)
    done = subprocess.run([sys.executable, "-m", "hpclora", "submit", str(config), *keys, "--launcher", *launcher],
                          capture_output=True, text=True, env={**os.environ, "HPCLORA_STATE_DIR": str(tmp_path / "state")})
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not any((tmp_path / "runs").iterdir()) if (tmp_path / "runs").exists() else True


FSDP = ("train.distributed=fsdp", "train.save_every=2")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, tiny_llama_dir):
    """Two gloo ranks under FSDP for real (fully_shard over a CPU mesh, through accelerate's FSDP2 path), fp32,
    checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("fsdp")
    _, done = harness(tmp, ddp_config(tmp, tiny_llama_dir), tmp / "run", "out", two_ranks(), *FSDP)
    return tmp / "run", done.stdout


def test_fsdp_over_two_gloo_ranks_trains_the_adapter_of_one_rank_and_checkpoints_the_adapter_alone(fsdp_run, one_rank):
    import torch

    run_dir, stdout = fsdp_run
    one_rank, one_rank_val = one_rank
    assert "world 2 ranks (gloo), FSDP (train.distributed)" in stdout and "sharded over the ranks" in stdout
    assert max_difference(weights(run_dir / "adapter" / "adapter_model.safetensors"), one_rank) <= 1e-5
    # Evaluation under FSDP (every forward a collective; 7 rows over 2 ranks): the one-rank losses, the base's included.
    assert sorted(val_losses(run_dir)) == [0, 2, 4]
    assert all(abs(val_losses(run_dir)[s] - one_rank_val[s]) <= 1e-5 * one_rank_val[s] for s in one_rank_val)
    assert logged_steps(run_dir) == [1, 2, 3, 4] and stdout.count("eval final @ step 4") == 1  # the last weights once
    assert "eval adapter @ step 4" not in stdout
    # Each checkpoint holds the adapter and its optimizer state, never the frozen base weights.
    for saved in (run_dir / "checkpoints" / "checkpoint-2", run_dir / "checkpoints" / "checkpoint-4"):
        assert (saved / "COMPLETE").is_file()
        model_state = torch.load(saved / "pytorch_model_fsdp.bin", weights_only=True)
        assert model_state and all("lora_" in name for name in model_state)
        assert sum(t.numel() for t in model_state.values()) == 16_384  # the trainable parameters the log counts
        assert set(weights(saved / "adapter_model.safetensors")) == set(one_rank)


def test_a_stop_signal_to_one_rank_under_fsdp_checkpoints_the_shards_and_the_resume_is_exact(tmp_path, tiny_llama_dir, fsdp_run):
    reference, _ = fsdp_run
    config = ddp_config(tmp_path, tiny_llama_dir)
    run_dir = tmp_path / "run"
    out, done = harness(tmp_path, config, run_dir, "stopped", two_ranks(), *FSDP, stop_rank_at=(1, 2))
    assert [json.loads((out / f"result{r}.json").read_text()) for r in (0, 1)] == [{"finished": False, "steps": 2}] * 2
    assert "stopped by a stop signal to another rank at step 2/4" in done.stdout
    assert [p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")] == ["checkpoint-2"]
    harness(tmp_path, config, run_dir, "resumed", two_ranks(), *FSDP)
    assert max_difference(weights(run_dir / "adapter" / "adapter_model.safetensors"),
                          weights(reference / "adapter" / "adapter_model.safetensors")) == 0.0
    assert logged_steps(run_dir) == [1, 2, 3, 4] and val_losses(run_dir) == val_losses(reference)


def test_qlora_under_fsdp_shards_4bit_weights_stored_in_bf16_and_evaluates_as_one_rank(tmp_path, tiny_llama_dir):
    """bitsandbytes' 4-bit layers on CPU, their bf16 storage sharded by FSDP: the losses follow one rank's (bf16 rounding
    apart; the adapters themselves, a few Adam steps of tiny gradients, differ in bf16 by more than they move)."""
    config = ddp_config(tmp_path, tiny_llama_dir)
    qlora = ("quant.bits=4", "train.precision=bf16")
    harness(tmp_path, config, tmp_path / "one-run", "one", [sys.executable], *qlora, "train.grad_accum=2")
    _, done = harness(tmp_path, config, tmp_path / "fsdp-run", "fsdp", two_ranks(), *qlora, "train.distributed=fsdp")
    assert "FSDP (train.distributed)" in done.stdout
    one, sharded = val_losses(tmp_path / "one-run"), val_losses(tmp_path / "fsdp-run")
    assert sorted(one) == sorted(sharded) == [0, 2, 4]
    assert all(abs(sharded[s] - one[s]) <= 2e-4 * one[s] for s in one)
    assert sharded[4] < sharded[0]


def test_fsdp_settings_parse_into_accelerates_fsdp2_plugin_and_the_model_recomputes_its_own_activations(tiny_llama_dir, tmp_path):
    """The settings train.py passes reach accelerate's FSDP2 plugin as meant: full shard per decoder layer,
    checkpoints gathered whole (the adapter alone: HpcloraTrainer.save_model), and no activation checkpointing of
    FSDP's own (it would not save the random state that LoRA dropout draws from): the model's layers recompute, as
    without FSDP, and only the first train.checkpointed_layers of them."""
    from transformers import TrainingArguments

    from hpclora import config
    from hpclora.job.model import attach_lora, load_base
    from hpclora.job.trainer import fsdp_arguments

    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", **fsdp_arguments())
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert plugin["reshard_after_forward"] is True and plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert not plugin.get("activation_checkpointing")
    cfg = config.load(ddp_config(tmp_path, tiny_llama_dir), ["train.gradient_checkpointing=true", "train.checkpointed_layers=1"])
    model, _ = attach_lora(load_base(cfg, "bf16", "cpu", sharded=True), cfg)
    recomputing = [m.gradient_checkpointing for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    assert recomputing == [True, False]  # train.checkpointed_layers=1: the first layer only


def test_fsdp_in_fp16_is_refused_at_training_time_too(tmp_path, tiny_llama_dir):
    """A config that reaches `hpclora train` under torchrun with train.distributed=fsdp in fp16 (say, edited after
    validation) stops with the reason and the alternative, on every rank, before any training."""
    config = ddp_config(tmp_path, tiny_llama_dir)
    done = subprocess.run([*two_ranks(), "-m", "hpclora", "train", str(config), "--run-dir", str(tmp_path / "run"),
                           "train.distributed=fsdp", "train.precision=fp16"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0 and "FSDP trains in bf16 or fp32, not fp16" in done.stdout + done.stderr
    assert "train.distributed=ddp" in done.stdout + done.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()
