"""fp16, the V100/T4 path, for real on this CPU (train.precision=fp16): fp16 base weights under autocast, fp32 LoRA
weights, loss scaling. Plain LoRA and QLoRA with fp16 compute, with and without trained biases: the loss falls,
no step after the first few is skipped for inf/NaN, the gradients are fp32's within fp16's precision."""

from __future__ import annotations

import json

import pytest

from hpclora import config

from conftest import StopAt, alpaca_rows, tiny_model, write_jsonl


def train_tiny(tmp_path, model_dir, name, *overrides, stop_at=None):
    from hpclora.job.train import train

    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(24))
    cfg = config.load(None, [
        f"model.name={model_dir}", f"data.path={data}", f"data.cache_dir={tmp_path / 'cache'}",
        f"run.output_root={tmp_path / 'runs'}", "data.val_size=4", "data.template=none", "train.micro_batch_size=4",
        "train.log_every=1", "train.save_every=0", "train.eval_every=0", "train.lr=5e-3", "lora.dropout=0",
        *overrides,
    ])
    with StopAt(stop_at if stop_at else 10**9) as stop:
        run = train(cfg, run_dir=str(tmp_path / name), stop=stop)
    metrics = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    return run, [m for m in metrics if "loss" in m]


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory, tokenizer):
    """A tiny GPT-NeoX (OpenCALM's architecture, with biases) with the real SmolLM2 tokenizer."""
    out = tmp_path_factory.mktemp("tiny-neox")
    tiny_model("gpt_neox", vocab_size=len(tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_fp16_trains_with_loss_scaling_and_its_gradients_are_fp32s(tmp_path, neox_dir, quantized):
    quant = ["quant.bits=4", "quant.compute_dtype=fp16"] if quantized else []
    bias = [] if quantized else ["lora.bias=all"]  # trained biases beside fp16 weights (QLoRA's are refused in fp16)
    half, steps = train_tiny(tmp_path, neox_dir, "fp16", "train.precision=fp16", "train.max_steps=10", *quant, *bias)
    full, full_steps = train_tiny(tmp_path, neox_dir, "fp32", "train.precision=fp32", "train.max_steps=1",
                                  *(["quant.bits=4", "quant.compute_dtype=fp32"] if quantized else []), *bias)
    env = json.loads((half.run_dir / "env.json").read_text())
    assert env["precision"] == "fp16" and half.finished
    losses = [m["loss"] for m in steps]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert all(m["grad_norm"] is not None and m["grad_norm"] < float("inf") for m in steps[3:])  # no step skipped
    # The same parameters and rows at the first step: fp16 weights and activations give fp32's loss within fp16's
    # precision (its gradient: test_fp16_gradients_are_fp32s_within_fp16s_precision).
    assert steps[0]["loss"] == pytest.approx(full_steps[0]["loss"], rel=1e-2)


def test_fp16_gradients_are_fp32s_within_fp16s_precision(neox_dir, tokenizer):
    """One batch through hpclora's training loss (the labelled positions' head, loss.py) with LoRA and trained biases:
    fp16 weights under CPU autocast with a loss scale, unscaled, against fp32 weights."""
    import torch

    from hpclora.data.packing import Collator
    from hpclora.job.loss import LabelledHead, output_head
    from hpclora.job.model import attach_lora

    cfg = config.load(None, [f"model.name={neox_dir}", "data.path=x.jsonl", "lora.bias=all", "lora.dropout=0"], check_files=False)
    rows = [tokenizer(text)["input_ids"] for text in ("Tokyo is the capital of Japan.", "日本で一番高い山は富士山です。")]
    batch = Collator(tokenizer.pad_token_id or 0)([{"input_ids": ids, "labels": ids} for ids in rows])
    batch.pop("num_tokens")
    labels = batch.pop("labels")

    def gradients(dtype, scale):
        torch.manual_seed(0)
        model, _ = attach_lora(tiny_model("gpt_neox", vocab_size=len(tokenizer)).to(dtype), cfg)
        model.train()
        head = LabelledHead(output_head(model))
        with torch.autocast("cpu", dtype=torch.float16, enabled=dtype == torch.float16):
            outputs = model(**batch)
            loss = head.loss(outputs, labels)
        (loss * scale).backward()
        return {n: p.grad.float() / scale for n, p in model.named_parameters() if p.requires_grad}

    full, half = gradients(torch.float32, 1.0), gradients(torch.float16, 2.0**10)
    assert full.keys() == half.keys() and any(".bias" in n for n in full)
    for name in full:  # (LoRA's A matrices get no gradient at the first step: B starts at zero)
        difference = (half[name] - full[name]).norm()
        assert difference == 0 if full[name].norm() == 0 else (difference / full[name].norm()).item() < 3e-2, name


def test_an_fp16_run_resumes_exactly_with_its_loss_scale(tmp_path, neox_dir):
    """Stopped at step 4 and run again, an fp16 run ends with the adapter of an uninterrupted one, bit for bit, and
    its checkpoint holds the loss scaler's state, which the resumed run goes on from."""
    import torch
    from safetensors.torch import load_file

    settings = ["train.precision=fp16", "train.max_steps=8", "train.save_every=4"]
    whole, _ = train_tiny(tmp_path, neox_dir, "whole", *settings)
    stopped, _ = train_tiny(tmp_path, neox_dir, "resumed", *settings, stop_at=4)
    scaler = torch.load(stopped.run_dir / "checkpoints" / "checkpoint-4" / "scaler.pt")
    assert not stopped.finished and scaler["scale"] > 0 and "_growth_tracker" in scaler
    resumed, _ = train_tiny(tmp_path, neox_dir, "resumed", *settings)
    a, b = (load_file(r.run_dir / "adapter" / "adapter_model.safetensors") for r in (whole, resumed))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
