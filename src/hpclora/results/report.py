"""`hpclora report`: did it learn? Loss curves as PNG and a markdown summary, for a run or a whole sweep.

Reads only what training leaves in the run directory (metrics.jsonl, summary.json, config.yaml) and, for
a sweep, sweep.json and the trials' job states (given by the caller, who asked Slurm): no torch import,
so it runs on a login node.
"""

from __future__ import annotations

import sys
import math
from dataclasses import dataclass
from pathlib import Path

from ..config.slurm_syntax import slurm_time
from ..errors import UserError
from ..rundir import PREFERENCE_FIGURE, SWEEP_FILE, attempts, metric_entries, read_json, verdict, write_text_atomic


@dataclass
class Curves:
    train: list[tuple[int, float]]  # (step, training loss) per log step
    val: list[tuple[int, float]]  # (step, validation loss): the base model at step 0, then the adapter


def read_curves(run_dir: Path) -> Curves:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl yet (training has not logged a step)")
    train, val, dropped = [], {}, []
    for entry in metric_entries(path, dropped):
        if "val_loss" in entry:
            val[entry["step"]] = entry["val_loss"]  # "final" repeats the last evaluation's step
        elif "loss" in entry:
            train.append((entry["step"], entry["loss"]))
    for number in dropped:
        print(f"warning: {path}, line {number}: not a whole entry: left out of the curves", file=sys.stderr)
    return Curves(train, sorted(val.items()))


