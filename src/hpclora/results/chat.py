"""`hpclora chat`: talk to a run's adapter (or a merged model, or an exported GGUF) turn by turn, in the run's own
template, with the answer printed as it is generated. For `srun --pty` or `singularity exec --nv IMAGE hpclora chat RUN`.

Commands: /reset (forget the conversation), /compare (the last prompt's answer beside the base model's, or a GGUF's
beside the adapter's), /sample [key=value ...] (decoding settings), /help; Ctrl-D leaves, Ctrl-C stops an answer.
Lines are read with readline where there is one, so wide characters (Japanese) are edited as one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import sys
from pathlib import Path
from typing import Callable

from ..errors import UserError
from .generate import Reply, Sampling, adapter_and_base, transformers_reply
from .text import side_by_side

HELP = ("/reset: start a new conversation | /compare: the last prompt's answer beside the other model's | "
        "/sample [temperature=T top_p=P top_k=K max_new_tokens=N repetition_penalty=R seed=S | greedy]: decoding | "
        "Ctrl-D: leave")


@dataclasses.dataclass
class Model:
    """What answers, and what /compare puts beside it."""

    reply: Reply  # its answers
    label: str  # what is talked to, for the first line
    template: str
    speaker: str  # how its answers are labelled: adapter, model (a merged one), gguf
    column: str  # its title in /compare
    other: tuple[str, Callable[[], Reply]] | None = None  # /compare's other column: its title, and () -> its Reply
    message: str = "no other model is known for this one"  # why there is no /compare, where there is none

    def other_reply(self):
        if self.other is None:
            raise UserError(f"/compare: {self.message}")
        return self.other[1]()


def load(target: str | Path) -> Model:
    """A run directory (base + adapter), a merged model directory (MERGED_FROM.json names its base), or a GGUF file or
    export directory (llama.cpp answers; EXPORTED_FROM.json names the run, whose adapter /compare answers with)."""
    from .gguf_answers import exported_gguf

    path = Path(target)
    if (path / "config.yaml").is_file():
        from .generate import load_run, starting_title

        model, tokenizer, cfg = load_run(path)
        adapter, base = adapter_and_base(model, tokenizer, cfg.data.template)
        return Model(adapter, f"{path} (adapter on {cfg.model.name})", cfg.data.template, "adapter", "with adapter",
                     other=(starting_title(model), lambda: base))  # a preference run's: the adapter it went on from
    if (gguf := exported_gguf(path)) is not None:
        return _load_gguf(gguf)
    if (path / "config.json").is_file():
        return _load_merged(path)
    raise UserError(f"{path}: neither a run directory (config.yaml), a model directory (config.json) nor a GGUF")


def _load_gguf(gguf: Path) -> Model:
    from .generate import load_run
    from .gguf_answers import load_gguf

    exported = load_gguf(gguf)

    @functools.cache
    def adapter():  # loaded at the first /compare only
        model, tokenizer, cfg = load_run(exported.run_dir)
        return transformers_reply(model, tokenizer, cfg.data.template)

    run = exported.record.get("adapter")
    return Model(exported.reply, f"{gguf} (llama.cpp{f', exported from {Path(run).parent}' if run else ''})",
                 exported.record.get("template", "the GGUF's own"), "gguf", "GGUF (llama.cpp)",
                 other=("with adapter", adapter) if run else None, message=f"no EXPORTED_FROM.json beside {gguf.name} names its run")


def _load_merged(path: Path) -> Model:
    from ..config import RunConfig
    from .generate import load_model

    provenance = json.loads((path / "MERGED_FROM.json").read_text(encoding="utf-8")) if (path / "MERGED_FROM.json").is_file() else {}
    cfg = dataclasses.replace(RunConfig(), model=dataclasses.replace(RunConfig().model, name=str(path.resolve())))
    model, tokenizer = load_model(cfg)
    template = provenance.get("template") or ("chat" if getattr(tokenizer, "chat_template", None) else "none")

    @functools.cache
    def base():  # loaded at the first /compare only: it doubles the memory
        base_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=provenance["base_model"],
                                                                      revision=provenance.get("base_revision")))
        return transformers_reply(load_model(base_cfg)[0], tokenizer, template)

    return Model(transformers_reply(model, tokenizer, template), f"{path} (merged from {provenance.get('base_model', 'an unknown base')})",
                 template, "model", "merged model", other=("base model", base) if provenance.get("base_model") else None,
                 message="this model directory has no MERGED_FROM.json naming its base")


def set_sampling(sampling: Sampling, words: list[str]) -> Sampling:
    """`/sample` arguments applied to `sampling`: key=value pairs, or `greedy`; checked like the flags."""
    if words == ["greedy"]:
        return dataclasses.replace(sampling, do_sample=False)
    types = {f.name: f.type for f in dataclasses.fields(Sampling)}
    changes = {}
    for word in words:
        key, eq, value = word.partition("=")
        key = key.replace("-", "_")
        if not eq or key not in types or key == "do_sample":
            raise UserError(f"/sample: '{word}' is not key=value with key one of {', '.join(k for k in types if k != 'do_sample')}, or greedy")
        try:
            changes[key] = int(value) if types[key] in (int, "int") else float(value)
        except ValueError:
            raise UserError(f"/sample: {key} must be a number, got '{value}'") from None
    if "temperature" in changes:
        changes["do_sample"] = changes["temperature"] > 0
    return dataclasses.replace(sampling, **changes)


def describe_sampling(s: Sampling) -> str:
    how = f"sampling at temperature {s.temperature}, top_p {s.top_p}, top_k {s.top_k}, seed {s.seed}" if s.do_sample else "greedy"
    return f"{how}, up to {s.max_new_tokens} new tokens, repetition_penalty {s.repetition_penalty}"


def chat(target: str | Path, sampling: Sampling, stdin=None, out=None) -> int:
    stdin, out = stdin or sys.stdin, out or sys.stdout
    interactive = stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (input() then edits lines, wide characters included)
        except ImportError:
            pass
    if hasattr(stdin, "reconfigure"):
        stdin.reconfigure(errors="replace")  # a stray byte in another encoding is not worth a traceback
    out.write("loading ...\n")
    out.flush()
    m = load(target)
    out.write(f"chatting with {m.label}, template {m.template}; {describe_sampling(sampling)}\n{HELP}\n")
    history: list[dict] = []
    while True:
        try:
            line = input("you> ") if interactive else _read_line(stdin, out)
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n(Ctrl-D leaves)\n")
            continue
        text = line.strip()
        if not text:
            continue
        try:
            if text == "/reset":
                history.clear()
                out.write("(new conversation)\n")
            elif text == "/compare":
                compare(m, history, sampling, out)
            elif text.split()[0] == "/sample":
                sampling = set_sampling(sampling, text.split()[1:]) if text.split()[1:] else sampling
                out.write(f"({describe_sampling(sampling)})\n")
            elif text in ("/help", "/?"):
                out.write(HELP + "\n")
            elif text in ("/quit", "/exit"):
                return 0
            elif text.startswith("/") and " " not in text:
                out.write(f"unknown command {text}: {HELP}\n")
            else:
                turn = [*history, {"role": "user", "content": text, "input": ""}]
                out.write(f"{m.speaker}> ")
                out.flush()
                reply, _ = m.reply(turn, sampling, out)
                history[:] = [*turn, {"role": "assistant", "content": reply}]
        except UserError as exc:
            out.write(f"error: {exc}\n")
        except KeyboardInterrupt:
            out.write("\n(answer stopped; it is not part of the conversation)\n")
        out.flush()


def _read_line(stdin, out) -> str:
    out.write("you> ")
    out.flush()
    line = stdin.readline()
    if not line:
        raise EOFError
    return line


def compare(m: Model, history: list[dict], sampling: Sampling, out) -> None:
    """The other model's answer to the last prompt (in the same conversation) beside the one given."""
    if len(history) < 2:
        out.write("(nothing to compare yet: ask something first)\n")
        return
    before, given = history[:-1], history[-1]["content"]
    other = m.other_reply()
    out.write(f"({m.other[0]} answering ...)\n")
    out.flush()
    width = shutil.get_terminal_size((110, 24)).columns
    out.write(side_by_side(m.other[0], other(before, sampling)[0], m.column, given, width) + "\n")
