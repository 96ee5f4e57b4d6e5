"""Progress people can `tail -f`: one plain line per log step, and metrics.jsonl beside it.

Lines look like `step 20/300 | loss 1.234 | lr 2.0e-04 | 1,234 tok/s | mem 10.2 GB | eta 00:12:34`.
On a terminal a progress bar is shown as well; in a batch log there are no carriage returns.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from .distributed import world
from ..config.slurm_syntax import slurm_time


# TRL's logged preference numbers -> metrics.jsonl's names
REWARD_KEYS = {"rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected", "rewards/margins": "reward_margin",
               "rewards/accuracies": "reward_accuracy", "logps/chosen": "logps_chosen", "logps/rejected": "logps_rejected",
               "nll_loss": "nll_loss", "log_odds_ratio": "log_odds_ratio",  # ORPO's two terms
               "kl": "kl"}  # KTO's estimate of the KL divergence from the reference


def peak_memory_gb() -> float:
    """Peak GPU memory reserved by this process, or its peak resident memory on CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_reserved() / 1e9
    return peak_resident_gb()


def peak_resident_gb() -> float:
    """This program's peak resident memory. Not ru_maxrss where /proc tells: Linux carries the high-water mark of
    the process a program was forked from across exec, so that a training started by a 3 GB parent would report at
    least 3 GB; VmHWM is the program's own."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def peak_allocated_gb() -> float | None:
    """Peak GPU memory held by tensors (reserved minus the caching allocator's slack); None on CPU."""
    import torch

    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None


def speaks() -> bool:
    """Whether this process writes the log and metrics: rank 0 of several, or the only one."""
    return world().main


def emit(line: str) -> None:
    """One line of the job log, from rank 0 only: several ranks speak with one voice."""
    if speaks():
        print(line, flush=True)


class ProgressLog(TrainerCallback):
    """Prints the progress lines and appends every log and evaluation to metrics.jsonl.

    `tokens_seen` is a callable giving the real (non-padding) tokens trained so far.
    """

    def __init__(self, metrics_path: Path, tokens_seen, tty: bool | None = None):
        self.metrics_path = metrics_path
        self.tokens_seen = tokens_seen
        self.tty = (sys.stdout.isatty() if tty is None else tty) and speaks()
        self.bar = None
        self.started = self.last_time = time.time()
        self.first_step = 0
        self.last_tokens = 0
        self.first_rewards: dict = {}  # a preference run's first logged step
        self.warned: set[str] = set()

    def record(self, entry: dict) -> None:
        if not speaks():
            return
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = self.last_time = time.time()
        self.first_step = state.global_step
        self.last_tokens = self.tokens_seen()
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _print(self, line: str) -> None:
        if not speaks():
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            emit(line)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        for label in ("eval", "base", "final"):  # an evaluation (trainer.evaluate logs it): which one, by its prefix
            if logs.get(f"{label}_loss") is not None:
                self.evaluation(state.global_step, label, logs[f"{label}_loss"])
            if logs.get(f"{label}_pref_margin") is not None:
                self.preference_evaluation(state.global_step, label, logs)
        if "loss" not in logs:
            return
        now, step, tokens = time.time(), state.global_step, self.tokens_seen()
        tok_s = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
        done = step - self.first_step
        eta = (now - self.started) / done * (state.max_steps - step) if done else 0
        mem = peak_memory_gb()
        entry = {
            "step": step, "max_steps": state.max_steps, "epoch": round(state.epoch or 0, 4), "loss": logs["loss"],
            "lr": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"), "tokens": tokens,
            "tokens_per_s": round(tok_s, 1), "peak_mem_gb": round(mem, 3), "elapsed_s": round(now - self.started, 1),
        }
        rewards = {name: logs[key] for key, name in REWARD_KEYS.items() if key in logs}  # preference methods (TRL's)
        entry.update(rewards)
        self.record(entry)
        lr = entry["lr"] if entry["lr"] is not None else float("nan")
        shown = "".join(f" | {word} {rewards[key]:{form}}" for key, word, form in
                        (("reward_accuracy", "acc", ".2f"), ("reward_margin", "margin", "+.3f"), ("kl", "kl", ".3f")) if key in rewards)
        self._print(
            f"step {step}/{state.max_steps} | loss {logs['loss']:.4f}{shown} | lr {lr:.1e} | {tok_s:,.0f} tok/s"
            f" | mem {mem:.1f} GB | eta {slurm_time(eta)}"
        )
        if rewards:
            from .preference import failure_signs

            for warning in failure_signs(self.first_rewards.setdefault("entry", entry), entry):
                if warning not in self.warned:
                    self.warned.add(warning)
                    self._print(f"warning: {warning}")
        self.last_time, self.last_tokens = now, tokens

    def preference_evaluation(self, step: int, label: str, logs: dict) -> None:
        from .preference import evaluation_numbers, held_out_words

        numbers = evaluation_numbers(logs, label)
        self.record({"step": step, "eval": label, **numbers})
        self._print(f"eval {'adapter' if label == 'eval' else label} @ step {step} | {held_out_words(numbers)}")

    def evaluation(self, step: int, label: str, loss: float) -> None:
        ppl = math.exp(loss) if loss < 50 else float("inf")
        self.record({"step": step, "eval": label, "val_loss": loss, "val_ppl": ppl})
        shown = "adapter" if label == "eval" else label
        self._print(f"eval {shown} @ step {step} | val_loss {loss:.4f} | ppl {ppl:.2f}")
