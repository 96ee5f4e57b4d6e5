"""Load the base model (quantized or not), prepare it for training, and attach LoRA through PEFT."""

from __future__ import annotations

import os
from pathlib import Path

from .distributed import world
from ..errors import ModelNotFoundError, UserError
from ..internals import keep_4bit_layers_trainable
from ..catalog.models import BUNDLED, FAN_IN_FAN_OUT, target_modules_for
from ..catalog.hub import is_offline, local_model_path

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def resolve_model_path(name: str) -> str:
    """A local directory or hub id for `model.name`; the bundled small models (catalog.models.BUNDLED) by name."""
    from .bundled import bundled_model_dir

    if name in BUNDLED:
        return str(bundled_model_dir(name))
    local = local_model_path(name)
    return str(local) if local is not None else name


def from_pretrained(loader, name: str, model_cfg, **kwargs):
    """`loader.from_pretrained` on model.name (revision, remote code, offline), with a clear error when it
    cannot be found."""
    path = resolve_model_path(name)
    try:
        return loader.from_pretrained(
            path,
            revision=model_cfg.revision,
            trust_remote_code=model_cfg.trust_remote_code,
            local_files_only=is_offline() or Path(path).exists(),
            **kwargs,
        )
    except (OSError, ValueError) as exc:
        if Path(path).exists() and not isinstance(exc, OSError):
            raise
        where = os.environ.get("HF_HOME") or "~/.cache/huggingface"
        fix = (
            f"this node is offline and the Hugging Face cache ({where}) lacks it: run `hpclora stage CONFIG` on a node "
            "with internet first, or point model.name at a local directory"
            if is_offline()
            else "check model.name (a hub id like owner/name, or a local directory with config.json)"
        )
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(f"model.name: cannot load '{name}': {first}; {fix}") from None


def load_tokenizer(model_cfg):
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer, model_cfg.name, model_cfg)
    if tokenizer.eos_token_id is None:
        raise UserError(f"model.name: the tokenizer of '{model_cfg.name}' has no EOS token; responses could not be terminated")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of attention and loss anyway
    return tokenizer


def load_base(cfg, precision: str, device: str, sharded: bool = False):
    """The frozen base model in the run's precision, quantized with bitsandbytes when quant.bits is set.
    `sharded` (FSDP): 4-bit weights are packed into bf16 storage, which FSDP can shard (it cannot shard integers)
    and, computing in bf16, leaves as it is: storage of another dtype would be cast before each all-gather, which
    turns the packed 4-bit bytes into garbage. Quantized weights load onto this rank's GPU, where bitsandbytes
    quantizes them, whole, and FSDP then shards them: the planner counts that loading peak (plan.memory)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from . import varlen
    from ..catalog.precision import choose_compute_dtype

    dtype = getattr(torch, DTYPES[precision])
    kwargs = {"dtype": dtype}
    if cfg.model.attn_implementation != "auto":
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    if cfg.model.attn_implementation == varlen.NAME:
        varlen.register()
    if cfg.quant.bits:
        compute = getattr(torch, DTYPES[choose_compute_dtype(cfg.quant.compute_dtype, precision)])
        if cfg.quant.bits == 4:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=cfg.quant.type,
                bnb_4bit_use_double_quant=cfg.quant.double_quant,
                bnb_4bit_compute_dtype=compute,
                **({"bnb_4bit_quant_storage": torch.bfloat16} if sharded else {}),
            )
            if sharded:
                kwargs["dtype"] = torch.bfloat16
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        # Each rank loads its own quantized copy onto its node's GPU: LOCAL_RANK, never the global rank
        # (which names no GPU on a second node: "invalid device ordinal").
        kwargs["device_map"] = {"": world().local_rank} if device == "cuda" else {"": "cpu"}
    model = from_pretrained(AutoModelForCausalLM, cfg.model.name, cfg.model, **kwargs)
    model.config.use_cache = False  # training: no KV cache (also required for packed rows)
    return model


def choose_targets(model, lora_cfg) -> list[str] | str:
    """LoRA target module names: the architecture's default for `auto`, else the user's list, checked."""
    model_type = model.config.model_type
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if lora_cfg.target_modules == "auto":
        targets = target_modules_for(model_type)
        if targets is None:  # an architecture not in the table: every linear layer but the output head
            return "all-linear"
        return [t for t in targets if t in present]
    missing = [t for t in lora_cfg.target_modules if t not in present]
    if missing:
        import torch

        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"})
        raise UserError(
            f"lora.target_modules: {missing} not found in this {model_type} model; its linear layers are {linear}"
        )
    return list(lora_cfg.target_modules)


def prepare_quantized(model) -> None:
    """PEFT's prepare_model_for_kbit_training upcasts every 16-bit weight of a quantized model to fp32. Here
    only the 1-D ones go (norms and biases: a few MB, where 16-bit rounding would hurt); the embeddings and the
    output head stay in the compute dtype. The embedding's values are the checkpoint's 16-bit ones either way,
    and under autocast the head's matmul runs in the compute dtype whatever its weight's dtype, so the loss
    changes only by rounding (tests/test_model.py), while the fp32 copies are gone: BLOOM-7b1's 250k x 4096
    embedding, which is also its head, takes 2 GB instead of 4 GB of a 16 GB T4."""
    import torch

    for param in model.parameters():
        if param.ndim == 1 and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()


def recompute_only_first_layers(model, count: int | None) -> None:
    """Selective checkpointing: only the first `count` decoder layers recompute their activations (None: all).
    transformers' decoder layers recompute where their documented `gradient_checkpointing` flag is set."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers[count:] if count is not None else []:
        layer.gradient_checkpointing = False


