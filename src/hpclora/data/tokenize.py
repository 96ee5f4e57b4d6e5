"""Template pieces -> token ids and labels, with loss masking, via a batched and cached `datasets.map`.

Consecutive pieces with the same "trains" flag are joined and tokenized as one string, so the prompt a
model sees in training is tokenized exactly as `hpclora generate` tokenizes it. Labels are -100 on
tokens that do not train and always on an example's first token (it is never predicted; this also keeps
packed examples from learning to predict across their boundary).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .templates import EOS, render

IGNORE = -100
# This file turns rendered pieces into tokens: its own text is part of every cache key, so that a change
# to it is never answered with tokens it made before.
CODE_FINGERPRINT = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def leading_special_ids(tokenizer) -> list[int]:
    """Tokens the tokenizer puts before any text on its own (a BOS for Llama, nothing for GPT-NeoX)."""
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start:start + len(without)] == without:
            return with_special[:start]
    return []


def runs_of(pieces) -> list[tuple[str, bool]]:
    """Join consecutive text pieces with the same flag; EOS markers stay on their own."""
    runs: list[tuple[str, bool]] = []
    for text, trains in pieces:
        if runs and text != EOS and runs[-1][0] != EOS and runs[-1][1] == trains:
            runs[-1] = (runs[-1][0] + text, trains)
        elif text:
            runs.append((text, trains))
    return runs


def encode(pieces, tokenizer, template: str, train_on_prompt: bool = False):
    """(input_ids, labels) for one rendered conversation."""
    return encode_many([pieces], tokenizer, template, train_on_prompt)[0]


def encode_many(all_pieces, tokenizer, template: str, train_on_prompt: bool):
    runs = [runs_of(p) for p in all_pieces]
    texts = [text for conv in runs for text, _ in conv if text != EOS]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    # The chat template writes its own BOS text; the other templates get the tokenizer's usual prefix.
    prefix = [] if template == "chat" else leading_special_ids(tokenizer)
    out = []
    for conv in runs:
        ids, labels = list(prefix), [IGNORE] * len(prefix)
        for text, trains in conv:
            piece = [tokenizer.eos_token_id] if text == EOS else next(encoded)
            ids.extend(piece)
            labels.extend(piece if (trains or train_on_prompt) else [IGNORE] * len(piece))
        if labels:
            labels[0] = IGNORE
        out.append((ids, labels))
    return out


def trained_example(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int], bool] | None:
    """An encoded example as training takes it: cut to max_length (and whether it was cut), or None where no token
    that trains is left."""
    cut_ids, cut_labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE for label in cut_labels):
        return None
    return cut_ids, cut_labels, len(ids) > max_length


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((tokenizer.eos_token_id, tokenizer.bos_token_id, getattr(tokenizer, "chat_template", None))).encode())
    return h.hexdigest()


def cache_key(rendered: list[str], tokenizer_id: str, template: str, max_length: int, train_on_prompt: bool) -> str:
    """A key for what produces the tokens: the rendered pieces (template text and normalisation included),
    the tokenizer (`tokenizer_id`: tokenizer_fingerprint, computed once per run), the settings, and this
    file's code."""
    h = hashlib.sha256()
    h.update(json.dumps([CODE_FINGERPRINT, template, max_length, train_on_prompt, tokenizer_id]).encode())
    for pieces in rendered:
        h.update(pieces.encode())
        h.update(b"\x00")
    return h.hexdigest()[:24]


def rendered_pieces(template: str, conversations: list[list[dict]], tokenizer) -> list[str]:
    """Each conversation rendered by its template, JSON-encoded: the exact text that is tokenized."""
    return [json.dumps(render(template, c, tokenizer), ensure_ascii=False) for c in conversations]


def tokenize_dataset(rendered: list[str], rows: list[int], tokenizer, template: str, max_length: int, train_on_prompt: bool, cache_file: str):
    """A `datasets.Dataset` with input_ids, labels, row and truncated, cached at `cache_file`.

    `rendered` are rendered_pieces; `rows` their source row numbers. Examples left with no trained token
    after truncation are dropped (the caller reports how many).
    """
    import datasets

    def tokenize_batch(batch):
        pieces = [[tuple(p) for p in json.loads(c)] for c in batch["pieces"]]
        encoded = encode_many(pieces, tokenizer, template, train_on_prompt)
        out = {"input_ids": [], "labels": [], "row": [], "truncated": []}
        for (ids, labels), row in zip(encoded, batch["row"]):
            if (kept := trained_example(ids, labels, max_length)) is None:
                continue
            ids, labels, truncated = kept
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["row"].append(row)
            out["truncated"].append(truncated)
        return out

    source = datasets.Dataset.from_dict({"pieces": rendered, "row": rows})
    return source.map(
        tokenize_batch,
        batched=True,
        batch_size=256,
        remove_columns=["pieces", "row"],
        cache_file_name=cache_file,
        load_from_cache_file=True,
        new_fingerprint=hashlib.sha256(cache_file.encode()).hexdigest()[:16],
        desc="tokenizing",
    )
