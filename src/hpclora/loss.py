"""The one definition of validation loss: next-token cross-entropy summed over every labelled (response)
token and divided by their count over the whole held-out set, so that a long answer weighs by its
tokens and neither the batch size nor packing changes the number. Training's periodic evaluation, its
base and final evaluation, and `hpclora eval` all use it.
"""

from __future__ import annotations

IGNORE = -100


def summed_loss(model, batch: dict) -> tuple[float, int]:
    """(sum of the cross-entropy over labelled tokens, their count) for one collated batch already on the
    model's device; `num_tokens`, the collator's throughput count, is not an input of the model."""
    import torch

    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_tokens")}
    with torch.no_grad():
        logits = model(**inputs).logits
        targets = batch["labels"][:, 1:]
        total = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="sum"
        )
    return total.item(), int((targets != IGNORE).sum())
