"""End to end with the real SmolLM2-135M-Instruct on CPU: 8 training steps on the bundled data, in-process exactly
as a job runs them; then plain-PEFT reloading and `hpclora generate --compare`."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re

import pytest
import torch

from hpclora import config

from conftest import ROOT

pytestmark = pytest.mark.slow
PROMPT = "What is the largest planet in the solar system?"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, bundled_dir):
    from hpclora.job.train import train

    out = tmp_path_factory.mktemp("e2e")
    # 8 steps learn the house style at learning rates from 3e-3 to 6e-3 (2e-3 does not): 4e-3 is well inside.
    cfg = config.load(ROOT / "configs" / "demo-cpu.yaml", [
        "train.max_steps=8", "train.lr=4e-3", "train.micro_batch_size=2", "train.eval_every=0", "train.log_every=1",
        "data.val_size=8", f"data.cache_dir={out / 'cache'}", f"run.output_root={out}",
    ])
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        result = train(cfg, run_dir=str(out / "run"))
    result.log = log.getvalue()
    return result


def test_training_loss_falls_and_the_adapter_beats_the_base(trained):
    progress = [line for line in trained.log.splitlines() if line.startswith("step ")]
    assert len(progress) == 8
    metrics = [json.loads(line) for line in (trained.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert trained.summary["final_val_loss"] < trained.summary["base_val_loss"]
    assert "adapter is better" in trained.log


def test_adapter_reloaded_with_plain_peft_gives_the_in_memory_logits(trained, bundled_dir):
    """The saved adapter is ordinary PEFT: loaded without hpclora it reproduces the trained model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained.run_dir / "adapter")
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(bundled_dir, dtype=torch.float32), trained.run_dir / "adapter"
    ).eval()
    in_memory = trained.model.eval()
    batch = tok(["【Answer】 Jupiter is the largest planet.", "日本で一番高い山は富士山です。"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = reloaded(**batch).logits
        b = in_memory(**batch).logits
        with in_memory.disable_adapter():
            base = in_memory(**batch).logits
    assert (a - b).abs().max().item() < 1e-5
    assert (a - base).abs().max().item() > 1e-2  # the adapter really changes the model


def test_generate_compare_differs_from_base(trained, cli):
    done = cli("generate", trained.run_dir, "--compare", "--max-new-tokens", "24", "--prompt", PROMPT)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    header = next(line for line in lines if line.startswith("base model"))
    assert "| with adapter" in header
    rows = lines[lines.index(header) + 2:]
    base_text = " ".join(r.split(" | ")[0] for r in rows).split()
    adapter_text = " ".join(r.split(" | ")[1] for r in rows if " | " in r).split()
    assert base_text != adapter_text
    assert "【Answer】" in " ".join(adapter_text) and "【Answer】" not in " ".join(base_text)  # it learned the house style
    # What happened meanwhile, on stderr, as plain lines: the answers alone are on stdout.
    said = done.stderr.splitlines()
    assert said[0].startswith("loading ") and said[0].endswith(f"and the adapter {trained.run_dir / 'adapter'} ...")
    assert said[1].startswith("loaded on cpu in ") and "\r" not in done.stderr and "Loading weights" not in done.stderr
    assert [line.split(":")[0] for line in said[2:]] == ["prompt 1 of 1, base model ...", "prompt 1 of 1, base model",
                                                           "prompt 1 of 1, with adapter ...", "prompt 1 of 1, with adapter"]
    assert re.fullmatch(r"prompt 1 of 1, with adapter: \d+ tokens in [\d.]+ s \([\d.]+ tokens/s\)", said[-1])


def test_generate_on_a_run_without_adapter_is_a_user_error(tmp_path, cli):
    (tmp_path / "config.yaml").write_text("data:\n  path: x.jsonl\n")
    done = cli("generate", tmp_path, "--prompt", "hi")
    assert done.returncode == 2 and "no finished adapter" in done.stderr


@pytest.mark.parametrize("flags, named", [
    (["--temperature", "-1"], "--temperature must be 0 (greedy) or more, got -1.0"),
    (["--top-p", "0"], "--top-p must be above 0 and at most 1, got 0.0"),
    (["--top-p", "nan"], "--top-p must be above 0 and at most 1, got nan"),
    (["--top-k", "-5", "--repetition-penalty", "0"], "--top-k must be 0 (no limit) or more, got -5; --repetition-penalty"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be from 1 to 1,000,000, got 0"),
    (["--max-new-tokens", str(10**20)], "--max-new-tokens must be from 1 to 1,000,000, got 100000000000000000000"),
])
def test_bad_sampling_values_are_refused_before_anything_loads(tmp_path, flags, named, cli):
    """The run directory does not even exist: the flags are checked first."""
    done = cli("generate", tmp_path / "nope", "--prompt", "hi", *flags)
    assert done.returncode == 2 and named in done.stderr


def test_a_prompt_of_bytes_that_are_no_utf8_is_refused_before_anything_loads(tmp_path, cli):
    done = cli("generate", tmp_path / "nope", "--prompt", "hi", "--prompt", os.fsdecode(b"caf\xe9"))  # latin-1 bytes, as argv gets them
    assert done.returncode == 2 and "--prompt 2 is not UTF-8 text (byte 0xe9 at character 3)" in done.stderr


def test_a_prompt_longer_than_the_models_context_is_refused(trained, cli):
    done = cli("generate", trained.run_dir, "--prompt", "planet " * 9000)
    assert done.returncode == 2 and "and the model reads at most 8,192: shorten it" in done.stderr, done.stderr[-500:]


def test_temperature_zero_is_greedy():
    from hpclora.results.generate import Sampling

    assert Sampling.from_flags(16, False, 0.0) == Sampling(max_new_tokens=16, do_sample=False)
    assert Sampling.from_flags(16, False, 1.3).do_sample and Sampling.from_flags(16, False, 1.3).temperature == 1.3
    assert Sampling.from_flags(16, True, None).temperature == 0.7 and not Sampling.from_flags(16, False, None).do_sample


def test_train_with_a_bad_data_row_exits_2_naming_the_line(tmp_path, cli):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    done = cli("train", ROOT / "configs" / "demo-cpu.yaml", f"data.path={data}", f"run.output_root={tmp_path}")
    assert done.returncode == 2 and f"error: {data}:2: missing field 'output'" in done.stderr
