"""`hpclora eval` of a preference run: how often, and by how much, the model prefers each held-out pair's chosen answer
to its rejected one, as the run found it (the base, or the adapter it went on from) and with the tuned adapter; then
both models' greedy answers to N held-out prompts beside the chosen and rejected answers. Writes eval.json and eval.md.
Held-out labelled answers (kto's unpaired rows) pair no two answers: each counts by its log-probability, with the
sign of its label (a good answer's rise and a bad one's fall are both gains), and there is no accuracy.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from ..errors import UserError
from ..rundir import write_json, write_text_atomic
from .evaluate import NOISE_SE, paired_change

BATCH_PAIRS = 8


def pair_margins(model, pairs, pad_token_id: int) -> list[float]:
    """Each pair's margin under `model`: the summed log-probability of the chosen answer minus the rejected one's; of
    labelled answers, each one's summed log-probability, negated for a bad answer."""
    from ..job.preference import answer_logps, pair_collator, pair_scores, unpaired_collator

    unpaired = "completion_ids" in pairs.column_names
    collate, margins = (unpaired_collator if unpaired else pair_collator)(pad_token_id), []
    for start in range(0, len(pairs), BATCH_PAIRS):
        batch = collate([pairs[i] for i in range(start, min(start + BATCH_PAIRS, len(pairs)))])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        if unpaired:
            margins += (answer_logps(model, batch) * (batch["label"].float() * 2 - 1)).tolist()
        else:
            chosen, rejected, _, _ = pair_scores(model, batch, with_reference=False)
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

    unpair = preference.split_into_answers(cfg.method.name, "val", [rows.format for rows in groups])  # kto's labelled answers
    sets = [preference.dataset(rows.source.data, rows.conversations, rows.numbers, tokenizer, unpair) for rows in groups if rows.conversations]
    if not sets:
        raise UserError(f"eval: no held-out pair ({source})")
    pairs = datasets.concatenate_datasets(sets) if len(sets) > 1 else sets[0]
    unit = "labelled answers" if unpair else "pairs"
    before_title = starting_title(model)
    note(f"preference on {len(pairs)} held-out {unit} ({source}): {before_title} ...")
    with starting_point(model):
        before = pair_margins(model, pairs, tokenizer.pad_token_id)
    note("preference: with adapter ...")
    after = pair_margins(model, pairs, tokenizer.pad_token_id)

    samples, greedy = [], Sampling(max_new_tokens=max_new_tokens)
    adapter, base = adapter_and_base(model, tokenizer, cfg.data.template)
    rows_of = [(pair, number) for rows in groups for pair, number in zip(rows.conversations, rows.numbers)]
    for pair, number in rows_of[:n]:
        what = f"sample {len(samples) + 1} of up to {n} (row {number})"
        given = ({"chosen": pair["chosen"], "rejected": pair["rejected"]} if "chosen" in pair
                 else {"answer": pair["completion"], "good": pair["label"]})
        samples.append({"row": number, "prompt": pair["prompt"][-1]["content"], **given,
                        "before": timed(base, pair["prompt"], greedy, f"{what}, {before_title}"),
                        "adapter": timed(adapter, pair["prompt"], greedy, f"{what}, with adapter")})

    finding = margin_finding(before, after)
    accuracy = (lambda margins: None) if unpair else (lambda margins: sum(m > 0 for m in margins) / len(margins))  # noqa: E731
    better = finding["direction"] == "higher" and (unpair or accuracy(after) >= accuracy(before))
    verdict = ("adapter is better: it prefers the chosen answers more, beyond noise" if better
               else "adapter is NOT better: its preference for the chosen answers fell, beyond noise" if finding["direction"] == "lower"
               else "no clear difference: the margins changed within noise; hold out more pairs (data.val_size) or pass --data")
    result = {
        "held_out": source, "method": cfg.method.name, "pairs": len(pairs), "unit": unit, "before_is": before_title,
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
    if r["unit"] != "pairs":
        return (f"Per answer, the log-probability moved {f['mean_change']:+.2f} on average toward its label{noise}: up for "
                "good answers, down for bad ones.")
    return (f"Per pair, the margin changed by {f['mean_change']:+.2f} on average{noise}; {f['won']} pairs went over to the chosen "
            f"answer, {f['lost']} to the rejected one.")


def _accuracy(side: dict) -> str:
    return "-" if side["accuracy"] is None else f"{side['accuracy']:.2f}"


def pairs_markdown(name: str, r: dict) -> str:
    b, a = r["preference"]["before"], r["preference"]["adapter"]
    explained = ("Preference accuracy: how often the model gives the chosen answer a higher log-probability than the rejected "
                 "one; margin: by how much, on average (summed over the answer's tokens)." if r["unit"] == "pairs" else
                 "The answers are labelled good or bad and paired with none: margin is the mean summed log-probability of "
                 "an answer, negated for a bad one; there is no accuracy.")
    lines = [
        f"# Evaluation of {name} ({r['method']})", "",
        f"Held out: {r['held_out']} ({r['pairs']} {r['unit']}). {explained}", "",
        "| | preference accuracy | mean margin |", "|---|---|---|",
        f"| {r['before_is']} | {_accuracy(b)} | {b['mean_margin']:+.2f} |",
        f"| with adapter | {_accuracy(a)} | {a['mean_margin']:+.2f} |", "",
        finding_words(r), "",
        f"Verdict: **{r['verdict']}**." if r["adapter_is_better"] else f"Verdict: {r['verdict']}.", "",
        f"## Answers ({r['decoding']})", "",
    ]
    cell = lambda text: text.replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    for s in r["samples"]:
        given = (("chosen", "rejected"), (s["chosen"], s["rejected"])) if "chosen" in s else \
            ((f"given answer ({'good' if s['good'] else 'bad'})",), (s["answer"],))
        lines += [f"### Row {s['row']}", "", f"> {cell(s['prompt'])}", "",
                  f"| {' | '.join(given[0])} | {r['before_is']} | with adapter |", "|---" * (len(given[0]) + 2) + "|",
                  f"| {' | '.join(map(cell, given[1]))} | {cell(s['before'])} | {cell(s['adapter'])} |", ""]
    return "\n".join(lines)


def describe_pairs(r: dict, run_dir) -> str:
    b, a = r["preference"]["before"], r["preference"]["adapter"]
    measured = (f"preference accuracy {r['before_is']} {_accuracy(b)} -> adapter {_accuracy(a)} | " if r["unit"] == "pairs" else "")
    return "\n".join([
        f"held out: {r['held_out']} ({r['pairs']} {r['unit']})",
        f"{measured}mean margin {b['mean_margin']:+.2f} -> {a['mean_margin']:+.2f} "
        f"({'log-probability, chosen minus rejected' if r['unit'] == 'pairs' else 'log-probability, negated for bad answers'}). "
        f"{finding_words(r)}",
        f"verdict: {r['verdict']}",
        f"wrote {Path(run_dir) / 'eval.json'} and eval.md ({len(r['samples'])} answers side by side)",
    ])
