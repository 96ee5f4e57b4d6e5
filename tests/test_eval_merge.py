"""`hpclora eval` and `hpclora merge` on a real adapter of the real small model (SmolLM2-135M)."""

from __future__ import annotations

import json
import os

import pytest

from conftest import alpaca_rows, file_size_limit, write_jsonl


def logits_of(model, tokenizer, text: str):
    import torch

    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def test_merged_model_gives_the_adapter_logits(real_run, tmp_path, cli):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    done = cli("merge", str(real_run), "--out", str(out), "--dtype", "fp32")
    assert done.returncode == 0, done.stderr
    assert "loading the base in fp32" in done.stderr and f"writing {out} (" in done.stderr  # what a long merge is doing
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    note = json.loads((out / "MERGED_FROM.json").read_text())
    assert note["adapter"] == str((real_run / "adapter").resolve()) and len(note["adapter_sha256"]) == 64 and note["dtype"] == "fp32"

    base_dir = json.loads((real_run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "What is the capital of Japan? The answer is"
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    base_logits = logits_of(base, tokenizer, text)
    adapted = PeftModel.from_pretrained(base, str(real_run / "adapter")).eval()
    adapter_logits = logits_of(adapted, tokenizer, text)
    assert (adapter_logits - base_logits).abs().max() > 1e-2  # the adapter changes the model, so the check below means something
    assert (logits_of(merged, tokenizer, text) - adapter_logits).abs().max() < 1e-3


def test_merge_refuses_nan_and_never_overwrites(real_run, tmp_path, cli):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken-run"
    shutil.copytree(real_run, broken, ignore=shutil.ignore_patterns("checkpoints"))
    weights = broken / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    first = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, weights)
    out = tmp_path / "merged"
    done = cli("merge", str(broken), "--out", str(out))
    assert done.returncode == 2 and "NaN" in done.stderr and "nothing was written" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists() and not list(tmp_path.glob(".merged.partial-*"))

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    done = cli("merge", str(real_run), "--out", str(out))
    assert done.returncode == 2 and "already exists" in done.stderr and (out / "keep.txt").read_text() == "mine"


def test_a_merge_the_file_system_refuses_says_where_and_how_much_and_leaves_nothing(real_run, tmp_path, cli):
    out = tmp_path / "merged"
    with file_size_limit(1_000_000):  # a quota, or a full disk, that the 135M-parameter model does not fit
        done = cli("merge", str(real_run), "--out", str(out), "--dtype", "fp16")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"error: merged was not written (nothing was replaced): {tmp_path}: the file is larger than allowed here" in done.stderr
    assert "about 269." in done.stderr and "MB to write" in done.stderr  # 134.5M parameters x 2 bytes
    assert not out.exists() and not list(tmp_path.glob(".merged.partial-*"))


def test_eval_compares_base_and_adapter_on_the_validation_rows(real_run, cli):
    done = cli("eval", str(real_run), "--n", "2", "--max-new-tokens", "16")
    assert done.returncode == 0, done.stderr
    result = json.loads((real_run / "eval.json").read_text())
    summary = json.loads((real_run / "summary.json").read_text())
    # the same held-out rows as training's own evaluation (4 rows, one batch: the same token-weighted mean)
    assert result["examples"] == 4
    assert result["adapter"]["loss"] == pytest.approx(summary["final_val_loss"], abs=1e-3)
    assert result["base"]["loss"] == pytest.approx(summary["base_val_loss"], abs=1e-3)
    # The verdict rests on both findings, each said: a clear "better" needs the loss lower beyond noise and closer answers.
    loss, answers = result["loss_finding"], result["answers_finding"]
    assert loss["examples"] == 4 and answers["samples"] == 2
    assert result["adapter_is_better"] == (loss["direction"] == "lower" and answers["closer"] > answers["further"])
    assert f"verdict: {result['verdict']}" in done.stdout and "over 4 examples" in done.stdout
    assert ("**adapter is better**" in (real_run / "eval.md").read_text()) == result["adapter_is_better"]
    references = {row["output"] for row in alpaca_rows(24)}
    assert len(result["samples"]) == 2 and all(s["reference"] in references and s["base"] and s["adapter"] for s in result["samples"])
    markdown = (real_run / "eval.md").read_text()
    assert "| base model |" in markdown and "| reference | base model | with adapter |" in markdown
    said = done.stderr
    assert "loss on 4 held-out examples" in said and f"loss: with adapter {result['adapter']['loss']:.4f}" in said
    assert f"sample 2 of up to 2 (row {result['samples'][1]['row']}), with adapter: " in said and "\r" not in said


def test_the_verdict_says_what_the_loss_and_the_answers_each_show_and_never_overclaims():
    from hpclora.results.evaluate import answers_finding, loss_finding, overall

    base = [(2.0 * n, n) for n in (5, 7, 9, 4, 6, 8, 5, 7)]  # 8 held-out examples: (summed loss, tokens)
    mixed = [(b * f, n) for (b, n), f in zip(base, (0.6, 1.3, 0.7, 1.25, 0.8, 1.2, 0.9, 1.1))]  # mean change -0.04, spread wide
    noise = loss_finding(base, mixed)
    assert noise["direction"] == "noise" and noise["examples"] == 8 and noise["mean_change"] == pytest.approx(-0.0375)
    said, better = overall(noise, None)
    assert not better and said.startswith("no clear difference: the loss change is within noise") and "on 8 examples" in said
    lower = loss_finding(base, [(b * 0.5, n) for b, n in base])
    assert lower["direction"] == "lower" and lower["mean_change"] == pytest.approx(-1.0)
    assert overall(lower, None) == ("adapter is better", True)
    plain = [{"reference": "【答え】3776 m。【ポイント】日本一高い山です。", "base": "Mount Fuji is 3,776 m tall.", "adapter": "It is tall."}]
    answers = answers_finding(plain * 2)
    assert answers["closer"] == 0 and answers["further"] == 2
    said, better = overall(lower, answers)
    assert not better and "the loss favours the adapter, but its answers are no closer to the references" in said
    styled = [{**plain[0], "adapter": "【答え】3776 m です。【ポイント】日本一高い山。"}]
    assert overall(lower, answers_finding(styled))[1]
    assert overall(loss_finding(base, [(b * 1.5, n) for b, n in base]), None)[0].startswith("adapter is NOT better")
    assert overall(loss_finding(base[:1], mixed[:1]), None)[0].endswith("on a single example, which says nothing about noise; "
                                                                        "hold out more rows (data.val_size) or pass --data")


def test_eval_on_other_data_and_a_clear_error_for_a_bad_file(real_run, tmp_path, cli):
    data = write_jsonl(tmp_path / "held-out.jsonl", alpaca_rows(3))
    done = cli("eval", str(real_run), "--data", str(data), "--n", "1", "--max-new-tokens", "8")
    assert done.returncode == 0, done.stderr
    assert json.loads((real_run / "eval.json").read_text())["examples"] == 3

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "Hi"}, "not json"])
    done = cli("eval", str(real_run), "--data", str(bad))
    assert done.returncode == 2 and "bad.jsonl" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("packing", [False, True])
