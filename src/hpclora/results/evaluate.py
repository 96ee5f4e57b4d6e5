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
from ..rundir import write_json, write_text_atomic


def held_out(cfg, data_path: str | None) -> tuple[list, str]:
    """The rows to evaluate on, each source's apart (SourceRows: its template tokenizes them), and where they come from."""
    from dataclasses import replace

    from ..data.sources import Source
    from ..data import SourceRows, load_conversations, validation_sources

    if data_path:
        data = replace(cfg.data, path=data_path, max_rows=None, sources=[])
        return [SourceRows(Source(data, 1.0, "data"), *load_conversations(data, method=cfg.method.name))], f"every row of {data_path}"
    if not cfg.data.val_size:
        raise UserError("eval: this run kept no validation rows (data.val_size: 0): pass --data PATH with held-out rows")
    groups = validation_sources(cfg.data, cfg.run.seed, cfg.method.name)
    return groups, f"the run's validation split of {', '.join(rows.source.data.path for rows in groups)}"


NOISE_SE = 2.0  # a loss change within this many standard errors of the paired per-example changes is noise


def example_losses(model, examples: list[dict], pad_token_id: int) -> list[tuple[float, int]]:
    """Each example's (summed cross-entropy over its trained response tokens, their count) (loss.py), one example at
    a time: the paired per-example changes are what says whether a difference is more than noise."""
    from ..data import Collator
    from ..job.loss import summed_loss

    collate = Collator(pad_token_id)
    return [summed_loss(model, {k: v.to(model.device) for k, v in collate([example]).items()}) for example in examples]


def mean_loss(losses: list[tuple[float, int]]) -> float:
    """Token-weighted: the loss of all response tokens together, as training's validation loss."""
    return sum(total for total, _ in losses) / sum(count for _, count in losses)


def loss_finding(base: list[tuple[float, int]], adapter: list[tuple[float, int]]) -> dict:
    """What the held-out loss shows, and how much of it is noise: the mean of the per-example changes (each example's
    mean loss, adapter minus base) and twice their standard error; `direction` lower, higher, or noise."""
    changes = [a / count - b / count for (b, count), (a, _) in zip(base, adapter)]
    return {"examples": len(changes), **paired_change(changes)}


def paired_change(changes: list[float]) -> dict:
    """The mean of paired changes (adapter minus base, one per held-out example or pair) and NOISE_SE standard errors
    of it: `direction` lower, higher, or noise (within it, or a single change, which gives no estimate)."""
    import statistics

    mean = statistics.fmean(changes)
    if len(changes) < 2:
        return {"mean_change": mean, "noise": None, "direction": "noise"}
    noise = NOISE_SE * statistics.stdev(changes) / len(changes) ** 0.5
    return {"mean_change": mean, "noise": noise, "direction": "lower" if mean < -noise else "higher" if mean > noise else "noise"}


def answers_finding(samples: list[dict]) -> dict | None:
    """What the greedy answers show: how often the adapter's is closer to the reference than the base's (difflib's
    similarity of the texts, 0 to 1), and the mean similarity of each; None without answers."""
    from difflib import SequenceMatcher

    if not samples:
        return None
    similar = lambda answer, reference: SequenceMatcher(None, answer, reference, autojunk=False).ratio()  # noqa: E731
    base = [similar(s["base"], s["reference"]) for s in samples]
    adapter = [similar(s["adapter"], s["reference"]) for s in samples]
    return {"samples": len(samples), "closer": sum(a > b for a, b in zip(adapter, base)), "further": sum(a < b for a, b in zip(adapter, base)),
            "base_similarity": sum(base) / len(base), "adapter_similarity": sum(adapter) / len(adapter)}


def overall(loss: dict, answers: dict | None) -> tuple[str, bool]:
    """The verdict in words, and whether it is a clear "better" (which eval.md sets in bold): only where the loss is
    lower beyond noise and the answers, where there are any, are closer to the references more often than not."""
    if loss["direction"] == "higher":
        return "adapter is NOT better than the base model: its held-out loss is higher, beyond noise", False
    if loss["direction"] == "noise":
        rests = (f"within noise (±{loss['noise']:.4f}) on {loss['examples']} examples" if loss["noise"] is not None
                 else "on a single example, which says nothing about noise")
        return f"no clear difference: the loss change is {rests}; hold out more rows (data.val_size) or pass --data", False
    if answers and answers["closer"] <= answers["further"]:
        return ("the loss favours the adapter, but its answers are no closer to the references than the base's "
                f"({answers['closer']} closer, {answers['further']} further of {answers['samples']}): read them in eval.md"), False
    return "adapter is better", True


