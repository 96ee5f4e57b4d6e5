"""Data: formats, templates, exact loss masks, row-numbered errors, caching, packing through prepare()."""

from __future__ import annotations

import csv
import gc
import json
import sys
import subprocess

import pytest

from hpclora import config
from hpclora.data import load_conversations, prepare, render
from hpclora.data.tokenize import IGNORE, encode
from hpclora.errors import DataError, UserError

from conftest import alpaca_rows, write_jsonl


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def data_cfg(path, tmp_path, *overrides):
    return config.load(None, [f"data.path={path}", f"data.cache_dir={tmp_path / 'cache'}", *overrides]).data


USER = {"role": "user", "content": "Translate", "input": "cat"}
ASSISTANT = {"role": "assistant", "content": "猫", "input": ""}


@pytest.mark.parametrize(
    "template, prompt",
    [
        ("alpaca", "Below is an instruction that describes a task, paired with an input that provides further context. "
                   "Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate\n\n### Input:\ncat\n\n### Response:\n"),
        ("alpaca_ja", "以下に、あるタスクを説明する指示があり、それに付随する入力が更なる文脈を提供しています。"
                      "リクエストを適切に完了するための回答を記述してください。\n\n### 指示:\nTranslate\n\n### 入力:\ncat\n\n### 応答:\n"),
        ("calm", "ユーザー: Translate\n入力: cat\nシステム: "),
        ("none", "Translate\n\ncat\n"),
    ],
)
def test_templates_mask_exactly_the_prompt(tokenizer, template, prompt):
    input_ids, labels = encode(render(template, [USER, ASSISTANT]), tokenizer, template)
    prompt_ids, answer_ids = ids(tokenizer, prompt), ids(tokenizer, "猫")
    assert input_ids == prompt_ids + answer_ids + [tokenizer.eos_token_id]
    assert labels == [IGNORE] * len(prompt_ids) + answer_ids + [tokenizer.eos_token_id]


def test_alpaca_without_input_uses_the_short_preamble(tokenizer):
    pieces = render("alpaca_ja", [{"role": "user", "content": "挨拶して", "input": ""}, ASSISTANT])
    assert pieces[0][0] == "以下に、あるタスクを説明する指示があります。リクエストを適切に完了するための回答を記述してください。\n\n### 指示:\n挨拶して\n\n### 応答:\n"
    assert "### 入力:" not in pieces[0][0]


def test_chat_template_multi_turn_trains_only_assistant_turns(tokenizer):
    messages = [
        {"role": "user", "content": "Hi", "input": ""},
        {"role": "assistant", "content": "Hello!", "input": ""},
        {"role": "user", "content": "Bye", "input": ""},
        {"role": "assistant", "content": "Goodbye!", "input": ""},
    ]
    input_ids, labels = encode(render("chat", messages, tokenizer), tokenizer, "chat")
    full = tokenizer.apply_chat_template([{k: m[k] for k in ("role", "content")} for m in messages], tokenize=False)
    assert tokenizer.decode(input_ids) == full
    trained = [t for t, label in zip(input_ids, labels) if label != IGNORE]
    assert trained == ids(tokenizer, "Hello!<|im_end|>\n") + ids(tokenizer, "Goodbye!<|im_end|>\n")
    # Both user turns, and the system prompt the template adds, are masked.
    masked = tokenizer.decode([t for t, label in zip(input_ids, labels) if label == IGNORE])
    assert "Hi" in masked and "Bye" in masked and "Hello" not in masked


def test_train_on_prompt_trains_everything_but_the_first_token(tokenizer):
    input_ids, labels = encode(render("alpaca", [USER, ASSISTANT]), tokenizer, "alpaca", train_on_prompt=True)
    assert labels == [IGNORE] + input_ids[1:]


