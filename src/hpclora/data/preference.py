"""Preference data: rows of a prompt with a chosen and a rejected answer (dpo), or with one answer labelled good or bad
(unpaired, KTO's form), read in any of the forms people publish them in, and tokenized as training reads them.

Forms of a pair: `prompt`/`chosen`/`rejected` as strings or as message lists (role/content or from/value), or, with
no `prompt` column, `chosen` and `rejected` as whole conversations that share their first turns (the shared turns are
the prompt; as strings, their shared text up to a word boundary). Unpaired rows (KTO): `prompt`/`completion`/`label`.

The prompt is rendered by the run's template exactly as `hpclora generate` renders it and tokenized alone; each
answer is what the same template adds after it (closed by EOS). The prompt is never cut: a prompt that leaves no
room for an answer within data.max_length is an error naming its row; the two answers of a pair are cut to the same
room.
"""

from __future__ import annotations

from ..errors import DataError
from .templates import render
from .tokenize import encode_many

PAIRED, UNPAIRED = "preference", "unpaired"
FORMATS = (PAIRED, UNPAIRED)
LABEL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}  # CSV cells


def accepts(method: str, fmt: str) -> bool:
    """Whether `method` trains on rows of format `fmt`."""
    if method == "sft":
        return fmt not in FORMATS
    return fmt == PAIRED or (method == "kto" and fmt == UNPAIRED)


def format_problem(method: str, fmt: str) -> str | None:
    """Why rows of format `fmt` cannot train `method`, with the fix; None where they can."""
    if accepts(method, fmt):
        return None
    if fmt == UNPAIRED and method != "kto":
        return (f"these are unpaired preference rows (prompt/completion/label, KTO's form), which method.name={method} does not "
                "train on: give prompt/chosen/rejected pairs and set method.name=dpo")
    if method == "sft":
        return f"these are {fmt} rows (prompt/chosen/rejected pairs), which method.name=sft does not train on: set method.name=dpo"
    wanted = "prompt/chosen/rejected pairs" + (" or prompt/completion/label rows" if method == "kto" else "")
    return f"method.name={method} trains on {wanted}, and these rows are {fmt} data"


def normalize_pair(values: dict, fail) -> dict:
    """{"prompt": messages, "chosen": text, "rejected": text} of one row; `fail(message)` raises its DataError."""
    for side in ("chosen", "rejected"):
        if values.get(side) is None or values.get(side) == "" or values.get(side) == []:
            fail(f"missing or empty field '{side}'" if side in values else f"missing field '{side}': a pair needs chosen and rejected")
    chosen, rejected = values["chosen"], values["rejected"]
    if values.get("prompt") not in (None, "", []):
        prompt = _prompt(values["prompt"], fail)
        pair = {"prompt": prompt, "chosen": _answer(chosen, "chosen", fail), "rejected": _answer(rejected, "rejected", fail)}
    elif isinstance(chosen, list) and isinstance(rejected, list):
        pair = _implicit_from_messages(chosen, rejected, fail)
    elif isinstance(chosen, str) and isinstance(rejected, str):
        pair = _implicit_from_text(chosen, rejected, fail)
    else:
        fail("chosen and rejected must both be text or both be message lists")
    if pair["chosen"].strip() == pair["rejected"].strip():
        fail("chosen and rejected are the same answer: the pair teaches nothing; drop it or fix the rejected answer")
    return pair


def normalize_unpaired(values: dict, fail) -> dict:
    """{"prompt": messages, "completion": text, "label": bool} of one KTO row."""
    if values.get("prompt") in (None, "", []):
        fail("missing or empty field 'prompt'")
    if values.get("completion") in (None, "", []):
        fail("missing or empty field 'completion'")
    label = values.get("label")
    if isinstance(label, str):
        label = LABEL_WORDS.get(label.strip().lower(), label)
    if not isinstance(label, bool) and label not in (0, 1):
        fail(f"field 'label' must be true (a good answer) or false (a bad one), got {values.get('label')!r}")
    return {"prompt": _prompt(values["prompt"], fail), "completion": _answer(values["completion"], "completion", fail), "label": bool(label)}


def unpaired(example: dict) -> list[dict]:
    """A row as KTO trains on it: a pair becomes its chosen answer (good) and its rejected one (bad)."""
    if "completion" in example:
        return [example]
    return [{"prompt": example["prompt"], "completion": example["chosen"], "label": True},
            {"prompt": example["prompt"], "completion": example["rejected"], "label": False}]


def _prompt(value, fail) -> list[dict]:
    from .normalize import MESSAGE_ROLES, SHAREGPT_ROLES, _msg

    if isinstance(value, str):
        if not value.strip():
            fail("field 'prompt' is empty")
        return [_msg("user", value)]
    if not isinstance(value, list):
        fail(f"field 'prompt' must be text or a message list, got {type(value).__name__}")
    messages = []
    for i, turn in enumerate(value, start=1):
        role_key, text_key, roles = ("role", "content", MESSAGE_ROLES) if isinstance(turn, dict) and "role" in turn else ("from", "value", SHAREGPT_ROLES)
        if not isinstance(turn, dict) or role_key not in turn or not isinstance(turn.get(text_key), str):
            fail(f"turn {i} of 'prompt' needs role and content (or from and value) as text")
        role = roles.get(str(turn[role_key]).lower())
        if role is None:
            fail(f"turn {i} of 'prompt': unknown role {turn[role_key]!r}")
        messages.append(_msg(role, turn[text_key]))
    if not messages or messages[-1]["role"] != "user":
        fail("the prompt must end with a user turn: the answers reply to it")
    return messages