# One look per sweep trial, none repeated within LINE_COLORS x LINE_STYLES trials: colour, line style and marker all
# differ between neighbours, so that equal curves drawn on top of each other still show as two lines.
LINE_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def trial_style(i: int) -> dict:
    """The colour, line style and marker of the i-th trial's curve."""
    return {"color": LINE_COLORS[i % len(LINE_COLORS)], "linestyle": LINE_STYLES[(i // len(LINE_COLORS) + i) % len(LINE_STYLES)],
            "marker": MARKERS[i % len(MARKERS)]}


def restart_marks(run_dir: Path) -> list[tuple[int, str]]:
    """(step, label) for each restart of a run (attempts.jsonl): where training resumed, and from what."""
    marks = []
    for attempt in attempts(run_dir)[1:]:
        try:
            step, number = attempt.get("resumed_from"), int(attempt["restart"])
        except (KeyError, TypeError, ValueError):
            continue
        marks.append((step or 0, f"restart {number}: from step {step}" if step else f"restart {number}: from the start"))
    return marks


def trial_overrides(run_dir: Path) -> str | None:
    """The overrides of a sweep's trial (its sweep directory's sweep.json), or None for a run of its own."""
    sweep = read_json(run_dir.parent / SWEEP_FILE) or {}
    for trial in sweep.get("trials", []) if isinstance(sweep.get("trials"), list) else []:
        if isinstance(trial, dict) and Path(str(trial.get("run_dir"))).name == run_dir.name:
            return " ".join(map(str, trial.get("overrides", [])))
    return None


def evaluations_style(points: list) -> dict:
    """Validation losses are measured at their markers only: a dotted line guides the eye through three or more, and
    two (the base model and the final adapter) stand alone, so that no line between them looks like a measured curve."""
    return {"marker": "o", "linestyle": ":" if len(points) > 2 else "none"}


def plot_run(curves: Curves, title: str, out: Path, restarts: list[tuple[int, str]] = ()) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if curves.train:
        ax.plot(*zip(*curves.train), label="train loss", color="tab:blue", alpha=0.8)
    if curves.val:
        ax.plot(*zip(*curves.val), label="validation loss, measured at the markers (step 0: base model)", color="tab:orange",
                **evaluations_style(curves.val))
    for n, (step, label) in enumerate(restarts):
        ax.axvline(step, color="tab:red", linestyle="--", alpha=0.6, label="restart (requeue or resubmit)" if n == 0 else None)
        ax.annotate(label, (step, 1), xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right", fontsize=7, color="tab:red")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_preference(run_dir: Path, title: str, out: Path) -> Path | None:
    """A preference run's figure (None for other runs): TRL's rewards per logged step (how often the chosen answer's
    reward beats the rejected one's, and by how much), the log-probabilities of both answers (falling together is the
    sign of a model unlearning its answers), and the held-out pairs' preference accuracy at each evaluation."""
    entries = metric_entries(run_dir / "metrics.jsonl")
    steps = [e for e in entries if "reward_margin" in e and "loss" in e]  # training logs (evaluations have no loss)
    if not steps:
        return None
    held = sorted({e["step"]: e["pref_accuracy"] for e in entries if "pref_accuracy" in e}.items())
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    x = [e["step"] for e in steps]
    if "reward_accuracy" in steps[0]:  # dpo's (kto's batches pair no answers)
        left.plot(x, [e["reward_accuracy"] for e in steps], label="reward accuracy (training batches)", color="tab:blue")
    if held:
        left.plot(*zip(*held), label="held-out preference accuracy (step 0: before)", color="tab:orange", **evaluations_style(held))
    left.set_ylim(-0.05, 1.05)
    left.set_ylabel("share of pairs")
    margin = left.twinx()
    margin.plot(x, [e["reward_margin"] for e in steps], label="reward margin", color="tab:green", alpha=0.7)
    margin.set_ylabel("reward margin (beta x log-ratio)")
    right.plot(x, [e["logps_chosen"] for e in steps], label="chosen", color="tab:blue")
    right.plot(x, [e["logps_rejected"] for e in steps], label="rejected", color="tab:red")
    right.set_ylabel("log-probability of the answers (training batches)")
    for ax in (left, right):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    if left.get_legend_handles_labels()[0]:  # a kto run on labelled answers has no accuracy to draw
        left.legend(loc="lower right", fontsize=8)
    margin.legend(loc="center right", fontsize=8)
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run_report(run_dir: Path) -> Path:
    """report.md and loss.png in the run directory; returns report.md's path."""
    curves = read_curves(run_dir)
    summary = read_json(run_dir / "summary.json") or {}
    overrides = trial_overrides(run_dir)
    png = plot_run(curves, f"{run_dir.name}: {overrides}" if overrides else run_dir.name, run_dir / "loss.png", restart_marks(run_dir))
    lines = [f"# {run_dir.name}", ""]
    before, after = summary.get("base_preference"), summary.get("final_preference")
    if before and after:
        from ..job.preference import held_out_change

        lines += [held_out_change(before, after).replace("held-out", "Held-out", 1) + ".", ""]
    base, final = summary.get("base_val_loss"), summary.get("final_val_loss")
    if base is not None and final is not None:
        lines += [f"Validation loss {base:.4f} (base) -> {final:.4f} (adapter), {final - base:+.4f}: **{verdict(base, final)}**.",
                  f"Perplexity {math.exp(base):.2f} -> {math.exp(final):.2f}.", ""]
    elif not summary:
        lines += ["Training has not finished: the figures below are what it has logged so far.", ""]
    lines += ["| | |", "|---|---|"]
    restarted = bool(summary.get("restarts")) and summary.get("run_trained_s") is not None
    speeds = ((("run_tokens_per_s", "tokens/s, whole run"), ("tokens_per_s", "tokens/s, last attempt")) if restarted
              else (("tokens_per_s", "tokens/s"),))
    for key, label in (("steps", "steps"), ("tokens", "tokens trained"), *speeds, ("peak_mem_gb", "peak memory (GB)"),
                       ("precision", "precision"), ("trainable_params", "trainable parameters"), ("restarts", "restarts")):
        if summary.get(key) is not None:
            value = summary[key]
            lines.append(f"| {label} | {value:,} |" if isinstance(value, int) else f"| {label} | {value} |")
    if restarted:  # the whole run over its attempts, and the last attempt alone
        lines.append(f"| training time, all {summary['restarts'] + 1} attempts | {slurm_time(summary['run_trained_s'])} |")
        lines.append(f"| last attempt | {summary['attempt_steps']} steps in {slurm_time(summary['runtime_s'])} |")
    if curves.train:
        lines.append(f"| training loss (first -> last log) | {curves.train[0][1]:.4f} -> {curves.train[-1][1]:.4f} |")
    lines += ["", f"![loss curves]({png.name})", ""]
    if (figure := plot_preference(run_dir, run_dir.name, run_dir / PREFERENCE_FIGURE)) is not None:
        lines += [f"![rewards and preference]({figure.name})", ""]
    if (run_dir / "eval.md").is_file():
        lines += ["Generations and held-out loss: [eval.md](eval.md)", ""]
    out = run_dir / "report.md"
    write_text_atomic(out, "\n".join(lines))
    return out


def sweep_report(sweep_dir: Path, states: dict[str, str] | None = None) -> Path:
    """report.md and val_loss.png in the sweep directory: one row per trial, best first. `states`: each
    trial's job state by run directory, where the caller knows them."""
    trials = []
    for trial in (read_json(sweep_dir / SWEEP_FILE) or {}).get("trials", []):
        run_dir = Path(trial["run_dir"])
        summary = read_json(run_dir / "summary.json") or {}
        trials.append({"trial": run_dir.name, "overrides": " ".join(trial["overrides"]), "state": (states or {}).get(str(run_dir)) or "unknown",
                       "val_loss": summary.get("final_val_loss"), "base_val_loss": summary.get("base_val_loss"),
                       "tokens_per_s": summary.get("tokens_per_s"), "peak_mem_gb": summary.get("peak_mem_gb"),
                       "preference": summary.get("final_preference")})
        if (run_dir / "metrics.jsonl").is_file():
            run_report(run_dir)
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    if any(t["preference"] for t in trials):  # a preference sweep: no validation loss; the held-out preference decides
        return _preference_sweep_report(sweep_dir, trials, fmt)
    trials.sort(key=lambda t: (t["val_loss"] is None, t["val_loss"] if t["val_loss"] is not None else 0))
    best = trials[0] if trials and trials[0]["val_loss"] is not None else None

    lines = [f"# Sweep {sweep_dir.name}", "", f"{len(trials)} trials, sorted by final validation loss."]
    if best:
        lines.append(f"Best: **{best['trial']}** ({best['overrides']}), validation loss {best['val_loss']:.4f}.")
    lines += ["", "| | trial | overrides | val loss | base val loss | tokens/s | peak GB | state |", "|---|---|---|---|---|---|---|---|"]
    for t in trials:
        lines.append(f"| {'best' if t is best else ''} | {_trial_link(sweep_dir, t)} | `{t['overrides']}` | {fmt(t['val_loss'], '.4f')} | "
                     f"{fmt(t['base_val_loss'], '.4f')} | {fmt(t['tokens_per_s'], ',.0f')} | {fmt(t['peak_mem_gb'], '.2f')} | {t['state']} |")
    done = [t for t in trials if t["val_loss"] is not None]
    if done:
        png = _plot_sweep(done, sweep_dir, sweep_dir / "val_loss.png")
        lines += ["", f"![validation loss per trial]({png.name})"]
    lines.append("")
    out = sweep_dir / "report.md"
    write_text_atomic(out, "\n".join(lines))
    return out


def _trial_link(sweep_dir: Path, t: dict) -> str:
    return f"[{t['trial']}]({t['trial']}/report.md)" if (sweep_dir / t["trial"] / "report.md").is_file() else t["trial"]


def _preference_sweep_report(sweep_dir: Path, trials: list[dict], fmt) -> Path:
    """A sweep of preference runs, best first by the held-out preference accuracy, then margin (kto's labelled answers:
    margin alone)."""
    from ..job.preference import held_out_words

    rank = lambda t: (t["preference"] is None, -(t["preference"] or {}).get("pref_accuracy", 0), -(t["preference"] or {}).get("pref_margin", 0))  # noqa: E731
    trials.sort(key=rank)
    best = trials[0] if trials[0]["preference"] else None
    lines = [f"# Sweep {sweep_dir.name}", "", f"{len(trials)} trials, sorted by held-out preference accuracy, then margin."]
    if best:
        lines.append(f"Best: **{best['trial']}** ({best['overrides']}), {held_out_words(best['preference'])}.")
    lines += ["", "| | trial | overrides | preference accuracy | margin | tokens/s | peak GB | state |", "|---|---|---|---|---|---|---|---|"]
    for t in trials:
        p = t["preference"] or {}
        lines.append(f"| {'best' if t is best else ''} | {_trial_link(sweep_dir, t)} | `{t['overrides']}` | {fmt(p.get('pref_accuracy'), '.2f')} | "
                     f"{fmt(p.get('pref_margin'), '+.2f')} | {fmt(t['tokens_per_s'], ',.0f')} | {fmt(t['peak_mem_gb'], '.2f')} | {t['state']} |")
    out = sweep_dir / "report.md"
    write_text_atomic(out, "\n".join(lines + [""]))
    return out


def _plot_sweep(trials: list[dict], sweep_dir: Path, out: Path) -> Path:
    """Final validation loss per trial (the best first) beside each trial's validation curve, each trial in a look of its own."""
    plt = _pyplot()
    fig, (final, curves) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.3]})
    xs = range(len(trials))
    looks = [trial_style(i) for i in xs]  # a trial's look is the same in both panels
    for x, t, look in zip(xs, trials, looks):
        final.scatter([x], [t["val_loss"]], s=110 if x == 0 else 60, zorder=3, color=look["color"], marker=look["marker"],
                      edgecolors="black" if x == 0 else "none")
    for x, t in zip(xs, trials):
        final.annotate(f"{t['val_loss']:.3f}", (x, t["val_loss"]), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    base = next((t["base_val_loss"] for t in trials if t["base_val_loss"] is not None), None)
    if base is not None:
        final.axhline(base, color="tab:gray", linestyle=":", label=f"base model {base:.3f}")
        final.legend(fontsize=8)
    final.set_xticks(list(xs), [f"{t['trial']}\n{t['overrides']}" for t in trials], fontsize=7, rotation=30, ha="right")
    final.set_ylabel("final validation loss")
    final.set_title("final validation loss per trial (best first, outlined)")
    final.grid(alpha=0.3)
    for i, t in enumerate(trials):
        val = read_curves(sweep_dir / t["trial"]).val
        if val:
            look = {**looks[i], "linestyle": "none"} if evaluations_style(val)["linestyle"] == "none" else looks[i]
            curves.plot(*zip(*val), markersize=4, label=f"{t['overrides']} ({t['trial']})", linewidth=2.5 if i == 0 else 1.3, **look)
    curves.set_xlabel("optimizer step")
    curves.set_ylabel("validation loss")
    curves.set_title("validation loss during training")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def report(path: str, states: dict[str, str] | None = None) -> Path:
    """The report of a run or a sweep directory; `states` as for sweep_report."""
    target = Path(path).expanduser().resolve()
    if not target.is_dir():
        raise UserError(f"{path}: not a directory (give a run or sweep directory)")
    if (target / SWEEP_FILE).is_file():
        return sweep_report(target, states)
    if (target / "config.yaml").is_file():
        return run_report(target)
    raise UserError(f"{path}: not a run or sweep directory (no config.yaml or sweep.json)")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: compute and login nodes have no display
    import matplotlib.pyplot as plt

    return plt