def test_bos_is_prepended_for_tokenizers_that_add_one(tmp_path):
    """A tokenizer configured to add a BOS (as Llama's does) gets it in front of the prompt, masked."""
    from transformers import AutoTokenizer

    from hpclora.job.bundled import bundled_model_dir

    tok = AutoTokenizer.from_pretrained(bundled_model_dir())
    tok.add_bos_token = True
    tok.update_post_processor()
    input_ids, labels = encode(render("none", [USER, ASSISTANT]), tok, "none")
    assert input_ids[0] == tok.bos_token_id and labels[0] == IGNORE


def test_each_format_normalises_to_messages(tmp_path):
    share = tmp_path / "s.json"
    share.write_text(json.dumps([{"conversations": [
        {"from": "gpt", "value": "dangling start"}, {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
        {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]}]))
    messages = write_jsonl(tmp_path / "m.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}])
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}])
    table = tmp_path / "a.csv"
    with open(table, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["instruction", "input", "output"])
        w.writeheader()
        w.writerow({"instruction": "Say hi", "input": "", "output": "hi"})

    convs, _, fmt = load_conversations(data_cfg(share, tmp_path, "data.template=chat"))
    assert fmt == "sharegpt" and [m["role"] for m in convs[0]] == ["user", "assistant", "user", "assistant"]
    convs, _, fmt = load_conversations(data_cfg(messages, tmp_path, "data.template=chat"))
    assert fmt == "messages" and convs[0][0] == {"role": "system", "content": "Be brief.", "input": ""}
    convs, _, fmt = load_conversations(data_cfg(text, tmp_path, "data.template=none"))
    assert fmt == "text" and convs[0] == [{"role": "text", "content": "Once upon a time.", "input": ""}]
    convs, rows, fmt = load_conversations(data_cfg(table, tmp_path))
    assert fmt == "alpaca" and rows == [2] and convs[0][1]["content"] == "hi"


def test_parquet_and_column_mapping(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"act": ["Linux Terminal"], "prompt": ["I want you to act as a terminal."]}), path)
    convs, _, fmt = load_conversations(data_cfg(path, tmp_path, "data.columns={instruction: act, output: prompt}"))
    assert fmt == "alpaca" and convs[0][0]["content"] == "Linux Terminal"


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": "b"', ], "d.jsonl:2: not valid JSON"),
        (['{"instruction": "a", "output": "b"}', '', '{"instruction": "c"}'], "d.jsonl:3: missing field 'output'"),
        (['{"instruction": "a", "output": "b"}', '{"instruction": "", "input": "", "output": ""}'], "d.jsonl:2: empty row"),
        (['{"instruction": "a", "output": "b"}', '{"instruction": "x", "output": "  "}'], "d.jsonl:2: field 'output' is empty"),
        (['[1, 2]'], "d.jsonl:1: expected a JSON object per line"),
        (['{"question": "a", "answer": "b"}'], "d.jsonl:1: cannot tell the data format"),
        (['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": ' + "[" * 5000 + "]" * 5000 + "}"],
         "d.jsonl:2: nested more than"),
        (['{"instruction": "a", "output": "b", "n": ' + "9" * 5000 + "}"], "d.jsonl:1: cannot be read: Exceeds the limit (4300 digits)"),
        (['{"instruction": "a", "output": "b"}', '{"instruction": "caf\\ud800", "output": "b"}'], "d.jsonl:2: holds a lone UTF-16 surrogate"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError) as err:
        load_conversations(data_cfg(path, tmp_path))
    assert str(err.value).startswith(str(tmp_path / message.split(":")[0]))
    assert message.split(":", 1)[1].strip().split(":")[0] in str(err.value)
    assert f"d.jsonl:{message.split(':')[1]}" in str(err.value)


