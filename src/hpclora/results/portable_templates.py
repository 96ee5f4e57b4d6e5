"""A run's prompt template (data/templates.py) written for the runtimes an exported model goes to: as a Jinja chat
template, which the GGUF carries and llama.cpp renders, and as a Go text/template for an Ollama Modelfile.

Each is the same rule as `render()` in another language; tests/test_export.py renders conversations with both and
with hpclora and compares them, text and tokens, so that a change to one cannot go unnoticed. Every piece of output
is a quoted string literal inside a whitespace-trimming action, so that no template's layout leaks into the text.
The `chat` template is the tokenizer's own: the GGUF keeps it as it is, and Ollama reads it from there.
"""

from __future__ import annotations

import json

from ..data.templates import ALPACA, ALPACA_JA

WRITTEN = ("alpaca", "alpaca_ja", "calm", "none")  # the templates hpclora writes itself; `chat` is the model's own


def _words(template: str) -> dict:
    return ALPACA if template == "alpaca" else ALPACA_JA


def _lit(text: str) -> str:
    """A string literal that Jinja and Go read alike: JSON's escapes (\\n, \\", \\\\) are both languages' own."""
    return json.dumps(text, ensure_ascii=False)


def jinja_template(template: str, bos: bool) -> str:
    """The Jinja chat template that renders `messages` ({role, content}) as render(template, ...) does, with
    `eos_token` where an answer ends. A conversation ending with a user turn ends with the response header. `bos`:
    the tokenizer puts a BOS before any text, and hpclora's tokens start with it; a chat template writes its own
    (as Hugging Face's do: llama.cpp adds none to a prompt rendered by one)."""
    return ("{{- bos_token -}}" if bos else "") + _jinja_body(template)


def _jinja_body(template: str) -> str:
    if template in ("alpaca", "alpaca_ja"):
        words = _words(template)
        return "".join([
            "{%- set ns = namespace(found=false, system='', opened=false) -%}",
            "{%- for m in messages -%}{%- if m['role'] == 'system' and not ns.found -%}",
            "{%- set ns.found = true -%}{%- set ns.system = m['content'] -%}{%- endif -%}{%- endfor -%}",
            "{%- for m in messages -%}",
            "{%- if m['role'] == 'user' -%}",
            "{%- if not ns.opened -%}{{- (ns.system or ", _lit(words["preamble"]), ") + '\\n\\n' -}}",
            "{%- set ns.opened = true -%}{%- endif -%}",
            "{{- ", _lit(words["instruction"] + "\n"), " + m['content'] + ", _lit("\n\n" + words["response"] + "\n"), " -}}",
            "{%- elif m['role'] == 'assistant' -%}{{- m['content'] + eos_token -}}{%- endif -%}",
            "{%- endfor -%}",
        ])
    if template == "calm":
        return "".join([
            "{%- for m in messages -%}",
            "{%- if m['role'] == 'system' -%}{{- m['content'] + '\\n' -}}",
            "{%- elif m['role'] == 'user' -%}{{- ", _lit("ユーザー: "), " + m['content'] + ", _lit("\nシステム: "), " -}}",
            "{%- elif m['role'] == 'assistant' -%}{{- m['content'] + eos_token -}}{%- endif -%}",
            "{%- endfor -%}",
        ])
    if template == "none":
        return "".join([
            "{%- for m in messages -%}",
            "{%- if m['role'] in ['system', 'user'] -%}{{- m['content'] + '\\n' -}}",
            "{%- elif m['role'] in ['assistant', 'text'] -%}{{- m['content'] + eos_token -}}{%- endif -%}",
            "{%- endfor -%}",
        ])
    raise ValueError(f"{template!r} is the model's own template, not one hpclora writes")


def go_template(template: str, eos_text: str) -> str:
    """The same rendering as an Ollama TEMPLATE (Go text/template over .Messages, each with .Role and .Content)."""
    eos = _lit(eos_text)
    if template in ("alpaca", "alpaca_ja"):
        words = _words(template)
        return "".join([
            "{{- $system := \"\" }}{{- $found := false }}{{- $opened := false }}",
            "{{- range .Messages }}{{- if and (eq .Role \"system\") (not $found) }}",
            "{{- $system = .Content }}{{- $found = true }}{{- end }}{{- end }}",
            "{{- if not $system }}{{- $system = ", _lit(words["preamble"]), " }}{{- end }}",
            "{{- range .Messages }}",
            "{{- if eq .Role \"user\" }}",
            "{{- if not $opened }}{{- $system }}{{- \"\\n\\n\" }}{{- $opened = true }}{{- end }}",
            "{{- ", _lit(words["instruction"] + "\n"), " }}{{- .Content }}{{- ", _lit("\n\n" + words["response"] + "\n"), " }}",
            "{{- else if eq .Role \"assistant\" }}{{- .Content }}{{- ", eos, " }}{{- end }}",
            "{{- end }}",
        ])
    if template == "calm":
        return "".join([
            "{{- range .Messages }}",
            "{{- if eq .Role \"system\" }}{{- .Content }}{{- \"\\n\" }}",
            "{{- else if eq .Role \"user\" }}{{- ", _lit("ユーザー: "), " }}{{- .Content }}{{- ", _lit("\nシステム: "), " }}",
            "{{- else if eq .Role \"assistant\" }}{{- .Content }}{{- ", eos, " }}{{- end }}",
            "{{- end }}",
        ])
    if template == "none":
        return "".join([
            "{{- range .Messages }}",
            "{{- if or (eq .Role \"system\") (eq .Role \"user\") }}{{- .Content }}{{- \"\\n\" }}",
            "{{- else if eq .Role \"assistant\" }}{{- .Content }}{{- ", eos, " }}{{- end }}",
            "{{- end }}",
        ])
    raise ValueError(f"{template!r} is the model's own template, not one hpclora writes")
