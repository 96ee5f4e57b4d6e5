"""Peak memory of one training rank, by component: pure arithmetic on the model's dimensions and the run's config.

Pure arithmetic on the model's dimensions (from a config.json on disk or in the HF cache, else the
table in models.py) and the run's config. No torch: this runs on login nodes in well under a second.

Memory model (bytes; T = micro_batch x sequence tokens, e = bytes per element of the compute dtype),
calibrated against hpclora's own training path on a GPU and on CPU (benchmarks/plan_vs_measured.py,
results in benchmarks/results/):
- frozen weights: e per parameter; under quantization nf4 (0.5 B + constants) or int8 for the linear
  layers, e for the embeddings and head, fp32 for the norms (model.prepare_quantized);
- LoRA: r x (in + out) per adapted projection; fp32 weights, fp32 gradients, optimizer states;
- activations kept per token and layer: ACT_H x hidden + ACT_I x intermediate values; LoRA dropout keeps
  a dropped copy (e bytes) and a mask (1 byte) of each adapted input; quantized models carry an fp32
  residual stream (QUANT_EXTRA_H); with gradient checkpointing a recomputing layer keeps only its input,
  and one layer is recomputed at a time (train.checkpointed_layers: the others keep everything);
- eager attention (BLOOM, or model.attn_implementation=eager): scores and probabilities per head;
- logits: T x vocab, in the compute dtype plus the fp32 upcast and its gradient for the loss (more on CPU),
  where T is at most loss.CHUNK_ROWS labelled positions on the default loss path;
- GPUs: the caching allocator's slack (fixed part plus the blocks of the fp32 logits it keeps) and the
  CUDA context; CPU: the interpreter and libraries.

Preference methods on pairs (method.name dpo, orpo, simpo) run each micro-batch of pairs as twice as many rows (every
chosen and every rejected answer beside its prompt); kto's rows are one answer each. The reference's no-grad passes
(and kto's over each prompt with another row's answer) keep nothing for the backward pass;
a starting adapter (model.adapter) is kept once more as the frozen reference (fp32 weights only). TRL scores the
answers through its output head in tiles of positions by vocabulary entries (internals.TRL_HEAD_POSITIONS, _COLUMNS).

Several ranks (slurm.nodes x slurm.gpus): under DDP every GPU holds the whole of the above (a replica)
for its own micro-batch. Under FSDP (full shard, per decoder layer, as accelerate wraps it) the weights,
LoRA gradients and optimizer states are divided by the world size; what is gathered at a time is added
back: two decoder layers (the one computing and the one prefetched) and the output head, which stays
gathered for the whole step. Quantized weights under FSDP are loaded whole onto each GPU first (bitsandbytes
quantizes there), then sharded: the loading peak counts too."""

from __future__ import annotations

from ..catalog.devices import Device
from ..catalog.dims import ModelDims, parameter_counts, projections
from ..catalog.models import CHUNK_ROWS, EAGER_ONLY, HEAD_ONLY_LOGITS, target_modules_for
from ..config import RunConfig
from ..internals import TRL_HEAD_COLUMNS, TRL_HEAD_POSITIONS

GB = 1e9


# Activation values kept per token and layer for the backward pass without dropout: inputs of the norms
# and projections, q/k/v and attention output, the MLP's gate/up/activation products. Fitted on a
# Llama-2-7B-shaped model (H100, bf16: 68k values per token and layer, 6 x 4096 + 4 x 11008).
ACT_H, ACT_I = 6, 4


QUANT_EXTRA_H = 9  # 4/8-bit bases with 16-bit compute: fp32 residual stream and per-projection input casts


SLACK_GB, SLACK_LOGITS = 0.35, 1  # allocator: fixed reserve + the size of the fp32 logits (its largest transient block)


CPU_BASELINE_GB = 0.9  # python + torch + transformers + datasets, resident before any weight is loaded


# On CPU the loss materialises more fp32 (token x vocab) tensors than on a GPU (softmax, the gradients of
# nll, log-softmax and the head), and peak RSS counts them together: 4 copies on top of the 3 above,
# measured on SmolLM2-135M, whose 49k vocabulary makes this the larger part of a small model's peak.
CPU_LOGITS_EXTRA = 4


