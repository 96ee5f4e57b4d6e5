"""Packing several examples into rows, and the collator that turns rows into padded batches.

A packed row holds whole examples back to back, at most `max_length` tokens, with `position_ids`
restarting at 0 for each example. With no attention mask and no KV cache, transformers builds a mask
that keeps each example attending only to itself, so packed logits equal unpacked ones; variable-length
kernels (FlashAttention 2, sdpa_varlen in varlen.py) skip the mask and attend within each example.
"""

from __future__ import annotations

import bisect
import random

from .tokenize import IGNORE


def pack(examples: list[tuple[list[int], list[int]]], max_length: int) -> dict[str, list]:
    """The examples (input ids, labels) packed into rows (pack_rows)."""
    packed = {"input_ids": [], "labels": [], "position_ids": []}
    for members in pack_rows([len(ids) for ids, _ in examples], max_length):
        ids, labels, positions = [], [], []
        for i in members:
            ids.extend(examples[i][0])
            labels.extend(examples[i][1])
            positions.extend(range(len(examples[i][0])))
        packed["input_ids"].append(ids)
        packed["labels"].append(labels)
        packed["position_ids"].append(positions)
    return packed


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Which examples (by their `lengths`) share each row, in data order within a row: best-fit decreasing, the
    longest examples first, each into the fullest row it still fits. The planner counts rows with it too."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []  # example indices per row
    free: list[tuple[int, int]] = []  # (space left, row index), kept sorted
    for i in order:
        size = lengths[i]
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            space, row = free.pop(at)
            rows[row].append(i)
            bisect.insort(free, (space - size, row))
        else:
            rows.append([i])
            bisect.insort(free, (max_length - size, len(rows) - 1))
    return [sorted(members) for members in rows]  # keep the data order inside a row


MEGABATCH = 50  # batches whose rows are drawn together at random, then sorted by length


def length_grouped(lengths: list[int], rows_per_batch: int, seed: int) -> list[list[int]]:
    """Row indices in batches of similar lengths, made once (as fairseq's batch_by_size does): rows are shuffled
    with `seed`, cut into groups of MEGABATCH batches, each group sorted by length and cut into batches. A
    batch's rows stay random but alike in length; the batches themselves are shuffled every epoch."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    group = MEGABATCH * rows_per_batch
    batches = []
    for start in range(0, len(order), group):
        members = sorted(order[start:start + group], key=lambda i: lengths[i])
        batches.extend(members[b:b + rows_per_batch] for b in range(0, len(members), rows_per_batch))
    return batches


class Collator:
    """Right-pads a list of rows into tensors.

    Unpacked rows get an attention mask. Packed rows get `position_ids` and no mask; their padding is
    given positions of its own, starting at 0, so it forms a separate (ignored) sequence. With `varlen`,
    packed batches also carry their examples' bounds for variable-length attention (FlashAttention 2,
    sdpa_varlen), under the keywords transformers passes to the attention kernel. An item that is a whole
    micro-batch (data.batched_by_length) gives its rows.
    `num_tokens` counts real tokens for throughput; the trainer removes it before the forward pass.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1, varlen: bool = False):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of
        self.varlen = varlen

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        if rows and rows[0]["input_ids"] and isinstance(rows[0]["input_ids"][0], list):  # items that are batches
            rows = [{"input_ids": ids, "labels": labels} for r in rows for ids, labels in zip(r["input_ids"], r["labels"])]
        longest = max(len(r["input_ids"]) for r in rows)
        width = -(-longest // self.multiple) * self.multiple
        packed = "position_ids" in rows[0]
        batch = {"input_ids": [], "labels": []}
        if packed:
            batch["position_ids"] = []
        else:
            batch["attention_mask"] = []
        for r in rows:
            pad = width - len(r["input_ids"])
            batch["input_ids"].append(list(r["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(r["labels"]) + [IGNORE] * pad)
            if packed:
                batch["position_ids"].append(list(r["position_ids"]) + list(range(pad)))
            else:
                batch["attention_mask"].append([1] * len(r["input_ids"]) + [0] * pad)
        tensors = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        if packed and self.varlen:
            bounds, longest = varlen_bounds(batch["position_ids"])
            tensors["cu_seq_lens_q"] = tensors["cu_seq_lens_k"] = torch.tensor(bounds, dtype=torch.int32)
            tensors["max_length_q"] = tensors["max_length_k"] = longest
        tensors["num_tokens"] = torch.tensor(sum(len(r["input_ids"]) for r in rows))
        return tensors


def varlen_bounds(position_ids: list[list[int]]) -> tuple[list[int], int]:
    """(cumulative example bounds over the flattened batch, longest example) of packed rows whose positions
    restart at 0 for each example (the row's padding being an example of its own)."""
    bounds, longest, offset = [], 0, 0
    for positions in position_ids:
        starts = [i for i, p in enumerate(positions) if p == 0]
        ends = starts[1:] + [len(positions)]
        bounds.extend(offset + s for s in starts)
        longest = max([longest, *(e - s for s, e in zip(starts, ends))])
        offset += len(positions)
    return bounds + [offset], longest
