"""Data mixing (data.sources): each source read with its own format and template, weighted, split and shuffled the
same way on every run; its mistakes named by their place; the planner, the job's log and eval counting the mix as
training uses it."""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections import Counter

import pytest

from hpclora import config
from hpclora.data import prepare, validation_sources

from conftest import tiny_run_yaml, write_jsonl

MINE = [{"instruction": f"足し算 {i}+{i}", "input": "", "output": f"結論：{2 * i}"} for i in range(30)]
GENERAL = [{"conversations": [{"from": "human", "value": f"What is {i} times 2?"}, {"from": "gpt", "value": f"It is {2 * i}."}]}
           for i in range(50)]


def mix(tmp_path, weights=(2, 0.5), general=GENERAL) -> list[dict]:
    mine, other = write_jsonl(tmp_path / "mine.jsonl", MINE), write_jsonl(tmp_path / "general.jsonl", general)
    return [{"path": str(mine), "weight": weights[0]},
            {"path": str(other), "weight": weights[1], "format": "sharegpt", "template": "chat"}]


def mix_cfg(tmp_path, sources, *overrides):
    return config.load(None, [f"data.sources={json.dumps(sources)}", "data.template=alpaca_ja", "data.val_size=8",
                              "data.max_length=256", f"data.cache_dir={tmp_path / 'cache'}", *overrides])


def texts(tokenizer, ds) -> list[str]:
    return [tokenizer.decode(ids) for ids in ds["input_ids"]]


def test_a_mix_weights_each_source_templates_it_its_own_way_and_is_the_same_on_every_run(tmp_path, tokenizer):
    cfg = mix_cfg(tmp_path, mix(tmp_path))
    prepared = prepare(cfg.data, tokenizer, seed=42)
    held = [len(rows.conversations) for rows in validation_sources(cfg.data, 42)]
    assert sum(held) == 8 == prepared.stats["val_rows"] and all(held)  # drawn from both, as from one file
    mine, general = 30 - held[0], 50 - held[1]
    assert [s["train_examples"] for s in prepared.stats["sources"]] == [2 * mine, round(0.5 * general)]

    train = texts(tokenizer, prepared.train)
    kinds = ["### 指示:" in t for t in train]  # alpaca_ja; the general rows are in SmolLM2's chat template
    assert sum(kinds) == 2 * mine and sum("<|im_start|>assistant" in t for t in train) == round(0.5 * general)
    assert set(Counter(t for t in train if "### 指示:" in t).values()) == {2}  # each of my rows twice
    assert len(set(t for t in train if "<|im_start|>" in t)) == round(0.5 * general)  # half the others, once each
    assert 0 < sum(kinds[:20]) < 20  # shuffled together, not one source after the other

    again = prepare(cfg.data, tokenizer, seed=42)  # a resumed job makes the same mix
    assert list(again.train["input_ids"]) == list(prepared.train["input_ids"]) and again.stats["train_cached"]
    # One source of weight 1 is exactly that file as data.path.
    alone = prepare(mix_cfg(tmp_path, [{"path": str(tmp_path / "mine.jsonl")}]).data, tokenizer, seed=42)
    single = prepare(config.load(None, [f"data.path={tmp_path / 'mine.jsonl'}", "data.template=alpaca_ja", "data.val_size=8",
                                        "data.max_length=256", f"data.cache_dir={tmp_path / 'cache'}"]).data, tokenizer, seed=42)
    assert list(alone.train["input_ids"]) == list(single.train["input_ids"]) and list(alone.val["input_ids"]) == list(single.val["input_ids"])


def test_the_plan_counts_the_steps_of_the_mix_the_job_trains(tmp_path, tokenizer):
    from hpclora.plan.steps import planned_steps

    cfg = mix_cfg(tmp_path, mix(tmp_path, weights=(1.5, 0.3)), "train.epochs=1", "train.micro_batch_size=4", "train.max_steps=null")
    for packed in (False, True):
        prepared = prepare(cfg.data, tokenizer, seed=cfg.run.seed, packed=packed)
        counted = "packed rows" if packed else "examples"
        assert planned_steps(cfg, packed) == (math.ceil(len(prepared.train) / 4), f"{counted} counted with the model's tokenizer")
    assert len(prepared.train) < prepared.stats["train_examples"]  # packing made fewer rows than examples