# Peak RSS on CPU holds more per token and layer than the GPU fit: about 1.2 copies of every LoRA-adapted
# projection's input, even with gradient checkpointing, and a quarter more of the other activations without
# it (SFT; TRL's preference trainers show none of that quarter). Fitted on SmolLM2-135M (fp32, 256 to 8,192
# tokens per micro-batch, q/v and all seven projections, with and without checkpointing): within 7% of the
# measured peak RSS from 2,048 tokens up, and above it below
# (benchmarks/results/plan_vs_measured.txt, throughput.txt).
CPU_LORA_INPUT_COPIES, CPU_ACT_EXTRA = 1.2, 0.25


# Bytes per entry of a tile of TRL's fused log-probability head (internals.TRL_HEAD_POSITIONS positions by
# TRL_HEAD_COLUMNS vocabulary entries) that it keeps at its peak on a CPU, where it scores every position: fitted on
# SmolLM2-135M (DPO and KTO, 256 and 512 tokens, 1 to 4 pairs, with and without checkpointing:
# benchmarks/results/plan_vs_measured_dpo.txt). On a GPU: the tile in the compute dtype, and the fp32 gradient tile.
PREFERENCE_CPU_HEAD_BYTES = 20


def rows_per_micro_batch(cfg: RunConfig, micro_batch: int) -> int:
    """Sequences one micro-batch trains on: a pair method's pairs are two each (kto's rows are one answer each; the
    KL rows beside them are forwarded without gradients)."""
    return micro_batch * (2 if cfg.method.name not in ("sft", "kto") else 1)


def eager_attention(d: ModelDims, cfg: RunConfig) -> bool:
    """Whether attention materialises the (sequence x sequence) matrices: eager kernels do, sdpa does not."""
    return cfg.model.attn_implementation == "eager" or (cfg.model.attn_implementation == "auto" and d.model_type in EAGER_ONLY)


def lora_targets(d: ModelDims, targets) -> list[str]:
    """The projection names LoRA adapts: the architecture's default for `auto`, else the configured list."""
    names = (target_modules_for(d.model_type) or list(projections(d))) if targets == "auto" else list(targets)
    if d.model_type == "gpt2" and "c_proj" in names:
        names = [*names, "c_proj_mlp"]  # GPT-2 has a c_proj in attention and in the MLP
    return [n for n in names if n in projections(d)]


def lora_parameters(d: ModelDims, r: int, targets) -> int:
    shapes = projections(d)
    return sum(r * (shapes[n][0] + shapes[n][1]) for n in lora_targets(d, targets)) * d.layers


