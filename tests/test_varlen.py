"""Variable-length attention on packed rows (varlen.py): sdpa once per packed example gives the same loss and
LoRA gradients as sdpa over the whole row with the block mask, for every architecture that is packed, with
gradient accumulation; and the collator's example bounds are the ones FlashAttention 2 would derive."""

from __future__ import annotations

import pytest
import torch

from hpclora.job import varlen
from hpclora.data.packing import Collator, varlen_bounds
from hpclora.catalog.models import PACKING_SUPPORTED

from test_loss import accumulated, labelled_only, lora, micro_batches

PACKED_ARCHITECTURES = ["llama", "mistral", "qwen2", "gpt_neox", "gpt2"]


def test_every_packed_architecture_is_covered():
    assert set(PACKED_ARCHITECTURES) == set(PACKING_SUPPORTED)


def with_bounds(batches):
    """The collator's varlen keywords added to test_loss's packed micro-batches."""
    out = []
    for batch in batches:
        bounds, longest = varlen_bounds(batch["position_ids"].tolist())
        out.append({**batch, "cu_seq_lens_q": torch.tensor(bounds, dtype=torch.int32), "cu_seq_lens_k": torch.tensor(bounds, dtype=torch.int32),
                    "max_length_q": longest, "max_length_k": longest})
    return out


@pytest.mark.parametrize("model_type", PACKED_ARCHITECTURES)
def test_sdpa_per_packed_example_equals_the_block_mask(model_type):
    from transformers import AttentionInterface

    varlen.register()
    examples_seen = []

    def counting(module, query, *args, **kwargs):  # the registered function, counting the calls that split rows
        if kwargs.get("cu_seq_lens_q") is not None:
            examples_seen.append(len(kwargs["cu_seq_lens_q"]) - 1)
        return varlen.sdpa_varlen_attention(module, query, *args, **kwargs)

    model = lora(model_type).eval()  # eval: no dropout (GPT-2's would draw differently per example); gradients still flow
    batches = with_bounds(micro_batches(packed=True))
    loss_mask, grads_mask = accumulated(model, batches, labelled_only)
    assert not examples_seen  # sdpa with the block mask ignores the bounds
    AttentionInterface.register(varlen.NAME, counting)
    try:
        model.set_attn_implementation(varlen.NAME)
        loss_varlen, grads_varlen = accumulated(model, batches, labelled_only)
    finally:
        varlen.register()
    layers = model.config.num_hidden_layers
    # Every layer split every micro-batch: 2 rows of 2 examples, plus each row's padding.
    assert len(examples_seen) == 2 * layers and min(examples_seen) >= 4
    assert loss_varlen == pytest.approx(loss_mask, rel=1e-5)
    for name in grads_mask:
        assert torch.allclose(grads_varlen[name], grads_mask[name], rtol=1e-4, atol=1e-6), name
    assert max(g.abs().max().item() for g in grads_mask.values()) > 0


def test_without_bounds_it_is_sdpa_with_its_mask():
    """Unpacked rows (and generation) carry no bounds: the same logits as plain sdpa, padding masked."""
    varlen.register()
    model = lora("llama").eval()
    batch = micro_batches(packed=False)[0]
    batch.pop("labels")
    with torch.no_grad():
        expected = model(**batch).logits
        model.set_attn_implementation(varlen.NAME)
        got = model(**batch).logits
    assert torch.allclose(got, expected, atol=1e-5)


def test_the_collators_bounds_are_the_ones_flash_attention_derives():
    """FlashAttention 2 cannot run here; what it is given can be checked: transformers derives the same bounds
    from the flattened position_ids (which it does by itself only for a batch of one row)."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    rows = [{"input_ids": [5] * 7, "labels": [5] * 7, "position_ids": [0, 1, 2, 0, 1, 2, 3]},
            {"input_ids": [5] * 4, "labels": [5] * 4, "position_ids": [0, 1, 0, 1]}]
    batch = Collator(pad_token_id=0, pad_to_multiple_of=8, varlen=True)(rows)
    (cu_q, cu_k), (max_q, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert batch["cu_seq_lens_q"].tolist() == cu_q.tolist() == [0, 3, 7, 8, 10, 12, 16]
    assert batch["max_length_q"] == int(max_q) == 4
    assert "cu_seq_lens_q" not in Collator(pad_token_id=0)(rows)  # kernels that do not read them get none