def test_mistakes_in_a_mix_are_named_by_their_place(tmp_path, cli):
    sources = mix(tmp_path) + [{"path": str(tmp_path / "nope.jsonl"), "wieght": 2}, {"path": str(tmp_path / "mine.jsonl"), "weight": 0,
                                                                                     "template": "chatt"}, 3]
    (tmp_path / "bad.yaml").write_text(json.dumps({"data": {"path": str(tmp_path / "mine.jsonl"), "sources": sources}}))
    done = cli("validate", tmp_path / "bad.yaml")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    for said in ("data.sources[2].wieght: unknown key (did you mean 'data.sources[2].weight'?)",
                 f"data.sources[2].path: file not found: {tmp_path / 'nope.jsonl'}",
                 "data.sources[3].weight: must be > 0, got 0",
                 "data.sources[3].template: must be one of null, alpaca, alpaca_ja, calm, chat, none; got 'chatt' (did you mean 'chat'?)",
                 "data.sources[4]: expected a mapping such as {path: a.jsonl, weight: 1}, got 3",
                 "data.sources: and data.path",):
        assert said in done.stderr, done.stderr
    # A bad row of the second source is found on the login node, by file and line, as in a single file.
    bad_row = GENERAL[:6] + [{"conversations": [{"from": "human"}]}] + GENERAL[7:]
    (tmp_path / "mix.yaml").write_text(json.dumps({"data": {"sources": mix(tmp_path, general=bad_row)}}))
    done = cli("validate", tmp_path / "mix.yaml")
    assert done.returncode == 2 and f"error: {tmp_path / 'general.jsonl'}:7: " in done.stderr, done.stderr
    (tmp_path / "text.yaml").write_text(json.dumps({"data": {"sources": [{"path": str(tmp_path / "mine.jsonl"), "format": "text"}]}}))
    assert "data.sources[0].template: plain-text data has no prompt to template: use data.sources[0].template=none" in cli(
        "validate", tmp_path / "text.yaml").stderr


def test_a_mixed_run_logs_each_sources_share_and_eval_holds_out_its_validation_rows(tmp_path, tiny_llama_dir, cli):
    from hpclora.job.train import train

    path = tiny_run_yaml(tmp_path, tiny_llama_dir, data={"sources": mix(tmp_path), "template": "alpaca_ja", "val_size": 8, "max_length": 256},
                         train={"max_steps": 2, "micro_batch_size": 8})
    keys = json.loads(path.read_text())
    del keys["data"]["path"]  # a mix has none
    path.write_text(json.dumps(keys))
    cfg = config.load(path)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        run = train(cfg, run_dir=str(tmp_path / "run"))
    line = next(l for l in log.getvalue().splitlines() if l.startswith("data 80 rows from 2 sources | "))
    assert "mine.jsonl: 30 rows (alpaca, template alpaca_ja) x2 = " in line and "general.jsonl: 50 rows (sharegpt, template chat) x0.5 = " in line
    shares = [int(part.split("(")[-1].rstrip("%)")) for part in line.split(" | ")[1:3]]
    assert sum(shares) in (99, 100, 101) and shares[0] > shares[1], line

    done = cli("eval", run.run_dir, "--n", "2", "--max-new-tokens", "4")
    assert done.returncode == 0, done.stderr
    result = json.loads((run.run_dir / "eval.json").read_text())
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert result["rows"] == 8 and result["adapter"]["loss"] == pytest.approx(summary["final_val_loss"], abs=1e-3)
    assert str(tmp_path / "mine.jsonl") in result["held_out"] and str(tmp_path / "general.jsonl") in result["held_out"]