def test_a_row_nested_too_deep_is_refused_though_a_collection_runs_finalizers_meanwhile(tmp_path, monkeypatch):
    """The parser fails at the depth limit; a garbage collection there would run each finalizer with no stack left,
    each failing unraisably. Every collection threshold up to past the limit puts one at another depth."""
    def recurse(n):
        return n and recurse(n - 1)

    class Finalized:
        def __del__(self):
            recurse(60)

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    path = write_jsonl(tmp_path / "d.jsonl", ['{"instruction": "a", "output": ' + "[" * 5000 + "]" * 5000 + "}"])
    cfg, threshold = data_cfg(path, tmp_path), gc.get_threshold()
    try:
        for level in range(700, 1010, 2):
            gc.collect(0)  # the youngest generation only (what the threshold counts): a full one costs a second
            gc.set_threshold(level)
            cycle = Finalized()
            cycle.me = cycle
            del cycle
            with pytest.raises(DataError, match="d.jsonl:1: nested more than"):
                load_conversations(cfg)
    finally:
        gc.set_threshold(*threshold)
    assert [u.exc_type for u in unraisable] == []


def test_sharegpt_errors_name_the_row_and_turn(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "robot", "value": "A"}]},
    ]))
    with pytest.raises(DataError, match=r"s\.json \(row 2\): turn 2: unknown role 'robot'"):
        load_conversations(data_cfg(path, tmp_path, "data.template=chat"))
    for value, named in ((5, "int"), (["A"], "list")):  # a number or a list where the text belongs
        path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": value}]}]))
        with pytest.raises(DataError, match=rf"s\.json \(row 1\): turn 2 of 'conversations': field 'value' must be text, got {named}"):
            load_conversations(data_cfg(path, tmp_path, "data.template=chat"))


def test_csv_errors_name_the_line(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("instruction,input,output\nSay hi,,hi\nSay bye,,\n")
    with pytest.raises(DataError, match=r"a\.csv:3: field 'output' is empty"):
        load_conversations(data_cfg(path, tmp_path))
    path.write_text('instruction,input,output\nSay hi,,hi\n"Say bye,,bye\nSay yes,,yes\n')  # the quote swallows the rest
    with pytest.raises(DataError, match=r"a\.csv:3: not valid CSV: a quote opened in this record is never closed"):
        load_conversations(data_cfg(path, tmp_path))


def test_empty_dataset_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["", "  "])
    with pytest.raises(DataError, match="the dataset has no rows"):
        load_conversations(data_cfg(path, tmp_path))


