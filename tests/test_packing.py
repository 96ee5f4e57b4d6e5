"""Packing: rows hold whole examples within max_length, and packed logits equal unpacked ones."""

from __future__ import annotations

import random

import pytest
import torch

from hpclora.data.packing import Collator, length_grouped, pack
from hpclora.data.tokenize import IGNORE
from hpclora.errors import ConfigError
from hpclora.catalog.models import PACKING_SUPPORTED, packing_choice

from conftest import tiny_model


def examples(n, lo, hi, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        ids = [rng.randint(3, 999) for _ in range(length)]
        out.append((ids, [IGNORE] + ids[1:]))
    return out


def test_pack_keeps_every_example_whole_and_rows_within_max_length():
    data = examples(200, 5, 120)
    packed = pack(data, max_length=128)
    assert all(len(row) <= 128 for row in packed["input_ids"])
    # Each example appears exactly once, contiguous, with positions restarting at 0.
    found = []
    for ids, positions in zip(packed["input_ids"], packed["position_ids"]):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        found.extend(tuple(ids[a:b]) for a, b in zip(starts, starts[1:]))
    assert sorted(found) == sorted(tuple(ids) for ids, _ in data)
    # Best-fit packs densely: far fewer rows than examples.
    total = sum(len(ids) for ids, _ in data)
    assert len(packed["input_ids"]) <= total / 128 * 1.15 + 1


def test_collator_pads_packed_rows_as_a_separate_sequence():
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE, 6, 7, IGNORE, 9], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [5, 6], "labels": [IGNORE, 6], "position_ids": [0, 1]},
    ]
    batch = Collator(pad_token_id=0)(rows)
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 0, 0, 0]]
    assert batch["labels"].tolist()[1] == [IGNORE, 6, IGNORE, IGNORE, IGNORE]
    assert batch["position_ids"].tolist()[1] == [0, 1, 0, 1, 2]
    assert batch["num_tokens"].item() == 7


def packed_vs_unpacked_max_diff(model_type: str) -> float:
    model = tiny_model(model_type)
    model.config.use_cache = False
    a, b, c = [list(range(10, 10 + n)) for n in (7, 11, 5)]
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([x]), use_cache=False).logits[0] for x in (a, b, c)]
        # Two packed rows (keeping the batch dimension): [a | b] and [c | padding]
        batch = Collator(pad_token_id=0)([
            {"input_ids": a + b, "labels": a + b, "position_ids": list(range(7)) + list(range(11))},
            {"input_ids": c, "labels": c, "position_ids": list(range(5))},
        ])
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    pieces = [logits[0, :7], logits[0, 7:18], logits[1, :5]]
    return max((p - q).abs().max().item() for p, q in zip(pieces, alone))


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gpt_neox", "gpt2"])
def test_packed_logits_equal_unpacked_logits(model_type):
    assert model_type in PACKING_SUPPORTED
    assert packed_vs_unpacked_max_diff(model_type) < 1e-4


def test_bloom_is_refused_because_packed_examples_would_see_each_other():
    """Bloom (ALiBi) ignores position_ids, so packing would leak attention across examples."""
    assert "bloom" not in PACKING_SUPPORTED
    assert packed_vs_unpacked_max_diff("bloom") > 1e-3


def test_packing_auto_is_on_where_exact_and_off_with_a_reason_elsewhere():
    assert packing_choice("auto", "llama", 512)[0] is True
    off, why = packing_choice("auto", "bloom", 512)
    assert off is False and "bloom attention ignores the per-example positions" in why and "similar length" in why
    assert packing_choice("auto", "llama", 32) == (False, "not packed: rows of data.max_length=32 < 64 tokens; rows of similar length batched together")
    assert packing_choice(False, "llama", 512)[0] is False
    with pytest.raises(ConfigError, match="data.packing: not supported for bloom"):
        packing_choice(True, "bloom", 512)


def padded_tokens(batches, lengths):
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)


def test_length_grouped_batches_hold_every_row_once_and_far_less_padding_than_random_ones():
    rng = random.Random(0)
    lengths = [rng.randint(5, 1000) for _ in range(2000)]
    batches = length_grouped(lengths, 8, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(2000)) and all(1 <= len(b) <= 8 for b in batches)
    order = list(range(2000))
    random.Random(1).shuffle(order)
    at_random = [order[i:i + 8] for i in range(0, 2000, 8)]
    assert padded_tokens(batches, lengths) < 0.1 * padded_tokens(at_random, lengths)
    assert length_grouped(lengths, 8, seed=1) == batches and length_grouped(lengths, 8, seed=2) != batches


def test_an_item_that_is_a_batch_collates_as_its_rows():
    rows = [{"input_ids": ids, "labels": labels} for ids, labels in examples(5, 3, 20)]
    as_rows = Collator(pad_token_id=0)(rows)
    as_batch = Collator(pad_token_id=0)([{"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]}])
    assert as_rows.keys() == as_batch.keys() and all(torch.equal(as_rows[k], as_batch[k]) for k in as_rows)