def enable_checkpointing(model, kwargs: dict) -> None:
    """Activation checkpointing by the name transformers gives it now (`activation_checkpointing_enable`); the older
    `gradient_checkpointing_enable` warns of its removal in every job log, and is used only where the new one is not."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def attach_lora(model, cfg):
    """Wrap the base in a PEFT LoRA model; returns (model, target module names): a new adapter, or with model.adapter
    the adapter the run goes on from, trainable (its own LoRA settings; the lora section's do not apply). Activations
    are recomputed by the model's own layers under FSDP too: FSDP's activation checkpointing (accelerate's) would wrap
    every layer without saving the random state, so that LoRA dropout drew other masks in the recompute than in the
    forward and the gradients would not belong to the loss, and it would ignore train.checkpointed_layers."""
    from peft import LoraConfig, PeftModel, get_peft_model

    checkpointing = cfg.train.gradient_checkpointing is True
    if cfg.quant.bits:
        keep_4bit_layers_trainable(model)
        prepare_quantized(model)
    if checkpointing:  # non-reentrant: works with DDP and frozen inputs; the reentrant kind does neither well
        enable_checkpointing(model, {"use_reentrant": False})
        model.enable_input_require_grads()
        recompute_only_first_layers(model, cfg.train.checkpointed_layers)
    if cfg.model.adapter:
        try:
            peft_model = PeftModel.from_pretrained(model, cfg.model.adapter, is_trainable=True)
        except (OSError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"model.adapter: cannot load the adapter in {cfg.model.adapter} onto {cfg.model.name}: {first}") from None
        targets = peft_model.peft_config["default"].target_modules
        targets = sorted(targets) if isinstance(targets, (set, list)) else targets
    else:
        targets = choose_targets(model, cfg.lora)
        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=targets,
            bias=cfg.lora.bias,
            use_dora=cfg.lora.use_dora,
            fan_in_fan_out=model.config.model_type in FAN_IN_FAN_OUT,
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, lora)
    keep_trained_biases_in_fp32(peft_model, cfg)
    return peft_model, targets


def keep_trained_biases_in_fp32(model, cfg) -> None:
    """lora.bias (all, lora_only) trains the base's biases, which PEFT leaves in the base's dtype, unlike the LoRA
    weights it makes fp32. fp16 loss scaling cannot unscale fp16 gradients ("Attempting to unscale FP16
    gradients"), and bf16 updates lose the small steps: they train in fp32. A normalisation layer's weight goes
    with its bias (its kernel takes one dtype for both; autocast casts the activations). (bitsandbytes' layers
    cast theirs back to the dtype they compute in: in bf16 that costs rounding; in fp16 see
    catalog.precision.trained_bias_problem.)"""
    import torch

    half = (torch.float16, torch.bfloat16)
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if not any(p.requires_grad and p.dtype in half for p in own):
            continue
        for param in own:
            if param.dtype in half and (param.requires_grad or not isinstance(module, torch.nn.Linear)):
                param.data = param.data.float()
