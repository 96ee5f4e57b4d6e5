"""A model's dimensions without downloading it: from its config.json on disk or in the HF cache, else from the
built-in table (models.KNOWN_DIMS); and what they imply: the linear layers of a block and the parameter counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, UserError
from .hub import cached_model_file, hf_home, hub_model_id, local_model_path
from .models import KNOWN_DIMS

@dataclass(frozen=True)
class ModelDims:
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    context: int = 0  # longest sequence the model's positions cover (max_position_embeddings); 0 = no fixed limit (ALiBi)
    positions: int = 0  # learned absolute position embeddings (GPT-2); rotary and ALiBi models have none
    head_dim: int = 0  # width of an attention head; 0: hidden / heads (Gemma 3 sets its own)


NUMBER_FIELDS = ("hidden_size", "n_embd", "d_model", "num_attention_heads", "n_head", "num_hidden_layers", "n_layer",
                 "num_key_value_heads", "intermediate_size", "n_inner", "vocab_size", "max_position_embeddings", "n_positions")


def read_model_config(path: Path) -> dict:
    """A model's config.json as a mapping, or a ConfigError on model.name that says what is wrong with the file
    (transformers would say only "Unrecognized model")."""
    def broken(why: str) -> ConfigError:
        return ConfigError([("model.name", f"{path}: {why}; the model directory needs the config.json it was saved with")])

    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise broken("not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        raise broken(f"not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise broken(f"a JSON {type(config).__name__}, not an object of settings")
    for key in NUMBER_FIELDS:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise broken(f"{key} is {value!r}, not a whole number")
    return config


def dims_from_config(config: dict) -> ModelDims:
    """ModelDims from a Hugging Face config.json, whatever each architecture calls its fields."""
    get = lambda *keys, default=None: next((config[k] for k in keys if config.get(k) is not None), default)  # noqa: E731
    hidden = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head")
    layers = get("num_hidden_layers", "n_layer")
    if not (hidden and heads and layers):
        raise UserError("model config.json lacks hidden size, heads or layers: give model dimensions another way")
    return ModelDims(
        model_type=config.get("model_type", "llama"), hidden=hidden, layers=layers, heads=heads,
        kv_heads=get("num_key_value_heads", default=heads), intermediate=get("intermediate_size", "n_inner", default=4 * hidden),
        vocab=get("vocab_size", default=32000), tied=bool(config.get("tie_word_embeddings", config.get("model_type") in ("bloom", "gpt2"))),
        context=get("max_position_embeddings", "n_positions", "max_sequence_length", default=0),
        positions=get("n_positions", default=0) if config.get("model_type") == "gpt2" else 0,
        head_dim=get("head_dim", default=0) if get("head_dim", default=0) != hidden // heads else 0,
    )


def model_config_file(cfg) -> Path | None:
    """The model's config.json in its local directory or in the HF cache; None where neither holds one (and for the
    bundled model, whose dimensions are in the built-in table)."""
    local = local_model_path(cfg.model.name)
    if local is not None:
        path = local / "config.json"
    elif hub_model_id(cfg.model.name):
        path = cached_model_file(cfg, "config.json")
    else:
        return None
    return path if path is not None and path.is_file() else None


def find_dims(cfg) -> tuple[ModelDims, str]:
    """The model's dimensions and where they came from: local directory, HF cache, or the built-in table."""
    name = cfg.model.name
    path = model_config_file(cfg)
    if path is not None:
        return dims_from_config(read_model_config(path)), str(path)
    if name in KNOWN_DIMS:
        return ModelDims(*KNOWN_DIMS[name]), "built-in table"
    raise UserError(
        f"model.name: no dimensions known for '{name}' here (no config.json on disk or in the HF cache at "
        f"{hf_home(cfg)}, and not in the built-in table). Run `hpclora stage CONFIG` to fetch it, or point "
        "model.name at a local directory holding its config.json"
    )


def projections(d: ModelDims) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer in one block, by module name, per architecture."""
    h, i, head = d.hidden, d.intermediate, d.head_dim or d.hidden // d.heads
    q, kv = d.heads * head, d.kv_heads * head
    if d.model_type in ("gpt_neox", "bloom", "falcon"):
        return {"query_key_value": (h, 3 * h), "dense": (h, h), "dense_h_to_4h": (h, i), "dense_4h_to_h": (i, h)}
    if d.model_type == "gpt2":
        return {"c_attn": (h, 3 * h), "c_proj": (h, h), "c_fc": (h, i), "c_proj_mlp": (i, h)}
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def parameter_counts(d: ModelDims) -> dict[str, int]:
    linear = sum(a * b for a, b in projections(d).values()) * d.layers
    embed = (d.vocab + d.positions) * d.hidden
    head = 0 if d.tied else d.vocab * d.hidden
    norms = d.layers * 4 * d.hidden + 2 * d.hidden
    return {"linear": linear, "embedding": embed, "head": head, "other": norms, "total": linear + embed + head + norms}
