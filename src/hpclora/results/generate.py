"""Answer prompts with a run's adapter, its base model, or both side by side.

The prompt is rendered with the run's own template and tokenized exactly as in training. One base model
is loaded; base answers come from the same model with the adapter switched off.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import load_run_config
from ..errors import UserError
from .adapter import checked_adapter
from .text import side_by_side


MAX_NEW_TOKENS = 1_000_000  # beyond any model's context; an answer also stops where the model's context is full


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
            ("--max-new-tokens", self.max_new_tokens, 1 <= self.max_new_tokens <= MAX_NEW_TOKENS, f"from 1 to {MAX_NEW_TOKENS:,}"),
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

    @classmethod
    def from_args(cls, args) -> "Sampling":
        """From the sampling options of `generate` and `chat`; checked before anything loads."""
        return cls.from_flags(args.max_new_tokens, args.sample, args.temperature, top_p=args.top_p, top_k=args.top_k,
                              repetition_penalty=args.repetition_penalty, seed=args.seed)


def load_model(cfg):
    """(base model ready to generate, tokenizer) of a config's model.name, on this node's GPU where it has one, in the
    precision that device suits."""
    from ..job.model import load_base, load_tokenizer
    from ..catalog.precision import choose_precision
    from ..job.resolve import detect_device

    device, bf16_ok = detect_device()
    precision, _ = choose_precision("auto" if cfg.train.precision != "fp32" else "fp32", device, bf16_ok)
    tokenizer = load_tokenizer(cfg.model)
    base = load_base(cfg, precision, device)
    if not cfg.quant.bits:  # quantized weights are placed by load_base; plain ones load on the host
        base.to(device)
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
    adapter = checked_adapter(run)
    cfg = load_run_config(run / "config.yaml")
    started = time.time()
    note(f"loading {cfg.model.name} and the adapter {adapter} ...")
    base, tokenizer = load_model(cfg)
    model = PeftModel.from_pretrained(base, str(adapter))
    if cfg.model.adapter and Path(cfg.model.adapter).is_dir():  # the run went on from this adapter: its answers are the "before"
        model.load_adapter(cfg.model.adapter, adapter_name=STARTING_ADAPTER)
    model.eval()
    note(f"loaded on {model.device} in {time.time() - started:.1f} s")
    return model, tokenizer, cfg


def note(line: str) -> None:
    """A progress line, on stderr: what is happening while a model loads and answers (stdout holds the answers).
    Plain lines, as a job log or `tail -f` wants them."""
    print(line, file=sys.stderr, flush=True)


def answer(model, tokenizer, template: str, prompt: str | list[dict], sampling: Sampling, streamer=None) -> str:
    """The model's answer to a prompt: a user message, or a conversation ending with a user turn. A
    transformers `streamer` receives the tokens as they are generated."""
    import torch

    from ..data import encode, render

    messages = [{"role": "user", "content": prompt, "input": ""}] if isinstance(prompt, str) else prompt
    ids, _ = encode(render(template, messages, tokenizer), tokenizer, template)
    context = getattr(model.config, "max_position_embeddings", None) or None
    if context and len(ids) >= context:
        raise UserError(f"the prompt is {len(ids):,} tokens, and the model reads at most {context:,}: shorten it")
    input_ids = torch.tensor([ids], device=model.device)
    kwargs = {"max_new_tokens": min(sampling.max_new_tokens, context - len(ids)) if context else sampling.max_new_tokens, "do_sample": sampling.do_sample,
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


def printer(tokenizer, out):
    """A transformers streamer that writes each piece of text to `out` as soon as it is final."""
    from transformers import TextStreamer

    class Printer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):  # TextStreamer's hook for subclasses
            if stream_end:
                text = whole_characters(text) + "\n"
            out.write(text)
            out.flush()

    return Printer(tokenizer, skip_prompt=True, skip_special_tokens=True)


# (conversation, Sampling, out=None) -> (its answer, how many tokens it took); the text goes to `out` as it comes
Reply = Callable[..., tuple[str, int]]


def transformers_reply(model, tokenizer, template: str) -> Reply:
    def reply(messages, sampling, out=None):
        text = answer(model, tokenizer, template, messages, sampling, streamer=printer(tokenizer, out) if out else None)
        return text, len(tokenizer.encode(text, add_special_tokens=False))

    return reply


STARTING_ADAPTER = "start"  # where a run that went on from an adapter (model.adapter) loads that adapter beside its own


@contextmanager
def starting_point(model):
    """The model as the run found it while inside: its starting adapter, or the base (the adapter switched off)."""
    if STARTING_ADAPTER not in model.peft_config:
        with model.disable_adapter():
            yield
        return
    model.set_adapter(STARTING_ADAPTER)
    try:
        yield
    finally:
        model.set_adapter("default")


def starting_title(model) -> str:
    return "starting adapter" if STARTING_ADAPTER in model.peft_config else "base model"


def adapter_and_base(model, tokenizer, template: str) -> tuple[Reply, Reply]:
    """A PEFT model's answers with its adapter, and as the run found it (starting_point): the base with the adapter
    switched off, or the adapter it went on from."""
    adapter = transformers_reply(model, tokenizer, template)

    def base(messages, sampling, out=None):
        with starting_point(model):
            return adapter(messages, sampling, out)

    return adapter, base


def speakers(target, mode: str) -> list[tuple[str, Reply]]:
    """Who answers, as (column title, Reply): for a run directory the adapter, the base model (mode "base") or both
    ("compare"); for a GGUF (file or export directory) llama.cpp with it, beside the adapter it came from ("compare")."""
    from .gguf_answers import exported_gguf, load_gguf

    gguf = exported_gguf(target)
    if gguf is None:
        model, tokenizer, cfg = load_run(target)
        adapter, base = adapter_and_base(model, tokenizer, cfg.data.template)
        title = starting_title(model)
        return {"adapter": [("with adapter", adapter)], "base": [(title, base)], "compare": [(title, base), ("with adapter", adapter)]}[mode]
    if mode == "base":
        raise UserError("generate: --no-adapter: a GGUF holds the merged model; give the run directory for the base model's answers")
    exported = load_gguf(gguf)
    answers = [("GGUF (llama.cpp)", exported.reply)]
    if mode == "compare":
        model, tokenizer, cfg = load_run(exported.run_dir)
        answers.insert(0, ("with adapter", transformers_reply(model, tokenizer, cfg.data.template)))
    return answers


def timed(reply: Reply, messages: list[dict], sampling: Sampling, what: str) -> str:
    """reply(), said as it happens on stderr: `what` first, then how many tokens in how long."""
    note(f"{what} ...")
    started = time.time()
    text, tokens = reply(messages, sampling)
    seconds = time.time() - started
    note(f"{what}: {tokens} tokens in {seconds:.1f} s ({tokens / max(seconds, 1e-9):.1f} tokens/s)")
    return text


def generate(target, prompts: list[str], sampling: Sampling, mode: str = "adapter") -> list[dict]:
    """Per prompt: {"prompt": ..., "answers": {column title: answer}} (see speakers)."""
    answering = speakers(target, mode)
    results = []
    for i, prompt in enumerate(prompts, start=1):
        row = {"prompt": prompt, "answers": {}}
        for title, reply in answering:
            row["answers"][title] = timed(reply, [{"role": "user", "content": prompt, "input": ""}], sampling,
                                          f"prompt {i} of {len(prompts)}, {title}")
        results.append(row)
    return results


def generate_command(target, prompts: list[str], sampling: Sampling, compare: bool, no_adapter: bool, width: int) -> int:
    """`hpclora generate RUN_DIR|GGUF --prompt ...`: each prompt and its answers (two, side by side, with --compare)."""
    if not prompts:
        raise UserError("generate: give at least one --prompt TEXT")
    if compare and no_adapter:
        raise UserError("generate: --compare and --no-adapter exclude each other")
    for i, prompt in enumerate(prompts, start=1):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:  # the shell passed bytes that are no UTF-8 (Python keeps them as surrogates)
            raise UserError(f"generate: --prompt {i} is not UTF-8 text (byte {ord(exc.object[exc.start]) - 0xDC00:#x} at "
                            f"character {exc.start}): set the terminal to UTF-8 (`locale` shows it)") from None
    for row in generate(target, prompts, sampling, "compare" if compare else "base" if no_adapter else "adapter"):
        print(f"\n>>> {row['prompt']}")
        columns = list(row["answers"].items())
        print(side_by_side(*columns[0], *columns[1], width) if len(columns) == 2 else columns[0][1])
    return 0
