"""Answer prompts with a run's adapter, its base model, or both side by side.

The prompt is rendered with the run's own template and tokenized exactly as in training. One base model
is loaded; base answers come from the same model with the adapter switched off.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path

from ..config import load_run_config
from ..errors import UserError


@dataclass
class Sampling:
    """How answers are decoded: greedy unless `do_sample`. Checked when made, before any model loads."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        import math

        rules = [
            ("--max-new-tokens", self.max_new_tokens, self.max_new_tokens >= 1, "at least 1"),
            ("--temperature", self.temperature, self.temperature >= 0, "0 (greedy) or more"),
            ("--top-p", self.top_p, 0 < self.top_p <= 1, "above 0 and at most 1"),
            ("--top-k", self.top_k, self.top_k >= 0, "0 (no limit) or more"),
            ("--repetition-penalty", self.repetition_penalty, self.repetition_penalty > 0, "above 0 (1.0: none)"),
        ]
        problems = [f"{flag} must be {rule}, got {value}" for flag, value, ok, rule in rules
                    if not ok or (isinstance(value, float) and not math.isfinite(value))]
        if problems:
            raise UserError("generate: " + "; ".join(problems))

    @classmethod
    def from_flags(cls, max_new_tokens: int, sample: bool, temperature: float | None, **rest) -> "Sampling":
        """The command-line meaning: --temperature T samples at T (T = 0: greedy), --sample alone at 0.7."""
        if temperature == 0:
            return cls(max_new_tokens=max_new_tokens, do_sample=False, **rest)
        return cls(max_new_tokens=max_new_tokens, do_sample=sample or temperature is not None,
                   temperature=0.7 if temperature is None else temperature, **rest)


def load_model(cfg):
    """(base model ready to generate, tokenizer) of a config's model.name, in the precision this device suits."""
    from ..job.model import load_base, load_tokenizer
    from ..catalog.precision import choose_precision, detect_device

    device, bf16_ok = detect_device()
    precision, _ = choose_precision("auto" if cfg.train.precision != "fp32" else "fp32", device, bf16_ok)
    tokenizer = load_tokenizer(cfg.model)
    base = load_base(cfg, precision, device)
    base.config.use_cache = True
    return base.eval(), tokenizer


def load_run(run_dir: str | Path):
    """(model with adapter, tokenizer, config) for a finished run directory."""
    from ..job.quiet import quiet_libraries

    quiet_libraries()
    from peft import PeftModel

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run}: not a run directory (no config.yaml)")
    if not (run / "adapter" / "adapter_config.json").is_file():
        raise UserError(f"{run}: has no finished adapter yet (adapter/ is missing); is the run still going or did it fail?")
    cfg = load_run_config(run / "config.yaml")
    base, tokenizer = load_model(cfg)
    model = PeftModel.from_pretrained(base, str(run / "adapter"))
    model.eval()
    return model, tokenizer, cfg


def answer(model, tokenizer, template: str, prompt: str | list[dict], sampling: Sampling, streamer=None) -> str:
    """The model's answer to a prompt: a user message, or a conversation ending with a user turn. A
    transformers `streamer` receives the tokens as they are generated."""
    import torch

    from ..data import encode, render

    messages = [{"role": "user", "content": prompt, "input": ""}] if isinstance(prompt, str) else prompt
    ids, _ = encode(render(template, messages, tokenizer), tokenizer, template)
    input_ids = torch.tensor([ids], device=model.device)
    kwargs = {"max_new_tokens": sampling.max_new_tokens, "do_sample": sampling.do_sample,
              "repetition_penalty": sampling.repetition_penalty}
    if sampling.do_sample:
        torch.manual_seed(sampling.seed)
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, streamer=streamer, **kwargs,
        )
    return answer_text(tokenizer, out[0, input_ids.shape[1]:].tolist())


def answer_text(tokenizer, ids: list[int]) -> str:
    """The generated tokens as text, without a half character at the end (see whole_characters)."""
    return whole_characters(tokenizer.decode(ids, skip_special_tokens=True).strip()).rstrip()


def whole_characters(text: str) -> str:
    """`text` without the U+FFFD that a cut-off character decodes to: a byte-level tokenizer spends several tokens
    on one Japanese character, and an answer stopped by max_new_tokens can end inside one."""
    return text.rstrip("\ufffd")


def generate(run_dir, prompts: list[str], sampling: Sampling, mode: str = "adapter") -> list[dict]:
    """Answers per prompt: mode "adapter", "base", or "compare" (both)."""
    model, tokenizer, cfg = load_run(run_dir)
    results = []
    for prompt in prompts:
        row = {"prompt": prompt}
        if mode in ("base", "compare"):
            with model.disable_adapter():
                row["base"] = answer(model, tokenizer, cfg.data.template, prompt, sampling)
        if mode in ("adapter", "compare"):
            row["adapter"] = answer(model, tokenizer, cfg.data.template, prompt, sampling)
        results.append(row)
    return results


# ----------------------------------------------------------------------------------------------
# Side-by-side text, aware of wide (CJK) characters


def display_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def wrap(text: str, width: int) -> list[str]:
    lines = []
    for paragraph in text.splitlines() or [""]:
        line, used = "", 0
        for word in _breakable(paragraph):
            w = display_width(word)
            if used + w > width and line:
                lines.append(line.rstrip())
                line, used = word.lstrip(), display_width(word.lstrip())
            else:
                line, used = line + word, used + w
            while used > width:  # a single word wider than the column
                cut, acc = 0, 0
                while cut < len(line) and acc + display_width(line[cut]) <= width:
                    acc += display_width(line[cut])
                    cut += 1
                lines.append(line[:cut])
                line = line[cut:]
                used = display_width(line)
        lines.append(line.rstrip())
    return lines


def _breakable(paragraph: str) -> list[str]:
    """Words with their leading space; each wide character is its own unit (CJK has no spaces)."""
    units, current = [], ""
    for ch in paragraph:
        if unicodedata.east_asian_width(ch) in "WF":
            if current:
                units.append(current)
            units.append(ch)
            current = ""
        elif ch == " " and current.strip():
            units.append(current)
            current = ch
        else:
            current += ch
    if current:
        units.append(current)
    return units


def side_by_side(left_title: str, left: str, right_title: str, right: str, total_width: int = 100) -> str:
    col = max(20, (total_width - 3) // 2)
    a, b = wrap(left, col), wrap(right, col)
    rows = [_pad(left_title, col) + " | " + right_title, "-" * col + "-+-" + "-" * col]
    for i in range(max(len(a), len(b))):
        rows.append(_pad(a[i] if i < len(a) else "", col) + " | " + (b[i] if i < len(b) else ""))
    return "\n".join(r.rstrip() for r in rows)


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - display_width(text))
