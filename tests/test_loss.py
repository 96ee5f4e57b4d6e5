"""The loss from labelled positions only (loss.py) against the plain path, the model's own loss over the full
logits: the same number and the same LoRA gradients, packed and not, with gradient accumulation, for every
architecture in the table; and the evaluation's summed loss equal to the full-logits sum."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from hpclora.job import loss as hloss
from hpclora.data.packing import Collator
from hpclora.data.tokenize import IGNORE

from conftest import tiny_model

ARCHITECTURES = ["llama", "mistral", "qwen2", "gpt_neox", "gpt2", "bloom", "gemma3_text"]


def lora(model_type):
    from peft import LoraConfig, get_peft_model

    from hpclora.catalog.models import FAN_IN_FAN_OUT, target_modules_for

    model = tiny_model(model_type)
    model.config.use_cache = False
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target_modules_for(model_type),
                                                  fan_in_fan_out=model_type in FAN_IN_FAN_OUT, init_lora_weights=False))
    return peft_model.train()


def micro_batches(packed: bool, seed: int = 0) -> list[dict]:
    """Two micro-batches of rows with a prompt (unlabelled) and a response (labelled), of unequal lengths."""
    rng = random.Random(seed)

    def example():
        prompt, response = [rng.randint(3, 999) for _ in range(rng.randint(3, 9))], [rng.randint(3, 999) for _ in range(rng.randint(2, 8))]
        return prompt + response, [IGNORE] * len(prompt) + response

    batches = []
    for _ in range(2):
        if packed:
            rows = []
            for _ in range(2):
                (a, la), (b, lb) = example(), example()
                rows.append({"input_ids": a + b, "labels": la + lb, "position_ids": list(range(len(a))) + list(range(len(b)))})
        else:
            rows = [dict(zip(("input_ids", "labels"), example())) for _ in range(3)]
        batch = Collator(pad_token_id=0)(rows)
        batch.pop("num_tokens")
        batches.append(batch)
    return batches


def accumulated(model, batches, step) -> tuple[float, dict]:
    """Loss and LoRA gradients of one optimizer step over `batches`, normalised as the Trainer does with
    gradient accumulation: each micro-batch's summed loss over the labelled tokens of all of them."""
    model.zero_grad()
    torch.manual_seed(0)  # the same dropout masks (GPT-2 keeps dropout) for both paths
    items = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    total = 0.0
    for batch in batches:
        value = step(model, dict(batch), items)
        value.backward()
        total += value.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def plain(model, batch, items):
    return model(**batch, num_items_in_batch=items).loss


def labelled_only(model, batch, items):
    labels = batch.pop("labels")
    head = hloss.output_head(model)
    with hloss.HeadInputs(head) as seen:
        outputs = model(**batch)
    assert outputs.logits.shape[1] == 0  # the full logits were never computed
    total, _ = hloss.labelled_loss(seen.hidden, labels, head)
    return total / items


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_the_labelled_only_loss_and_gradients_equal_the_full_logits_path(model_type, packed, monkeypatch):
    if packed and model_type in ("bloom", "gemma3_text"):
        pytest.skip(f"{model_type} is never packed (catalog.models.PACKING_SUPPORTED)")
    monkeypatch.setattr(hloss, "CHUNK_ROWS", 7)  # several chunks, the last one partial
    model = lora(model_type)
    batches = micro_batches(packed)
    loss_a, grads_a = accumulated(model, batches, plain)
    loss_b, grads_b = accumulated(model, batches, labelled_only)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6), name
    assert max(g.abs().max().item() for g in grads_a.values()) > 0  # the gradients are not trivially zero


def test_the_evaluation_sum_equals_the_full_logits_sum():
    model = lora("llama").eval()
    (batch, _) = micro_batches(packed=False)
    total, count = hloss.summed_loss(model, batch)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    targets = batch["labels"][:, 1:]
    full = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE, reduction="sum")
    assert count == int((targets != IGNORE).sum()) and total == pytest.approx(full.item(), rel=1e-6)


def test_a_batch_without_any_response_token_gives_a_zero_loss_that_backpropagates():
    model = lora("llama")
    batch = Collator(pad_token_id=0)([{"input_ids": [5, 6, 7, 8], "labels": [IGNORE] * 4}])
    batch.pop("num_tokens")
    labels = batch.pop("labels")
    head = hloss.output_head(model)
    with hloss.HeadInputs(head) as seen:
        model(**batch)
    total, count = hloss.labelled_loss(seen.hidden, labels, head)
    total.backward()
    assert count == 0 and total.item() == 0.0


def test_fp16_gradients_of_the_labelled_loss_carry_the_loss_scale_instead_of_underflowing():
    """fp16 (V100, T4): GradScaler multiplies the loss by a large factor so that small gradients survive fp16; the
    chunked loss must compute its gradient with that factor, not before it. Against the same computation in fp32,
    on rows the head already predicts well (logit 18 for the target, 0 for the rest), whose gradients are all
    below fp16's smallest normal number."""
    head = torch.nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        head.weight.copy_(3 * torch.eye(8))
    head.weight.requires_grad_(False)
    targets = torch.arange(40) % 8
    hidden = 6.0 * torch.nn.functional.one_hot(targets, 8).float()
    scale = 2.0**16 / 40  # GradScaler's initial scale, over the tokens the Trainer divides by

    def gradient(dtype):
        rows = hidden.to(dtype).detach().requires_grad_()
        total = hloss._LabelledCrossEntropy.apply(rows, targets, copy.deepcopy(head).to(dtype))
        (total * scale).backward()
        return rows.grad.float() / scale

    reference, half = gradient(torch.float32), gradient(torch.float16)
    assert (reference.abs() < 6.1e-5).all() and reference.abs().sum() > 0
    assert ((half - reference).norm() / reference.norm()).item() < 1e-2
