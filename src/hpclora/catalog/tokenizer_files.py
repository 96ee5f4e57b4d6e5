"""A model's tokenizer from its files (tokenizer.json, tokenizer_config.json, its chat template), without
transformers: the login node counts the tokens of the run's examples with it, to plan packed rows
(plan/steps.py). It offers the part of a transformers tokenizer that data/templates.py and data/tokenize.py use,
and renders chat templates the way transformers' apply_chat_template does (a sandboxed jinja2 with the same
options, filters and globals); tests/test_plan_packing.py checks its tokens against transformers'."""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

from .hub import cached_model_file, hub_model_id, local_model_path
from .models import BUNDLED
from .state import cache_root

FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


class FileTokenizer:
    def __init__(self, files: dict[str, Path]):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_file(str(files["tokenizer.json"]))
        self.fingerprint = sorted((str(path), path.stat().st_mtime_ns) for path in files.values())  # for caches of counts
        config = json.loads(files["tokenizer_config.json"].read_text()) if "tokenizer_config.json" in files else {}
        self.special = {name: _content(config.get(name)) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.eos_token_id = self.backend.token_to_id(self.special["eos_token"]) if self.special["eos_token"] else None
        template = config.get("chat_template")
        if "chat_template.jinja" in files:
            template = files["chat_template.jinja"].read_text()
        self.chat_template = template if isinstance(template, str) else None
        # Llama-style configs switch the BOS on or off here, whatever tokenizer.json's post-processor says.
        self.add_bos = config.get("add_bos_token")

    def __call__(self, text, add_special_tokens: bool = True) -> dict:
        texts = [text] if isinstance(text, str) else list(text)
        ids = [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        bos = self.backend.token_to_id(self.special["bos_token"]) if self.special["bos_token"] else None
        if add_special_tokens and self.add_bos is not None and bos is not None:
            ids = [([bos] if self.add_bos else []) + (row[1:] if row[:1] == [bos] else row) for row in ids]
        return {"input_ids": ids[0] if isinstance(text, str) else ids}

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False) -> str:
        assert not tokenize, "FileTokenizer renders text only"
        return _compiled(self.chat_template).render(messages=messages, tools=None, documents=None,
                                                    add_generation_prompt=add_generation_prompt,
                                                    **{k: v for k, v in self.special.items() if v})


def file_tokenizer(cfg) -> FileTokenizer | None:
    """The run's tokenizer from files on this node (a local model directory, the bundled model once converted, or
    the shared HF cache), or None where they are not here."""
    name = cfg.model.name
    directory = cache_root() / "models" / name if name in BUNDLED else local_model_path(name)
    if directory is not None:
        files = {f: directory / f for f in FILES if (directory / f).is_file()}
    elif hub_model_id(name):
        files = {f: path for f in FILES if (path := cached_model_file(cfg, f)) is not None}
    else:
        files = {}
    if "tokenizer.json" not in files:
        return None
    return _loaded(tuple(sorted((name, path, path.stat().st_mtime_ns) for name, path in files.items())))


@functools.lru_cache(maxsize=4)
def _loaded(files: tuple) -> FileTokenizer:
    """One tokenizer per version of its files: a sweep's trials plan with the same one (reading it takes ~75 ms)."""
    return FileTokenizer({name: path for name, path, _ in files})


def _content(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken's fields."""
    return token.get("content") if isinstance(token, dict) else token


_templates: dict[str, object] = {}


def _compiled(source: str):
    if source not in _templates:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class Generation(Extension):
            """`{% generation %}...{% endgeneration %}`, which marks assistant text for transformers: kept as is."""
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

            def _body(self, caller):
                return caller()

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        _templates[source] = env.from_string(source)
    return _templates[source]
