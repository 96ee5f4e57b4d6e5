"""Model directories with the exact shape of a published checkpoint and random weights, for GPU memory
measurements on a machine that cannot download the real ones.

Peak memory does not depend on weight values, so random weights of the published architecture measure
what the real checkpoint would. The shapes come from hpclora's built-in table (models.KNOWN_DIMS), the
same numbers the planner uses. The tokenizer is the bundled SmolLM2 tokenizer retrained on the bundled
data to 8,000 tokens, so that every id fits any of these embeddings.

    python benchmarks/shaped_model.py config NAME DIR    # config.json + tokenizer (CPU, seconds)
    python benchmarks/shaped_model.py weights DIR        # random 16-bit weights (on the GPU machine)
    python benchmarks/shaped_model.py stand-in SOURCE DIR [--tiny]   # SOURCE's config and tokenizer, random weights
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from hpclora.catalog.models import KNOWN_DIMS  # noqa: E402


def hf_config(name: str) -> dict:
    model_type, hidden, layers, heads, kv_heads, intermediate, vocab, tied, _context = KNOWN_DIMS[name]
    common = {"model_type": model_type, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
              "intermediate_size": intermediate, "vocab_size": vocab, "tie_word_embeddings": tied, "max_position_embeddings": 4096,
              "bos_token_id": 1, "eos_token_id": 2}
    if model_type == "llama":
        return {**common, "architectures": ["LlamaForCausalLM"], "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-5, "hidden_act": "silu"}
    if model_type == "gpt_neox":  # OpenCALM: rotary on all dimensions, sequential residual
        return {**common, "architectures": ["GPTNeoXForCausalLM"], "hidden_act": "gelu", "rotary_pct": 1.0, "use_parallel_residual": False,
                "layer_norm_eps": 1e-5}
    if model_type == "bloom":  # ALiBi positions, 4 x hidden MLP
        return {**common, "architectures": ["BloomForCausalLM"], "layer_norm_epsilon": 1e-5}
    raise SystemExit(f"{name}: no config recipe for {model_type}")


def write_config(name: str, target: Path) -> None:
    from transformers import AutoTokenizer

    from hpclora.job.bundled import bundled_model_dir

    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps(hf_config(name), indent=2))
    texts = (ROOT / "configs" / "data" / "demo-ja-en.jsonl").read_text(encoding="utf-8").splitlines()
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir()).train_new_from_iterator(texts * 20, vocab_size=8000)
    tokenizer.save_pretrained(target)


def write_weights(target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(target)
    torch.manual_seed(0)  # the same stand-in on every machine
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(target)


# `stand-in --tiny`: the same architecture and tokenizer, a few layers of width 64 (the GPU check's CPU rehearsal)
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
COMPLETE = "COMPLETE"  # written last: a directory without it is an interrupted stand-in


def stand_in(source: Path, target: Path, tiny: bool) -> None:
    """A model directory of `source`'s config and tokenizer (a directory without weights) with random weights, made
    once: a directory holding COMPLETE is kept as it is."""
    if (target / COMPLETE).exists():
        return
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    if tiny:
        config = json.loads((target / "config.json").read_text())
        config.update({k: v for k, v in TINY.items() if k in config})
        if config["model_type"] == "gpt_neox":
            config["intermediate_size"] = 4 * TINY["hidden_size"]
        (target / "config.json").write_text(json.dumps(config, indent=1))
    write_weights(target)
    (target / COMPLETE).touch()


if __name__ == "__main__":
    if sys.argv[1] == "config":
        write_config(sys.argv[2], Path(sys.argv[3]))
    elif sys.argv[1] == "stand-in":
        stand_in(Path(sys.argv[2]), Path(sys.argv[3]), "--tiny" in sys.argv[4:])
    else:
        write_weights(Path(sys.argv[2]))