def test_eval_and_training_agree_on_validation_loss_over_several_batches(tmp_path, tiny_llama_dir, packing, cli):
    """One definition, token-weighted: answers of different lengths, 3 validation batches, packed or not."""
    from conftest import tiny_run_yaml

    rows = [{"instruction": f"Say {i}.", "input": "", "output": " ".join(["word"] * (1 + 5 * (i % 4)))} for i in range(24)]
    config = tiny_run_yaml(tmp_path, tiny_llama_dir, train={"max_steps": 2, "micro_batch_size": 2, "lr": 1e-2},
                           data={"val_size": 6, "packing": packing})
    write_jsonl(tmp_path / "data.jsonl", rows)
    trained = cli("train", str(config), "--run-dir", str(tmp_path / "run"))
    assert trained.returncode == 0, trained.stderr
    evaluated = cli("eval", str(tmp_path / "run"), "--n", "0")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert result["examples"] == 6 and summary["final_val_loss"] != summary["base_val_loss"]
    assert result["adapter"]["loss"] == pytest.approx(summary["final_val_loss"], abs=1e-5)
    assert result["base"]["loss"] == pytest.approx(summary["base_val_loss"], abs=1e-5)


def test_merge_without_out_writes_into_the_run_directory_and_its_files_are_as_readable_as_the_umask_allows(real_run, tmp_path, cli):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(real_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    done = cli("merge", str(run))
    assert done.returncode == 0, done.stderr
    assert (run / "merged" / "model.safetensors").is_file() and str(run / "merged") in done.stdout
    # Readable as the umask allows (safetensors itself writes 0600), for the merged model as for the adapter.
    mask = os.umask(0)
    os.umask(mask)
    for weights in (run / "merged" / "model.safetensors", real_run / "adapter" / "adapter_model.safetensors"):
        assert weights.stat().st_mode & 0o777 == 0o666 & ~mask
    again = cli("merge", str(run))
    assert again.returncode == 2 and "already exists and is not empty" in again.stderr


def cut_weights(adapter):
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


@pytest.mark.parametrize("damage, message", [
    (lambda a: (a / "adapter_model.safetensors").unlink(), "holds no weights"),
    (cut_weights, "cut short:"),
    (lambda a: (a / "adapter_model.safetensors").write_bytes(b"\x00garbage"), "not a safetensors file"),
    (lambda a: (a / "adapter_config.json").write_text("{not json"), "not a JSON adapter config"),
    (lambda a: (a / "adapter_config.json").write_text("[1]"), "not a PEFT adapter config"),
])
def test_a_damaged_adapter_is_named_before_any_model_loads(real_run, tmp_path, cli, damage, message):
    import shutil

    run = shutil.copytree(real_run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints", "merged"))
    damage(run / "adapter")
    for command in (["generate", run, "--prompt", "hi"], ["eval", run, "--n", "0"], ["merge", run]):
        done = cli(*command)
        assert done.returncode == 2 and message in done.stderr, (command, done.stderr)
    assert not (run / "merged").exists()
