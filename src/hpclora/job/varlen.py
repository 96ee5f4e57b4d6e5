"""Variable-length attention for packed rows where FlashAttention cannot run (CPU, V100, T4).

With PyTorch's sdpa and a block mask, a packed row of 1,024 tokens costs the whole row's square, the
masked-out blocks between examples and the upper triangle included: no sdpa kernel skips blocks of an
explicit mask. `sdpa_varlen` runs sdpa once per packed example instead, causal, without a mask, so a row
costs the sum of its examples' causal triangles, as FlashAttention's variable-length kernel does. The
examples' bounds come from the collator (`cu_seq_lens_q`, the same keyword FlashAttention reads). Without
them (unpacked rows, generation with a KV cache) it is plain sdpa with its usual mask.

It is registered with transformers' public AttentionInterface (and sdpa's mask with AttentionMaskInterface)
under the name below, and chosen by `model.attn_implementation: auto` for packed runs (kernels.py).
"""

from __future__ import annotations

NAME = "sdpa_varlen"


def sdpa_varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention signature: query/key/value (batch, heads, width, head_dim); returns the output
    (batch, width, heads, head_dim) and no weights."""
    import torch

    from ..internals import sdpa_attention

    sdpa_attention_forward = sdpa_attention()

    bounds = kwargs.pop("cu_seq_lens_q", None)
    window = kwargs.get("sliding_window")
    batch, _, width, _ = query.shape
    if bounds is None or width == 1 or (window is not None and window < width):
        # A sliding window shorter than the row would need a mask inside an example: keep sdpa's own.
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    bounds = bounds.tolist()
    pieces = []
    for start, end in zip(bounds, bounds[1:]):
        # Bounds count tokens over the flattened batch; an example never crosses a row (each row starts at 0).
        row, first = divmod(start, width)
        last = end - row * width
        out, _ = sdpa_attention_forward(
            module, query[row:row + 1, :, first:last], key[row:row + 1, :, first:last], value[row:row + 1, :, first:last],
            None, dropout=dropout, scaling=scaling, is_causal=True, **kwargs,
        )
        pieces.append(out)
    return torch.cat(pieces, dim=1).view(batch, width, *pieces[0].shape[2:]), None


def register() -> None:
    """Make `attn_implementation="sdpa_varlen"` loadable; idempotent."""
    from transformers import AttentionInterface, AttentionMaskInterface

    from ..internals import sdpa_mask_function

    AttentionInterface.register(NAME, sdpa_varlen_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask_function())

