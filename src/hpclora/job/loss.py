"""The one definition of validation loss: next-token cross-entropy summed over every labelled (response)
token and divided by their count over the whole held-out set, so that a long answer weighs by its
tokens and neither the batch size nor packing changes the number. Training's periodic evaluation, its
base and final evaluation, and `hpclora eval` all use it.
"""

from __future__ import annotations

from ..catalog.models import CHUNK_ROWS, HEAD_ONLY_LOGITS
from ..data.tokenize import IGNORE


def summed_loss(model, batch: dict) -> tuple[float, int]:
    """(sum of the cross-entropy over labelled tokens, their count) for one collated batch already on the
    model's device; `num_tokens`, the collator's throughput count, is not an input of the model."""
    import torch

    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_tokens")}
    with torch.no_grad():
        head = output_head(model)
        if head is None:
            logits = model(**inputs).logits
            targets = batch["labels"][:, 1:]
            total = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="sum"
            )
            return total.item(), int((targets != IGNORE).sum())
        with HeadInputs(head) as seen:
            model(**inputs)
        total, count = labelled_loss(seen.hidden, batch["labels"], head)
    return float(total), count


def output_head(model):
    """The output head of a (PEFT-wrapped) causal LM whose logits are the head's output and nothing more, or
    None for other architectures (their loss goes through the full logits)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "model_type", None) not in HEAD_ONLY_LOGITS:
        return None
    return base.get_output_embeddings()




class _LabelledCrossEntropy:
    """Summed next-token cross-entropy of `hidden` rows (labelled positions only) through a frozen `head`, in
    chunks, so that neither the logits nor their softmax outlive a chunk (the fused linear cross-entropy of the
    Liger kernels, in plain PyTorch). In bf16 and fp32 the gradient with respect to `hidden` is computed chunk by
    chunk in the forward pass. In fp16 it waits for the backward pass, where it is computed with the gradient that
    arrives, which holds fp16 loss scaling's factor: computed unscaled, as in the forward pass, the small
    gradients would underflow to zero in fp16 before the scale reached them. Made on first use so that importing
    this module does not import torch."""

    function = None

    @classmethod
    def apply(cls, hidden, targets, head):
        if cls.function is None:
            import torch

            def chunks(hidden, targets, head, scale=None):
                """(summed loss, gradient with respect to hidden of the loss times `scale`, or None), chunk by chunk."""
                total = torch.zeros((), dtype=torch.float32, device=hidden.device)
                grads = torch.empty_like(hidden) if scale is not None else None
                with torch.enable_grad():
                    for start in range(0, hidden.shape[0], CHUNK_ROWS):
                        piece = hidden[start:start + CHUNK_ROWS].detach().requires_grad_(scale is not None)
                        # The head's own weights, not its module: its forward hooks (LabelledHead's) are for the model's pass.
                        logits = torch.nn.functional.linear(piece, head.weight, head.bias).float()
                        loss = torch.nn.functional.cross_entropy(logits, targets[start:start + CHUNK_ROWS], reduction="sum")
                        if scale is not None:
                            (grads[start:start + CHUNK_ROWS],) = torch.autograd.grad(loss * scale, piece)
                        total += loss.detach()
                return total, grads

            class Function(torch.autograd.Function):
                @staticmethod
                def forward(ctx, hidden, targets, head):
                    ctx.deferred = ctx.needs_input_grad[0] and hidden.dtype == torch.float16
                    ctx.head = head
                    if ctx.deferred:
                        ctx.save_for_backward(hidden, targets)
                        return chunks(hidden, targets, head)[0]
                    total, grads = chunks(hidden, targets, head, 1.0 if ctx.needs_input_grad[0] else None)
                    ctx.save_for_backward(grads)
                    return total

                @staticmethod
                def backward(ctx, grad_total):
                    if ctx.deferred:
                        hidden, targets = ctx.saved_tensors
                        return chunks(hidden, targets, ctx.head, grad_total)[1], None, None
                    (grads,) = ctx.saved_tensors
                    return grads * grad_total.to(grads.dtype), None, None

            cls.function = Function
        return cls.function.apply(hidden, targets, head)


def labelled_loss(hidden, labels, head):
    """(summed cross-entropy over labelled next tokens, their count) from the last hidden states of a batch
    (rows x positions x hidden) and the labels the collator made; equal to the cross-entropy of the full
    logits, without them."""
    import torch

    targets = labels[:, 1:]
    keep = targets != IGNORE
    rows = hidden[:, :-1][keep]
    if rows.shape[0] == 0:
        return hidden.sum() * 0.0, 0  # no response token in this batch: a zero that keeps the graph
    if head.weight.requires_grad:  # a trained head (not LoRA's case): autograd through plain chunks
        total = sum(torch.nn.functional.cross_entropy(head(rows[s:s + CHUNK_ROWS]).float(), targets[keep][s:s + CHUNK_ROWS], reduction="sum")
                    for s in range(0, rows.shape[0], CHUNK_ROWS))
        return total, int(keep.sum())
    return _LabelledCrossEntropy.apply(rows, targets[keep], head), int(keep.sum())


class HeadInputs:
    """While active, the model's output head is run on no position at all and its input, the last hidden
    states, is kept in `.hidden`: the loss then needs the head only where a label is (labelled_loss). A
    forward pre-hook, the public way to see and change a module's input; the model is called as it is (with
    its DDP wrapper), so gradients flow and synchronise as usual."""

    def __init__(self, head):
        self.head, self.hidden, self.handle = head, None, None

    def _keep(self, module, args):
        (hidden,) = args
        self.hidden = hidden
        return (hidden[:, :0],)

    def __enter__(self):
        self.handle = self.head.register_forward_pre_hook(self._keep)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


class LabelledHead:
    """Training's loss from the labelled positions only. A forward pre-hook on the output head (the public way to
    see and change a module's input): while the model trains, the head runs on no position at all and its input,
    the last hidden states, is kept; `loss`, the Trainer's `compute_loss_func`, then computes the cross-entropy of
    the labelled positions from them (labelled_loss, which calls the head itself), over the accumulated batch's
    labelled tokens as the Trainer counts them. In eval mode (evaluation, generation) the head runs as it is."""

    def __init__(self, head):
        self.head, self.hidden, self.computing = head, None, False
        head.register_forward_pre_hook(self._keep)

    def _keep(self, module, args):
        if not module.training or self.computing:
            return None
        (hidden,) = args
        self.hidden = hidden
        return (hidden[:, :0],)

    def loss(self, outputs, labels, num_items_in_batch=None):
        hidden, self.hidden, self.computing = self.hidden, None, True
        try:
            total, count = labelled_loss(hidden, labels, self.head)
        finally:
            self.computing = False
        return total / (num_items_in_batch if num_items_in_batch is not None else max(count, 1))