def evaluate(run_dir: str | Path, data_path: str | None = None, n: int = 5, max_new_tokens: int = 128) -> dict:
    from ..data import tokenized
    from .generate import Sampling, adapter_and_base, load_run, note, starting_point, timed

    run = Path(run_dir)
    model, tokenizer, cfg = load_run(run)
    groups, source = held_out(cfg, data_path)
    if cfg.method.name != "sft":
        from .evaluate_pairs import evaluate_pairs

        return evaluate_pairs(run, model, tokenizer, cfg, groups, source, n, max_new_tokens)
    examples = [dict(row) for rows in groups if rows.conversations
                for row in tokenized(rows.source.data, rows.conversations, rows.numbers, tokenizer, "eval" if data_path else "val")[0]]
    if not examples:
        raise UserError(f"eval: no held-out row has a response left after truncation to data.max_length={cfg.data.max_length} ({source})")
    note(f"loss on {len(examples)} held-out examples ({source}): base model ...")
    with starting_point(model):
        base_losses = example_losses(model, examples, tokenizer.pad_token_id)
    base_loss, tokens = mean_loss(base_losses), sum(count for _, count in base_losses)
    note(f"loss: base model {base_loss:.4f}; with adapter ...")
    adapter_losses = example_losses(model, examples, tokenizer.pad_token_id)
    adapter_loss = mean_loss(adapter_losses)
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

    loss, answers = loss_finding(base_losses, adapter_losses), answers_finding(samples)
    said, better = overall(loss, answers)
    result = {
        "held_out": source, "rows": len(rows_of), "examples": len(examples), "response_tokens": tokens,
        "base": {"loss": base_loss, "perplexity": math.exp(base_loss)},
        "adapter": {"loss": adapter_loss, "perplexity": math.exp(adapter_loss)},
        "loss_change": adapter_loss - base_loss, "loss_finding": loss, "answers_finding": answers,
        "verdict": said, "adapter_is_better": better,
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
        f"Change {r['loss_change']:+.4f}. {loss_words(r['loss_finding'])}", "",
        *([answers_words(r["answers_finding"]), ""] if r["answers_finding"] else []),
        f"Verdict: **{r['verdict']}**." if r["adapter_is_better"] else f"Verdict: {r['verdict']}.", "",
        f"## Answers ({r['decoding']})", "",
    ]
    cell = lambda text: text.replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    for s in r["samples"]:
        lines += [f"### Row {s['row']}", "", f"> {cell(s['prompt'])}", "",
                  "| reference | base model | with adapter |", "|---|---|---|",
                  f"| {cell(s['reference'])} | {cell(s['base'])} | {cell(s['adapter'])} |", ""]
    return "\n".join(lines)


def loss_words(loss: dict) -> str:
    change = f"Per example, the loss changed by {loss['mean_change']:+.4f} on average over {loss['examples']} examples"
    if loss["noise"] is None:
        return change + ": one example gives no estimate of the noise."
    return change + {"lower": ", lower beyond noise", "higher": ", higher beyond noise", "noise": ", within noise"}[loss["direction"]] + \
        f" (±{loss['noise']:.4f}: {NOISE_SE:g} standard errors of the paired changes)."


def answers_words(answers: dict) -> str:
    return (f"Answers: the adapter's is closer to the reference than the base's in {answers['closer']} of {answers['samples']} "
            f"(further in {answers['further']}); mean similarity {answers['adapter_similarity']:.2f} vs {answers['base_similarity']:.2f}.")


def describe_evaluation(result: dict, run_dir) -> str:
    """What `hpclora eval` prints: the held-out rows, what the loss and the answers each show, the verdict, and
    where the details went."""
    if "preference" in result:
        from .evaluate_pairs import describe_pairs

        return describe_pairs(result, run_dir)
    base, adapter = result["base"], result["adapter"]
    return "\n".join([
        f"held out: {result['held_out']} ({result['examples']} examples, {result['response_tokens']:,} response tokens)",
        f"loss base {base['loss']:.4f} (ppl {base['perplexity']:.2f}) -> adapter {adapter['loss']:.4f} (ppl {adapter['perplexity']:.2f}), "
        f"{result['loss_change']:+.4f}. {loss_words(result['loss_finding'])}",
        *([answers_words(result["answers_finding"])] if result["answers_finding"] else []),
        f"verdict: {result['verdict']}",
        f"wrote {Path(run_dir) / 'eval.json'} and eval.md ({len(result['samples'])} answers side by side)",
    ])
