"""End to end with the real SmolLM2-135M-Instruct on CPU: the `hpclora train` command as a job runs it,
then reloading the adapter with plain PEFT, then `hpclora generate --compare`."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.slow

LINE = re.compile(r"^step (\d+)/(\d+) \| loss [\d.]+ \| lr [\d.e+-]+ \| [\d,]+ tok/s \| mem [\d.]+ GB \| eta \d\d:\d\d:\d\d$")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, bundled_dir):
    out = tmp_path_factory.mktemp("e2e") / "run"
    cmd = [
        sys.executable, "-m", "hpclora", "train", str(ROOT / "configs" / "demo-cpu.yaml"),
        "train.max_steps=20", "train.micro_batch_size=4", "train.eval_every=0", "train.log_every=2",
        "data.val_size=8", f"data.cache_dir={out.parent / 'cache'}", f"run.output_root={out.parent}",
        "--run-dir", str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (out.parent / "stdout.txt").write_text(proc.stdout)
    return out


def test_log_has_plain_progress_lines_and_loss_falls(run_dir):
    stdout = (run_dir.parent / "stdout.txt").read_text()
    assert "\r" not in stdout  # nothing but plain lines in a batch log
    progress = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert len(progress) == 10 and all(LINE.match(line) for line in progress), progress
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # training loss falls
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_val_loss"] < summary["base_val_loss"]
    assert "val_loss base" in stdout and "adapter is better" in stdout


def test_adapter_reloads_with_plain_peft_and_gives_the_same_logits(run_dir, bundled_dir):
    """The saved adapter is ordinary PEFT: loaded without hpclora it matches the model hpclora loads."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpclora.generate import load_run

    tok = AutoTokenizer.from_pretrained(run_dir / "adapter")
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bundled_dir, dtype=torch.float32), run_dir / "adapter").eval()
    ours, _, _ = load_run(run_dir)
    batch = tok(["【Answer】 Jupiter is the largest planet."], return_tensors="pt")
    with torch.no_grad():
        a = plain(**batch).logits
        b = ours(**batch).logits
        with ours.disable_adapter():
            base = ours(**batch).logits
    assert (a - b).abs().max().item() < 1e-5
    assert (a - base).abs().max().item() > 1e-2  # and the adapter really changes the model


def test_generate_compare_differs_from_base(run_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "hpclora", "generate", str(run_dir), "--compare", "--max-new-tokens", "24",
         "--prompt", "What is the largest planet in the solar system?"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("base model"))
    assert "| with adapter" in header
    from hpclora.generate import Sampling, generate

    row = generate(run_dir, ["What is the largest planet in the solar system?"], Sampling(max_new_tokens=24), mode="compare")[0]
    assert row["base"] != row["adapter"]
    assert "【Answer】" in row["adapter"] and "【Answer】" not in row["base"]  # it learned the house style


def test_generate_on_a_run_without_adapter_is_a_user_error(tmp_path):
    (tmp_path / "config.yaml").write_text("data:\n  path: x.jsonl\n")
    proc = subprocess.run([sys.executable, "-m", "hpclora", "generate", str(tmp_path), "--prompt", "hi"], capture_output=True, text=True)
    assert proc.returncode == 2 and "no finished adapter" in proc.stderr and "Traceback" not in proc.stderr


def test_train_with_a_bad_data_row_exits_2_naming_the_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "hpclora", "train", str(ROOT / "configs" / "demo-cpu.yaml"), f"data.path={data}",
         f"run.output_root={tmp_path}"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: {data}:2: missing field 'output'" in proc.stderr
