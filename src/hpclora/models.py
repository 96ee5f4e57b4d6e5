"""What hpclora knows about model architectures without downloading anything.

LoRA target modules per `model_type`: the attention and MLP projections, which is what the QLoRA paper
found necessary to match full fine-tuning. The planner (memory/time) will extend this table with
dimensions of known checkpoints.
"""

from __future__ import annotations

LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

TARGET_MODULES: dict[str, list[str]] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "gemma": LLAMA_LIKE,
    "gemma2": LLAMA_LIKE,
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


def target_modules_for(model_type: str) -> list[str] | None:
    """The default LoRA targets for an architecture, or None when it is not in the table."""
    return TARGET_MODULES.get(model_type)
