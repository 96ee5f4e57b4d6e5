"""`hpclora eval`: did the adapter help? Base and adapter on the same held-out rows.

Loss and perplexity of the base model (adapter switched off) and of the adapter, token-weighted over
the response tokens (tokenized as in training, from the same cache), then greedy answers of both for
N held-out prompts next to the reference answer. Held-out rows are the run's own validation split
(the same rows, by the same seed, that training evaluated on), or every row of --data. Writes eval.json
and eval.md into the run directory.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import UserError
from ..rundir import verdict, write_json, write_text_atomic


def held_out(cfg, data_path: str | None) -> tuple[list, str]:
    """The rows to evaluate on, each source's apart (SourceRows: its template tokenizes them), and where they come from."""
    from dataclasses import replace

    from ..data.sources import Source
    from ..data import SourceRows, load_conversations, validation_sources

    if data_path:
        data = replace(cfg.data, path=data_path, max_rows=None, sources=[])
        return [SourceRows(Source(data, 1.0, "data"), *load_conversations(data))], f"every row of {data_path}"
    if not cfg.data.val_size:
        raise UserError("eval: this run kept no validation rows (data.val_size: 0): pass --data PATH with held-out rows")
    groups = validation_sources(cfg.data, cfg.run.seed)
    return groups, f"the run's validation split of {', '.join(rows.source.data.path for rows in groups)}"


def mean_loss(model, examples: list[dict], pad_token_id: int, batch_size: int) -> tuple[float, int]:
    """Token-weighted cross-entropy over the trained (response) tokens (loss.py), and how many tokens that is."""
    from ..data import Collator
    from ..job.loss import summed_loss

    collate = Collator(pad_token_id)
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(examples[start : start + batch_size]).items()}
        batch_total, batch_count = summed_loss(model, batch)
        total, count = total + batch_total, count + batch_count
    return total / count, count


def evaluate(run_dir: str | Path, data_path: str | None = None, n: int = 5, max_new_tokens: int = 128) -> dict:
    from ..data import tokenized
    from .generate import Sampling, adapter_and_base, load_run, note, timed

    run = Path(run_dir)
    model, tokenizer, cfg = load_run(run)
    groups, source = held_out(cfg, data_path)
    examples = [dict(row) for rows in groups if rows.conversations
                for row in tokenized(rows.source.data, rows.conversations, rows.numbers, tokenizer, "eval" if data_path else "val")[0]]
    if not examples:
        raise UserError(f"eval: no held-out row has a response left after truncation to data.max_length={cfg.data.max_length} ({source})")
    batch = cfg.train.micro_batch_size
    note(f"loss on {len(examples)} held-out examples ({source}): base model ...")
    with model.disable_adapter():
        base_loss, tokens = mean_loss(model, examples, tokenizer.pad_token_id, batch)
    note(f"loss: base model {base_loss:.4f}; with adapter ...")
    adapter_loss, _ = mean_loss(model, examples, tokenizer.pad_token_id, batch)
    note(f"loss: with adapter {adapter_loss:.4f}")

    samples = []
    greedy = Sampling(max_new_tokens=max_new_tokens)
    rows_of = [(rows.source.data, conversation, number) for rows in groups for conversation, number in zip(rows.conversations, rows.numbers)]
    for data, conversation, number in rows_of:
        if len(samples) >= n:
            break
        if len(conversation) < 2 or conversation[-1]["role"] != "assistant":
            continue  # plain text has no prompt to answer
        prompt, what = conversation[:-1], f"sample {len(samples) + 1} of up to {n} (row {number}{_of(data, groups)})"
        adapter, base = adapter_and_base(model, tokenizer, data.template)
        base_answer = timed(base, prompt, greedy, f"{what}, base model")
        samples.append({"row": number, "prompt": _prompt_text(prompt), "reference": conversation[-1]["content"],
                        "base": base_answer, "adapter": timed(adapter, prompt, greedy, f"{what}, with adapter")})

    result = {
        "held_out": source, "rows": len(rows_of), "examples": len(examples), "response_tokens": tokens,
        "base": {"loss": base_loss, "perplexity": math.exp(base_loss)},
        "adapter": {"loss": adapter_loss, "perplexity": math.exp(adapter_loss)},
        "loss_change": adapter_loss - base_loss,
        "adapter_is_better": adapter_loss < base_loss,
        "decoding": f"greedy, up to {max_new_tokens} new tokens",
        "samples": samples,
    }
    write_json(run / "eval.json", result)
    write_text_atomic(run / "eval.md", eval_markdown(run.name, result))
    return result


def _of(data, groups: list) -> str:
    """` of a.jsonl` where the rows come from several files."""
    return f" of {Path(data.path).name}" if len(groups) > 1 else ""


def _prompt_text(messages: list[dict]) -> str:
    last = messages[-1]
    return last["content"] + (f"\n\n{last['input']}" if last.get("input") else "")


def eval_markdown(name: str, r: dict) -> str:
    lines = [
        f"# Evaluation of {name}", "",
        f"Held out: {r['held_out']} ({r['examples']} examples, {r['response_tokens']:,} response tokens).", "",
        "| | loss | perplexity |", "|---|---|---|",
        f"| base model | {r['base']['loss']:.4f} | {r['base']['perplexity']:.2f} |",
        f"| with adapter | {r['adapter']['loss']:.4f} | {r['adapter']['perplexity']:.2f} |", "",
        f"Change {r['loss_change']:+.4f}: **{verdict(r['base']['loss'], r['adapter']['loss'])}**.", "",
        f"## Answers ({r['decoding']})", "",
    ]
    cell = lambda text: text.replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    for s in r["samples"]:
        lines += [f"### Row {s['row']}", "", f"> {cell(s['prompt'])}", "",
                  "| reference | base model | with adapter |", "|---|---|---|",
                  f"| {cell(s['reference'])} | {cell(s['base'])} | {cell(s['adapter'])} |", ""]
    return "\n".join(lines)


def describe_evaluation(result: dict, run_dir) -> str:
    """What `hpclora eval` prints: the held-out rows, both losses and the verdict, and where the details went."""
    base, adapter = result["base"], result["adapter"]
    return "\n".join([
        f"held out: {result['held_out']} ({result['examples']} examples, {result['response_tokens']:,} response tokens)",
        f"loss base {base['loss']:.4f} (ppl {base['perplexity']:.2f}) -> adapter {adapter['loss']:.4f} (ppl {adapter['perplexity']:.2f}), "
        f"{result['loss_change']:+.4f}: {verdict(base['loss'], adapter['loss'])}",
        f"wrote {Path(run_dir) / 'eval.json'} and eval.md ({len(result['samples'])} answers side by side)",
    ])
