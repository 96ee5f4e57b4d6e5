"""`hpclora eval` of a preference run: how often, and by how much, the model prefers each held-out pair's chosen answer
to its rejected one, as the run found it (the base, or the adapter it went on from) and with the tuned adapter; then
both models' greedy answers to N held-out prompts beside the chosen and rejected answers. Writes eval.json and eval.md.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from ..errors import UserError
from ..rundir import write_json, write_text_atomic
from .evaluate import NOISE_SE, paired_change

BATCH_PAIRS = 8


def pair_margins(model, pairs, pad_token_id: int) -> list[float]:
    """Each pair's margin under `model`: the summed log-probability of the chosen answer minus the rejected one's."""
    from ..job.preference import pair_collator, pair_scores

    collate, margins = pair_collator(pad_token_id), []
    for start in range(0, len(pairs), BATCH_PAIRS):
        batch = collate([pairs[i] for i in range(start, min(start + BATCH_PAIRS, len(pairs)))])
        chosen, rejected, _, _ = pair_scores(model, {k: v.to(model.device) for k, v in batch.items()}, with_reference=False)
        margins += (chosen - rejected).tolist()
    return margins


def margin_finding(before: list[float], after: list[float]) -> dict:
    """The paired change of the margins (adapter minus starting point) and twice its standard error: `direction`
    higher (the chosen answers gained), lower, or noise."""
    changes = [a - b for b, a in zip(before, after)]
    return {"pairs": len(changes), **paired_change(changes),
            "won": sum(b <= 0 < a for b, a in zip(before, after)), "lost": sum(a <= 0 < b for b, a in zip(before, after))}


def evaluate_pairs(run: Path, model, tokenizer, cfg, groups: list, source: str, n: int, max_new_tokens: int) -> dict:
    import datasets

    from ..data import preference
    from .generate import Sampling, adapter_and_base, note, starting_point, starting_title, timed

    sets = [preference.dataset(rows.source.data, rows.conversations, rows.numbers, tokenizer, cfg.method.name) for rows in groups if rows.conversations]
    if not sets:
        raise UserError(f"eval: no held-out pair ({source})")
    pairs = datasets.concatenate_datasets(sets) if len(sets) > 1 else sets[0]
    before_title = starting_title(model)
    note(f"preference on {len(pairs)} held-out pairs ({source}): {before_title} ...")
    with starting_point(model):
        before = pair_margins(model, pairs, tokenizer.pad_token_id)
    note("preference: with adapter ...")
    after = pair_margins(model, pairs, tokenizer.pad_token_id)

    samples, greedy = [], Sampling(max_new_tokens=max_new_tokens)
    adapter, base = adapter_and_base(model, tokenizer, cfg.data.template)
    rows_of = [(pair, number) for rows in groups for pair, number in zip(rows.conversations, rows.numbers)]
    for pair, number in rows_of[:n]:
        what = f"sample {len(samples) + 1} of up to {n} (row {number})"
        samples.append({"row": number, "prompt": pair["prompt"][-1]["content"], "chosen": pair["chosen"], "rejected": pair["rejected"],
                        "before": timed(base, pair["prompt"], greedy, f"{what}, {before_title}"),
                        "adapter": timed(adapter, pair["prompt"], greedy, f"{what}, with adapter")})

    finding = margin_finding(before, after)
    accuracy = lambda margins: sum(m > 0 for m in margins) / len(margins)  # noqa: E731
    better = finding["direction"] == "higher" and accuracy(after) >= accuracy(before)
    verdict = ("adapter is better: it prefers the chosen answers more, beyond noise" if better
               else "adapter is NOT better: its preference for the chosen answers fell, beyond noise" if finding["direction"] == "lower"
               else "no clear difference: the margins changed within noise; hold out more pairs (data.val_size) or pass --data")
    result = {
        "held_out": source, "method": cfg.method.name, "pairs": len(pairs), "before_is": before_title,
        "preference": {"before": {"accuracy": accuracy(before), "mean_margin": statistics.fmean(before)},
                       "adapter": {"accuracy": accuracy(after), "mean_margin": statistics.fmean(after)}},
        "margin_finding": finding, "verdict": verdict, "adapter_is_better": better,
        "decoding": f"greedy, up to {max_new_tokens} new tokens", "samples": samples,
    }
    write_json(run / "eval.json", result)
    write_text_atomic(run / "eval.md", pairs_markdown(run.name, result))
    return result


def finding_words(r: dict) -> str:
    f = r["margin_finding"]
    noise = f" (±{f['noise']:.2f}: {NOISE_SE:g} standard errors of the paired changes)" if f["noise"] is not None else ""
    return (f"Per pair, the margin changed by {f['mean_change']:+.2f} on average{noise}; {f['won']} pairs went over to the chosen "
            f"answer, {f['lost']} to the rejected one.")


def pairs_markdown(name: str, r: dict) -> str:
    b, a = r["preference"]["before"], r["preference"]["adapter"]
    lines = [
        f"# Evaluation of {name} ({r['method']})", "",
        f"Held out: {r['held_out']} ({r['pairs']} pairs). Preference accuracy: how often the model gives the chosen answer a "
        "higher log-probability than the rejected one; margin: by how much, on average (summed over the answer's tokens).", "",
        "| | preference accuracy | mean margin |", "|---|---|---|",
        f"| {r['before_is']} | {b['accuracy']:.2f} | {b['mean_margin']:+.2f} |",
        f"| with adapter | {a['accuracy']:.2f} | {a['mean_margin']:+.2f} |", "",
        finding_words(r), "",
        f"Verdict: **{r['verdict']}**." if r["adapter_is_better"] else f"Verdict: {r['verdict']}.", "",
        f"## Answers ({r['decoding']})", "",
    ]
    cell = lambda text: text.replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    for s in r["samples"]:
        lines += [f"### Row {s['row']}", "", f"> {cell(s['prompt'])}", "",
                  f"| chosen | rejected | {r['before_is']} | with adapter |", "|---|---|---|---|",
                  f"| {cell(s['chosen'])} | {cell(s['rejected'])} | {cell(s['before'])} | {cell(s['adapter'])} |", ""]
    return "\n".join(lines)


def describe_pairs(r: dict, run_dir) -> str:
    b, a = r["preference"]["before"], r["preference"]["adapter"]
    return "\n".join([
        f"held out: {r['held_out']} ({r['pairs']} pairs)",
        f"preference accuracy {r['before_is']} {b['accuracy']:.2f} -> adapter {a['accuracy']:.2f} | mean margin {b['mean_margin']:+.2f} -> "
        f"{a['mean_margin']:+.2f} (log-probability, chosen minus rejected). {finding_words(r)}",
        f"verdict: {r['verdict']}",
        f"wrote {Path(run_dir) / 'eval.json'} and eval.md ({len(r['samples'])} answers side by side)",
    ])