def _answer(value, name: str, fail) -> str:
    """An answer given as text, or as a list holding one assistant message."""
    if isinstance(value, list):
        said = [t for t in value if isinstance(t, dict)]
        texts = [t.get("content", t.get("value")) for t in said if str(t.get("role", t.get("from", ""))).lower() in ("assistant", "gpt", "model")]
        if len(texts) != 1 or len(said) != len(value):
            fail(f"field '{name}' must be text or a list holding one assistant message (with a prompt column, the prompt is not repeated there)")
        value = texts[0]
    if not isinstance(value, str):
        fail(f"field '{name}' must be text, got {type(value).__name__}")
    if not value.strip():
        fail(f"field '{name}' is empty")
    return value


def _implicit_from_messages(chosen: list, rejected: list, fail) -> dict:
    """Whole conversations that differ in their last (assistant) turn: the shared turns are the prompt."""
    if len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
        fail("with no prompt column, chosen and rejected must be conversations that share every turn but their last "
             "(the answer); these differ earlier, or have no prompt turn: add a prompt column")
    return {"prompt": _prompt(chosen[:-1], fail), "chosen": _answer(chosen[-1:], "chosen", fail),
            "rejected": _answer(rejected[-1:], "rejected", fail)}


def _implicit_from_text(chosen: str, rejected: str, fail) -> dict:
    """Texts that share their prompt (Anthropic's HH form): the shared text, up to the last whitespace before the two
    differ, is the prompt."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    cut = max(chosen.rfind(" ", 0, shared + 1), chosen.rfind("\n", 0, shared + 1))
    prompt = chosen[:cut].strip() if cut > 0 else ""
    if not prompt:
        fail("with no prompt column, chosen and rejected must begin with the same prompt text; these share none: add a prompt column")
    return {"prompt": _prompt(prompt, fail), "chosen": chosen[cut:].strip(), "rejected": rejected[cut:].strip()}


def split_into_answers(method: str, split: str, formats) -> bool:
    """Whether a split's rows are tokenized as labelled answers: kto trains on them (pairs split in two); its held-out
    pairs stay pairs, scored as dpo's are, unless some of the run's rows (of `formats`) come unpaired."""
    return method == "kto" and (split == "train" or UNPAIRED in formats)


def dataset(data_cfg, examples: list[dict], rows: list[int], tokenizer, unpair: bool = False):
    """A `datasets.Dataset` of the examples tokenized (encode_examples); with `unpair`, every pair as two labelled
    answers, as kto trains on them."""
    import datasets

    if unpair:
        rows = [row for ex, row in zip(examples, rows) for _ in unpaired(ex)]
        examples = [one for ex in examples for one in unpaired(ex)]
    return datasets.Dataset.from_dict(encode_examples(examples, rows, data_cfg.path, tokenizer, data_cfg.template, data_cfg.max_length))


def row_unit(path: str) -> str:
    """How a file's rows are numbered in messages: lines of line-based files, rows of the others (read.py)."""
    return "line" if path.lower().endswith((".jsonl", ".ndjson", ".csv")) else "row"


def encode_examples(examples: list[dict], rows: list[int], path: str, tokenizer, template: str, max_length: int) -> dict:
    """Columns of the tokenized examples (pairs: prompt_ids, chosen_ids, rejected_ids; unpaired: prompt_ids,
    completion_ids, label), with row and truncated, cut to max_length. Raises a DataError naming the row of a prompt
    that leaves no room for an answer."""
    answers = [k for k in ("chosen", "rejected", "completion") if k in examples[0]] if examples else []
    pieces = []
    for ex in examples:
        pieces.append(render(template, ex["prompt"], tokenizer))
        pieces += [render(template, ex["prompt"] + [{"role": "assistant", "content": ex[k], "input": ""}], tokenizer) for k in answers]
    encoded = iter(encode_many(pieces, tokenizer, template, train_on_prompt=False))
    columns = {"prompt_ids": [], **{f"{k}_ids": [] for k in answers}, "row": [], "truncated": []}
    if examples and "label" in examples[0]:
        columns["label"] = []
    for ex, row in zip(examples, rows):
        prompt_ids = next(encoded)[0]
        full = [next(encoded)[0] for _ in answers]
        if any(ids[:len(prompt_ids)] != prompt_ids for ids in full):
            raise ValueError(f"template {template!r} renders the prompt differently once an answer follows")  # not with our templates
        room = max_length - len(prompt_ids)
        if room <= 0:
            raise DataError(path, f"the prompt alone is {len(prompt_ids)} tokens, and data.max_length={max_length} leaves no "
                                  f"token for the answers: raise data.max_length or shorten the prompt", row, row_unit(path))
        cut = [ids[len(prompt_ids):][:room] for ids in full]
        columns["prompt_ids"].append(prompt_ids)
        for k, ids in zip(answers, cut):
            columns[f"{k}_ids"].append(ids)
        columns["row"].append(row)
        columns["truncated"].append(any(len(ids) - len(prompt_ids) > room for ids in full))
        if "label" in columns:
            columns["label"].append(ex["label"])
    return columns
