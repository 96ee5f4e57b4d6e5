"""`hpclora merge`: fold a run's adapter into its base model and save a plain Hugging Face model.

The base is loaded unquantized in fp32 (also for QLoRA runs: a 4-bit base cannot hold the merged update
exactly), the adapter is merged with PEFT's safe merge (which refuses NaN), every merged weight is
checked for NaN/inf, and only then is the model cast to --dtype and written: safetensors, the tokenizer,
and MERGED_FROM.json naming the adapter (and its sha256) it came from. The output appears in one rename,
never half-written, and an existing directory is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from ..errors import UserError
from .adapter import checked_adapter
from .generate import note
from ..rundir import MERGED_DIR, staged

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def merge(run_dir: str | Path, out: str | Path | None = None, dtype: str = "fp16") -> Path:
    """`out` None: the run directory's merged/."""
    from ..config import load_run_config
    from ..job.model import load_tokenizer

    run = Path(run_dir)
    target = run / MERGED_DIR if out is None else Path(out).expanduser()
    adapter = checked_adapter(run)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"--out: {target} already exists and is not empty: choose a new directory (nothing is overwritten)")
    cfg = load_run_config(run / "config.yaml")
    note(f"merging {adapter} into {cfg.model.name}: loading the base in fp32 (minutes for a 7B model) ...")
    merged = merged_model(cfg, adapter, dtype, other_dtypes="use --dtype bf16 or fp32")
    target.parent.mkdir(parents=True, exist_ok=True)
    note(f"writing {target} ({weight_bytes(merged) / 1e9:.2f} GB of {dtype} safetensors) ...")
    with staged(target, needed_bytes=weight_bytes(merged)) as staging:  # an existing target is empty (checked above)
        save_merged(merged, load_tokenizer(cfg.model), staging)
        (staging / "MERGED_FROM.json").write_text(json.dumps(provenance(run, cfg, dtype), indent=2) + "\n", encoding="utf-8")
    return target


def merged_model(cfg, adapter: Path, dtype: str, other_dtypes: str):
    """The base with `adapter` folded in, every weight finite, cast to `dtype` (a DTYPES key). `other_dtypes` says what
    to do when the weights overflow `dtype`."""
    from ..job.quiet import quiet_libraries

    quiet_libraries()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ..job.model import from_pretrained

    base = from_pretrained(AutoModelForCausalLM, cfg.model.name, cfg.model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter))
    try:
        merged = model.merge_and_unload(safe_merge=True)
    except ValueError as exc:  # PEFT's safe merge: "NaNs detected in the merged weights"
        raise UserError(f"{adapter}: the adapter would corrupt the model ({exc}); nothing was written") from None
    bad = [name for name, p in merged.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise UserError(f"{adapter}: merged weights hold NaN or inf in {', '.join(bad[:3])}{' …' if len(bad) > 3 else ''}; nothing was written")
    merged = merged.to(getattr(torch, DTYPES[dtype]))
    overflow = [name for name, p in merged.named_parameters() if not torch.isfinite(p).all()]
    if overflow:
        raise UserError(f"the merged weights overflow {dtype} in {', '.join(overflow[:3])}; {other_dtypes}. Nothing was written")
    return merged


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def save_merged(merged, tokenizer, directory: Path) -> None:
    """A merged model as a plain Hugging Face directory: safetensors and the run's tokenizer."""
    merged.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def provenance(run: Path, cfg, dtype: str) -> dict:
    return {**adapter_provenance(run, cfg), "dtype": dtype, "merged_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def adapter_provenance(run: Path, cfg) -> dict:
    """Where a merged or exported model's adapter came from: what MERGED_FROM.json and EXPORTED_FROM.json share."""
    adapter = run / "adapter"
    weights = next((adapter / f for f in ("adapter_model.safetensors", "adapter_model.bin") if (adapter / f).is_file()), None)
    summary = run / "summary.json"
    return {
        "base_model": cfg.model.name,
        "base_revision": cfg.model.revision,
        "adapter": str(adapter.resolve()),
        "adapter_sha256": hashlib.sha256(weights.read_bytes()).hexdigest() if weights else None,
        "run_config_sha256": hashlib.sha256((run / "config.yaml").read_bytes()).hexdigest(),
        "trained_quantized": f"{cfg.quant.bits}-bit" if cfg.quant.bits else None,
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha},
        "template": cfg.data.template,  # the prompt format it was trained in (hpclora chat uses it)
        "final_val_loss": json.loads(summary.read_text()).get("final_val_loss") if summary.is_file() else None,
    }