def test_text_format_needs_template_none_at_data_time(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    with pytest.raises(UserError, match="data.template=none"):
        load_conversations(data_cfg(path, tmp_path))


def test_missing_hub_dataset_offline_is_a_user_error(tmp_path, monkeypatch):
    """The hub is unreachable here: with offline mode on, loading an uncached id must fail clearly."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError, match="offline"):
        load_conversations(data_cfg("someone/no-such-dataset", tmp_path))


def test_prepare_splits_tokenizes_and_caches(tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(30))
    cfg = data_cfg(path, tmp_path, "data.val_size=0.2")
    first = prepare(cfg, tokenizer, seed=1)
    assert (first.stats["train_rows"], first.stats["val_rows"]) == (24, 6)
    assert not first.stats["train_cached"]
    assert sorted(list(first.train["row"]) + list(first.val["row"])) == list(range(1, 31))  # line numbers, nothing lost

    # A second run reads the cache and never tokenizes again.
    import hpclora.data.tokenize as tokenize_module

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(tokenize_module, "encode_many", fail)
    second = prepare(cfg, tokenizer, seed=1)
    assert second.stats["train_cached"] and second.stats["val_cached"]
    assert list(second.train["input_ids"]) == list(first.train["input_ids"])

    # A different split seed is a different dataset: not served from the same cache.
    monkeypatch.undo()
    third = prepare(cfg, tokenizer, seed=2)
    assert not third.stats["train_cached"]


def test_a_changed_template_text_is_never_answered_from_the_token_cache(tmp_path, tokenizer, monkeypatch):
    """The cache is keyed on the rendered text, not on the template's name: a reworded template (an
    upgrade, or a shared cache used by another version) is tokenized anew."""
    from hpclora.data import templates

    cfg = data_cfg(write_jsonl(tmp_path / "d.jsonl", alpaca_rows(10)), tmp_path, "data.val_size=0")
    first = prepare(cfg, tokenizer, seed=1)
    assert prepare(cfg, tokenizer, seed=1).stats["train_cached"]
    monkeypatch.setitem(templates.ALPACA, "response", "### Answer:")
    changed = prepare(cfg, tokenizer, seed=1)
    assert not changed.stats["train_cached"]
    assert "### Answer:" in tokenizer.decode(changed.train[0]["input_ids"])
    assert list(changed.train["input_ids"]) != list(first.train["input_ids"])


def test_truncation_and_dropping(tmp_path, tokenizer):
    long_prompt = {"instruction": "word " * 200, "input": "", "output": "short"}
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(3) + [long_prompt])
    prepared = prepare(data_cfg(path, tmp_path, "data.val_size=0", "data.max_length=64"), tokenizer, seed=0)
    assert prepared.stats["train_dropped"] == 1  # its response was cut off entirely
    assert max(len(x) for x in prepared.train["input_ids"]) <= 64
    # Every response cut off: the error says so and what to do, whichever split lost them all.
    path = write_jsonl(tmp_path / "long.jsonl", [long_prompt] * 6)
    with pytest.raises(DataError) as err:
        prepare(data_cfg(path, tmp_path, "data.val_size=2", "data.max_length=64"), tokenizer, seed=0)
    assert "no training example is left: every response of the 4 training rows lies beyond data.max_length=64" in str(err.value)
    from hpclora.data.split import split_indices

    _, val_rows = split_indices(6, 2, 0)
    rows = [long_prompt if i in val_rows else row for i, row in enumerate(alpaca_rows(6))]
    prepared = prepare(data_cfg(write_jsonl(tmp_path / "mixed.jsonl", rows), tmp_path, "data.val_size=2", "data.max_length=64"),
                       tokenizer, seed=0)
    assert prepared.val is None and prepared.stats["val_examples"] == 0 and prepared.stats["train_examples"] == 4


def test_prepare_with_packing_fills_rows(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(40))
    prepared = prepare(data_cfg(path, tmp_path, "data.val_size=0", "data.max_length=256", "data.template=none"), tokenizer, seed=0, packed=True)
    rows = prepared.train
    assert len(rows) < 40 / 3
    assert all(len(r) <= 256 for r in rows["input_ids"])
    assert sum(p.count(0) for p in rows["position_ids"]) == 40  # every example starts once


JA_ROWS = [{"instruction": "日本で一番高い山は何ですか？", "input": "", "output": "富士山です。標高は3776メートルです。"},
           {"instruction": "猫について教えてください。", "input": "", "output": "猫は小型の肉食動物で、ペットとして人気があります。"}]


def jsonl_text(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


EN_ROWS = [{"instruction": "Name the largest planet.", "input": "", "output": "Jupiter is the largest planet."}]


@pytest.mark.parametrize("encoding, rows, named, iconv", [
    ("shift_jis", JA_ROWS, "Shift_JIS (Windows CP932)", "CP932"),
    ("euc_jp", JA_ROWS, "EUC-JP", "EUC-JP"),
    ("iso2022_jp", JA_ROWS, "ISO-2022-JP (JIS)", "ISO-2022-JP"),  # 7-bit bytes: valid UTF-8 but for its ESC sequences
    ("utf_16", JA_ROWS, "UTF-16", "UTF-16"),
    ("utf_16_le", JA_ROWS, "UTF-16 little-endian without a byte-order mark", "UTF-16LE"),
    ("utf_16_le", EN_ROWS, "UTF-16 little-endian without a byte-order mark", "UTF-16LE"),  # NUL bytes, all valid UTF-8
])
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_file_in_another_encoding_names_it_and_the_iconv_line_that_gives_back_its_text(tmp_path, encoding, rows, named, iconv, suffix):
    path = tmp_path / f"ja{suffix}"
    text = jsonl_text(rows) if suffix == ".jsonl" else json.dumps(rows, ensure_ascii=False)
    path.write_bytes(text.encode(encoding))
    with pytest.raises(DataError) as err:
        load_conversations(data_cfg(path, tmp_path))
    message = str(err.value)
    assert message.startswith(f"{path}:1: ") and "not UTF-8" in message
    command = f"iconv -f {iconv} -t UTF-8 {path} > {tmp_path / f'ja.utf8{suffix}'}"
    assert f"looks like {named} (line 1 then reads " in message and f"`{command}`" in message
    subprocess.run(command, shell=True, check=True)  # the advice, followed, gives back the text as written
    assert (tmp_path / f"ja.utf8{suffix}").read_text(encoding="utf-8").lstrip("\ufeff") == text


def test_latin1_is_named_as_the_western_code_page_and_its_conversion_keeps_the_accents(tmp_path):
    path = tmp_path / "a.csv"
    text = "instruction,input,output\nSay hi,,hi\nDescribe a café,,Señor Müller's café très élégant.\n"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError) as err:
        load_conversations(data_cfg(path, tmp_path))
    message = str(err.value)
    assert message.startswith(f"{path}:3: byte 0xe9 is not UTF-8: the file looks like Windows-1252") and "reads 'Describe a café" in message
    assert "it may be Windows-1250 (Central European)" in message  # the detector cannot tell them apart: the doubt is said
    subprocess.run(message.split("`")[1], shell=True, check=True)
    assert (tmp_path / "a.utf8.csv").read_text(encoding="utf-8") == text


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_utf8_byte_order_mark_is_read_as_utf8(tmp_path, suffix):
    path = tmp_path / f"bom{suffix}"
    if suffix == ".jsonl":
        text = jsonl_text(JA_ROWS)
    elif suffix == ".json":
        text = json.dumps(JA_ROWS, ensure_ascii=False)
    else:
        text = "instruction,input,output\n" + "".join(f"{r['instruction']},,{r['output']}\n" for r in JA_ROWS)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # what Excel and Notepad write
    convs, _, fmt = load_conversations(data_cfg(path, tmp_path))
    assert fmt == "alpaca" and [c[0]["content"] for c in convs] == [r["instruction"] for r in JA_ROWS]


def test_data_columns_naming_a_missing_column_lists_the_columns_there_are(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"act": "Linux Terminal", "prompt": "I want you to act as a terminal."}])
    with pytest.raises(DataError) as err:
        load_conversations(data_cfg(path, tmp_path, "data.columns={instruction: act, output: answer}"))
    assert str(err.value) == (f"{path}:1: data.columns names columns the file does not have (output: answer); "
                              "its columns are ['act', 'prompt']")


def test_a_corrupt_parquet_file_is_a_data_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"instruction": ["a"] * 200, "output": ["b"] * 200}), path)
    path.write_bytes(path.read_bytes()[:-40])  # a copy that stopped short: the footer is gone
    with pytest.raises(DataError, match=r"p\.parquet: cannot read parquet at its start"):
        load_conversations(data_cfg(path, tmp_path))


def test_rows_are_streamed_and_checked_to_the_last(tmp_path):
    """check_rows reads every row as training will (the login node's check), keeping none of them."""
    from hpclora.data import check_rows

    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(500) + ['{"instruction": "x"}'])
    with pytest.raises(DataError, match=r"d\.jsonl:501: missing field 'output'"):
        check_rows(data_cfg(path, tmp_path))
    assert check_rows(data_cfg(path, tmp_path, "data.max_rows=500")) == {"rows": 500, "format": "alpaca"}
