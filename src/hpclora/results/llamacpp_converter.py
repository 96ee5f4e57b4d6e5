"""Runs one of llama.cpp's converters (`python llamacpp_converter.py ROOT SCRIPT ARGS...`) as its own `__main__`,
after mending how it reads a model's config under transformers 5.

The converters read the config through transformers (AutoConfig ... to_dict()) and some still look up keys by
their transformers 4 names, which transformers 5 moves while it reads them: GPT-NeoX (OpenCALM) loses `rotary_pct`
into rope_parameters.partial_rotary_factor and its conversion stops with a KeyError. The converter's config reader
(ModelBase.load_hparams, not a public API of llama.cpp) is wrapped to give those keys back; this is the one place
that touches it, and the tiny-GPT-NeoX export test fails if llama.cpp changes it.
"""

import runpy
import sys
from pathlib import Path

# model_type -> {the name the converter reads: (the section transformers 5 writes it in, its name there)}
RENAMED_KEYS = {"gpt_neox": {"rotary_pct": ("rope_parameters", "partial_rotary_factor")}}


def with_old_names(hparams: dict) -> dict:
    for old, (section, new) in RENAMED_KEYS.get(hparams.get("model_type"), {}).items():
        if old not in hparams and new in (hparams.get(section) or {}):
            hparams[old] = hparams[section][new]
    return hparams


def main(root: str, script: str, *args: str) -> None:
    sys.path[:0] = [root, str(Path(root) / "gguf-py")]  # as the script finds its package and its gguf-py
    from conversion import ModelBase

    read = ModelBase.load_hparams
    ModelBase.load_hparams = staticmethod(lambda *a, **k: with_old_names(read(*a, **k)))
    sys.argv = [str(Path(root) / script), *args]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main(*sys.argv[1:])