def memory_gb(d: ModelDims, cfg: RunConfig, device: Device, precision: str, micro_batch: int,
              strategy: str = "ddp", world: int = 1) -> dict[str, float]:
    """Peak memory of one rank by component, in GB, for one micro-batch of full-length rows; `strategy`
    fsdp shards weights, LoRA gradients and optimizer states over `world` ranks (ddp: a replica on each)."""
    e = 4 if precision == "fp32" else 2
    counts = parameter_counts(d)
    bits = cfg.quant.bits
    # Embeddings and head stay in the compute dtype, also when quantized (model.prepare_quantized); norms are fp32.
    frozen_rest = (counts["total"] - counts["linear"] - counts["other"]) * e + counts["other"] * (4 if bits else e)
    if bits == 4:
        constants = (1 + 4 / 256) / 64 if cfg.quant.double_quant else 4 / 64  # absmax per 64 weights (itself quantized)
        weights = counts["linear"] * (0.5 + constants) + frozen_rest
    elif bits == 8:
        weights = counts["linear"] * (1 + 4 / d.hidden) + frozen_rest
    else:
        weights = counts["total"] * e
    names = lora_targets(d, cfg.lora.target_modules)
    lora = lora_parameters(d, cfg.lora.r, cfg.lora.target_modules)
    optimizer_bytes = {"adamw_torch": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "paged_adamw_32bit": 8, "sgd": 0}[cfg.train.optimizer]
    lora_bytes = lora * (4 + 4)  # fp32 weights and gradients
    if cfg.method.name != "sft" and cfg.model.adapter:
        lora_bytes += lora * 4  # the frozen reference copy of the starting adapter
    optimizer = lora * optimizer_bytes
    whole_weights = weights
    if strategy == "fsdp" and world > 1:
        per_layer_weights = (weights - frozen_rest) / d.layers + 4 * d.hidden * (4 if bits else e)
        head = d.vocab * d.hidden * e  # gathered for the whole step (tied: it is the embedding)
        weights = weights / world + 2 * per_layer_weights + head
        lora_bytes, optimizer = lora_bytes / world, optimizer / world

    sequences = rows_per_micro_batch(cfg, micro_batch)
    tokens = sequences * cfg.data.max_length
    gated = "gate_proj" in projections(d)  # SwiGLU keeps gate, up, their activation and product; GELU MLPs two
    per_layer = (ACT_H * d.hidden + (ACT_I if gated else ACT_I // 2) * d.intermediate) * e  # bytes per token and layer
    if cfg.lora.dropout > 0:
        shapes = projections(d)
        per_layer += (e + 1) * sum(shapes[n][0] for n in names)
    residual = 4 if bits else e
    if bits and e == 2:
        per_layer += QUANT_EXTRA_H * d.hidden * e
    # Checkpointed layers keep only their input, and one of them at a time has its activations recomputed;
    # the other layers keep all of theirs.
    recomputed = recomputed_layers(cfg, d)
    kept = d.layers - recomputed + (1 if recomputed else 0)
    activations = tokens * (kept * per_layer + recomputed * d.hidden * residual)
    if device.name == "cpu":  # what CPU kernels keep beyond the GPU fit, per token and layer (fitted: see CPU_LORA_INPUT_COPIES)
        adapted_inputs = sum(projections(d)[n][0] for n in names)
        extra = CPU_ACT_EXTRA if cfg.method.name == "sft" else 0
        activations += tokens * (d.layers * CPU_LORA_INPUT_COPIES * e * adapted_inputs + (d.layers - recomputed) * extra * per_layer)
    if eager_attention(d, cfg):  # scores and probabilities of every head, kept per layer (sdpa keeps neither)
        attention = sequences * d.heads * cfg.data.max_length ** 2 * (2 * e + 4)
        activations += attention * kept
    # The loss sees the logits of at most CHUNK_ROWS labelled positions at a time (loss.py), except where the
    # model's own loss runs on the full logits: architectures outside HEAD_ONLY_LOGITS, and FSDP's sharded head.
    full_logits = d.model_type not in HEAD_ONLY_LOGITS or (strategy == "fsdp" and world > 1)
    if cfg.method.name != "sft":
        head_entries = min(tokens, TRL_HEAD_POSITIONS) * min(d.vocab, TRL_HEAD_COLUMNS)  # one tile
        logits = head_entries * (PREFERENCE_CPU_HEAD_BYTES if device.name == "cpu" else e + 4)
    else:
        head_entries = (tokens if full_logits else min(tokens, CHUNK_ROWS)) * d.vocab
        logits = head_entries * (e + 4 + 4 + (4 * CPU_LOGITS_EXTRA if device.name == "cpu" else 0))
    parts = {"weights_gb": weights / GB, "lora_gb": lora_bytes / GB, "optimizer_gb": optimizer / GB,
             "activations_gb": activations / GB, "logits_gb": logits / GB}
    if device.name == "cpu":
        parts["runtime_gb"] = CPU_BASELINE_GB
    else:
        parts["allocator_gb"] = SLACK_GB + SLACK_LOGITS * head_entries * 4 / GB
        parts["runtime_gb"] = device.context_gb
    parts["peak_gb"] = sum(parts.values())
    if strategy == "fsdp" and world > 1 and bits == 4 and device.name != "cpu":
        # bitsandbytes quantizes on the GPU, so each rank loads the whole quantized model onto its GPU before FSDP
        # shards it (model.load_base): that moment is a peak of its own.
        parts["loading_gb"] = (whole_weights + SLACK_GB * GB) / GB + device.context_gb
        parts["peak_gb"] = max(parts["peak_gb"], parts["loading_gb"])
    return {k: round(v, 3) for k, v in parts.items()}


def recomputed_layers(cfg: RunConfig, d: ModelDims) -> int:
    """How many decoder layers recompute their activations (train.checkpointed_layers, all by default)."""
    if cfg.train.gradient_checkpointing is not True:
        return 0
    return min(cfg.train.checkpointed_layers or d.layers, d.layers)
