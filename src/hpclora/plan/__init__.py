"""`hpclora plan`: will this run fit, with which precision, micro-batch and time, on which GPU?

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

Several ranks (slurm.nodes x slurm.gpus): under DDP every GPU holds the whole of the above (a replica)
for its own micro-batch. Under FSDP (full shard, per decoder layer, as accelerate wraps it) the weights,
LoRA gradients and optimizer states are divided by the world size; what is gathered at a time is added
back: two decoder layers (the one computing and the one prefetched) and the output head, which stays
gathered for the whole step."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field

from ..config import RunConfig
from ..errors import ConfigError, UserError
from ..catalog.hub import cached_model_file, hf_home, hub_model_id, local_model_path
from ..job.loss import CHUNK_ROWS, HEAD_ONLY_LOGITS
from ..catalog.models import EAGER_ONLY, KNOWN_DIMS, packing_choice, target_modules_for
from ..config.slurm_syntax import preempt_grace_problem, slurm_mem_gb, slurm_seconds, slurm_time

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
# it. Fitted on SmolLM2-135M (fp32, 256 to 8,192 tokens per micro-batch, q/v and all seven projections, with
# and without checkpointing): within 7% of the measured peak RSS from 2,048 tokens up, and above it below
# (benchmarks/results/plan_vs_measured.txt, throughput.txt).
CPU_LORA_INPUT_COPIES, CPU_ACT_EXTRA = 1.2, 0.25


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


@dataclass(frozen=True)
class Device:
    name: str
    memory_gb: float  # what the job can use
    bf16: bool
    tflops: float  # dense fp16/bf16 tensor-core peak (fp32 for cpu), from vendor data sheets
    context_gb: float  # CUDA context + cuBLAS/cuDNN workspaces


# Peak dense half-precision throughput per data sheet; `cpu` is this project's reference machine (2 cores,
# fp32 measured at 184 GFLOP/s).
DEVICES = {
    d.name: d
    for d in (
        Device("v100-16gb", 16.0, False, 125.0, 0.6),
        Device("v100-32gb", 32.0, False, 125.0, 0.6),
        Device("t4-16gb", 15.0, False, 65.0, 0.5),
        Device("a100-40gb", 40.0, True, 312.0, 0.7),
        Device("a100-80gb", 80.0, True, 312.0, 0.7),
        Device("h100-80gb", 80.0, True, 989.0, 0.8),
        Device("l4-24gb", 22.5, True, 121.0, 0.5),
        Device("rtx3060-12gb", 12.0, True, 51.0, 0.5),
        Device("cpu", 0.0, False, 0.184, 0.0),
    )
}
# Share of peak FLOPs a LoRA fine-tune reaches (measured: H100 on a Llama-2-7B shape, 2-core CPU on
# SmolLM2-135M). Smaller GPU models use the card less well (kernel launches, element-wise work on
# activations and logits): x sqrt(hidden / 4096), and x 0.5 more for eager attention (fitted on
# OpenCALM-1b and BLOOM-560m shapes). QLoRA de-quantizes every weight twice per step.
EFFICIENCY = {"gpu": 0.25, "cpu": 0.45, "qlora": 0.75, "eager": 0.5}
# Selective checkpointing (auto) recomputes as few layers as keep the peak within this share of the usable
# memory: the planner's peaks are within ~10% of measured ones, and a job that runs out of memory has waited
# in the queue for nothing. Where no partial count fits that, every layer recomputes.
SELECTIVE_HEADROOM = 0.9
# Share of N x one rank's tokens/s that N ranks reach: (within one node, across nodes). Assumed, not
# measured here (no machine with several GPUs): DDP all-reduces only the LoRA gradients (megabytes) once
# per step and overlaps it with the backward pass; FSDP all-gathers the frozen weights in the forward and
# again in the backward pass, which inter-node links (InfiniBand, Ethernet) hide less well than NVLink.
SCALING = {"ddp": (0.95, 0.85), "fsdp": (0.85, 0.7)}
# CPU jobs: the `cpu` device's peak is this project's 2-core reference machine; a job with C cores
# (slurm.cpus_per_task) reaches (C / 2) ** CPU_CORE_EXPONENT of that, not C / 2: matmuls share the memory
# bandwidth and the element-wise work scales worse. Fitted on one report: Swallow-7B LoRA (q/v, 256
# tokens, fp32, checkpointing) on 16 cores took about 5 days for an epoch of dolly-15k-ja, where 2 cores
# plan 22 days (22 / 8 ** 0.7 = 5.1). `hpclora probe` replaces this with a measurement.
CPU_REFERENCE_CORES, CPU_CORE_EXPONENT = 2, 0.7


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
    )


def find_dims(cfg: RunConfig) -> tuple[ModelDims, str]:
    """The model's dimensions and where they came from: local directory, HF cache, or the built-in table."""
    name = cfg.model.name
    candidates, local = [], local_model_path(name)
    if local is not None:
        candidates.append(local / "config.json")
    elif hub_model_id(name) and (cached := cached_model_file(cfg, "config.json")) is not None:
        candidates.append(cached)
    for path in candidates:
        if path.is_file():
            return dims_from_config(json.loads(path.read_text(encoding="utf-8"))), str(path)
    if name in KNOWN_DIMS:
        return ModelDims(*KNOWN_DIMS[name]), "built-in table"
    raise UserError(
        f"model.name: no dimensions known for '{name}' here (no config.json on disk or in the HF cache at "
        f"{hf_home(cfg)}, and not in the built-in table). Run `hpclora stage CONFIG` to fetch it, or point "
        "model.name at a local directory holding its config.json"
    )


def projections(d: ModelDims) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer in one block, by module name, per architecture."""
    h, i, head = d.hidden, d.intermediate, d.hidden // d.heads
    kv = d.kv_heads * head
    if d.model_type in ("gpt_neox", "bloom", "falcon"):
        return {"query_key_value": (h, 3 * h), "dense": (h, h), "dense_h_to_4h": (h, i), "dense_4h_to_h": (i, h)}
    if d.model_type == "gpt2":
        return {"c_attn": (h, 3 * h), "c_proj": (h, h), "c_fc": (h, i), "c_proj_mlp": (i, h)}
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def parameter_counts(d: ModelDims) -> dict[str, int]:
    linear = sum(a * b for a, b in projections(d).values()) * d.layers
    embed = (d.vocab + d.positions) * d.hidden
    head = 0 if d.tied else d.vocab * d.hidden
    norms = d.layers * 4 * d.hidden + 2 * d.hidden
    return {"linear": linear, "embedding": embed, "head": head, "other": norms, "total": linear + embed + head + norms}


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


def precision_for(cfg: RunConfig, device: Device) -> tuple[str, str]:
    from ..catalog.precision import choose_precision

    return choose_precision(cfg.train.precision, "cpu" if device.name == "cpu" else "cuda", device.bf16)


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
    optimizer = lora * optimizer_bytes
    if strategy == "fsdp" and world > 1:
        per_layer_weights = (weights - frozen_rest) / d.layers + 4 * d.hidden * (4 if bits else e)
        head = d.vocab * d.hidden * e  # gathered for the whole step (tied: it is the embedding)
        weights = weights / world + 2 * per_layer_weights + head
        lora_bytes, optimizer = lora_bytes / world, optimizer / world

    tokens = micro_batch * cfg.data.max_length
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
        activations += tokens * (d.layers * CPU_LORA_INPUT_COPIES * e * adapted_inputs + (d.layers - recomputed) * CPU_ACT_EXTRA * per_layer)
    if eager_attention(d, cfg):  # scores and probabilities of every head, kept per layer (sdpa keeps neither)
        attention = micro_batch * d.heads * cfg.data.max_length ** 2 * (2 * e + 4)
        activations += attention * kept
    # The loss sees the logits of at most CHUNK_ROWS labelled positions at a time (loss.py), except where the
    # model's own loss runs on the full logits: architectures outside HEAD_ONLY_LOGITS, and FSDP's sharded head.
    full_logits = d.model_type not in HEAD_ONLY_LOGITS or (strategy == "fsdp" and world > 1)
    loss_rows = tokens if full_logits else min(tokens, CHUNK_ROWS)
    logits = loss_rows * d.vocab * (e + 4 + 4 + (4 * CPU_LOGITS_EXTRA if device.name == "cpu" else 0))
    parts = {"weights_gb": weights / GB, "lora_gb": lora_bytes / GB, "optimizer_gb": optimizer / GB,
             "activations_gb": activations / GB, "logits_gb": logits / GB}
    if device.name == "cpu":
        parts["runtime_gb"] = CPU_BASELINE_GB
    else:
        parts["allocator_gb"] = SLACK_GB + SLACK_LOGITS * loss_rows * d.vocab * 4 / GB
        parts["runtime_gb"] = device.context_gb
    parts["peak_gb"] = sum(parts.values())
    return {k: round(v, 3) for k, v in parts.items()}


@dataclass
class Plan:
    model: str
    dims_source: str
    device: str
    params_total: int
    params_trainable: int
    precision: str
    precision_reason: str
    micro_batch: int  # what the config asks for (per rank)
    weights_gb: float
    optimizer_gb: float  # LoRA weights, gradients and optimizer states
    activations_gb: float  # activations and logits at the configured micro-batch
    peak_gb: float  # per GPU (per rank), with the chosen strategy
    capacity_gb: float
    fits: bool
    max_micro_batch: int  # the largest that fits (0: not even one row)
    grad_accum: int  # keeps micro_batch x grad_accum when the micro-batch has to shrink
    steps: int | None
    tokens_per_s: float  # the whole world's
    tokens_per_s_note: str
    time: str | None  # estimated wall time of the training, HH:MM:SS
    recommended: dict
    breakdown: dict
    nodes: int = 1
    ranks_per_node: int = 1
    world_size: int = 1
    strategy: str = "single"  # single (one rank), ddp or fsdp
    strategy_reason: str = ""
    peak_by_strategy_gb: dict = field(default_factory=dict)  # per-GPU peak under ddp and fsdp (several ranks)
    scaling_efficiency: float = 1.0
    quantized_4bit: bool = False
    gradient_checkpointing: bool = False  # train.gradient_checkpointing, `auto` resolved
    checkpointed_layers: int | None = None  # train.checkpointed_layers, `auto` resolved (None: all)
    checkpointing_reason: str = ""
    packing: bool = False  # data.packing, `auto` resolved for the architecture
    packing_reason: str = ""
    peak_note: str = ""  # where a measured peak replaced the estimate (hpclora probe)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def known_devices() -> dict[str, Device]:
    """The built-in GPU table and the user's own GPU types (gpus.json: see calibration.py)."""
    from .calibration import user_gpus

    user = {n: Device(n, g["memory_gb"], g["bf16"], g["tflops"], g["context_gb"]) for n, g in user_gpus().items()}
    return {**DEVICES, **user}


def gpu_aliases() -> dict[str, str]:
    """sinfo GPU types (lower case) that name one of the user's GPU types."""
    from .calibration import user_gpus

    return {t: name for name, g in user_gpus().items() for t in g["sinfo_types"]}


def device_for(cfg: RunConfig, name: str | None) -> Device:
    devices = known_devices()
    if name is None:
        if cfg.slurm.gpus == 0:
            name = "cpu"
        elif cfg.slurm.gpu_type:  # the smallest card of that type: a plan that fits there fits on all
            wanted = cfg.slurm.gpu_type.lower()
            matches = sorted((d for d in devices.values() if d.name.split("-")[0] == wanted or gpu_aliases().get(wanted) == d.name),
                             key=lambda d: d.memory_gb)
            if not matches:
                raise UserError(f"slurm.gpu_type: no planner data for '{cfg.slurm.gpu_type}': pass --gpu NAME ({', '.join(devices)}), "
                                f"or describe it in {gpus_file()}")
            name = matches[0].name
        else:
            raise UserError(f"plan: which GPU? pass --gpu NAME ({', '.join(devices)}) or set slurm.gpu_type")
    if name not in devices:
        raise UserError(f"--gpu: unknown '{name}': one of {', '.join(devices)}, or describe it in {gpus_file()}")
    return devices[name]


def gpus_file() -> str:
    from .calibration import GPU_EXAMPLE, GPUS_FILE
    from ..launch.registry import state_dir

    return f"{state_dir() / GPUS_FILE} (e.g. {GPU_EXAMPLE})"


def planned_steps(cfg: RunConfig) -> int | None:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    from .preflight import check_data

    checked = check_data(cfg)  # every row read once per file version, by the login node's data check
    if checked is None:
        return None
    rows = checked["rows"]  # (data.max_rows already applied)
    val = int(cfg.data.val_size) if cfg.data.val_size >= 1 else int(rows * cfg.data.val_size)
    per_epoch = math.ceil(max(rows - val, 1) / (cfg.train.micro_batch_size * cfg.train.grad_accum * world_size(cfg)))
    return max(1, math.ceil(per_epoch * cfg.train.epochs))


def world_size(cfg: RunConfig) -> int:
    """Training ranks: slurm.gpus (train.cpu_ranks on CPU jobs) on each of slurm.nodes."""
    return cfg.slurm.nodes * (cfg.slurm.gpus or cfg.train.cpu_ranks)


def choose_strategy(cfg: RunConfig, device: Device, smallest: dict[str, float], usable: float) -> tuple[str, str]:
    """How several ranks share the work: the configured strategy, or for `auto` DDP when a replica fits a
    GPU (at micro-batch 1 at least: `smallest` peaks), else FSDP where a shard fits (bf16 GPUs)."""
    if world_size(cfg) == 1:
        return "single", "one rank"
    if cfg.train.distributed != "auto":
        return cfg.train.distributed, "train.distributed"
    if device.name == "cpu":
        return "ddp", "CPU ranks train with DDP"
    if smallest["ddp"] <= usable:
        return "ddp", "a replica fits each GPU"
    if smallest["fsdp"] <= usable and device.bf16:
        return "fsdp", f"a replica does not fit a GPU; sharded over {world_size(cfg)} GPUs it does"
    if smallest["fsdp"] <= usable:
        return "ddp", f"a shard would fit, but FSDP trains in bf16, which {device.name} lacks: try quant.bits=4"
    return "ddp", "neither a replica nor a shard fits a GPU: see the advice below"


def strategy_problem(strategy: str, device: Device, precision: str) -> str | None:
    """Why FSDP cannot run on this device, with the alternative; None when it can."""
    if strategy == "fsdp" and (device.name == "cpu" or precision != "bf16"):
        return (f"FSDP trains in bf16 on GPUs, and {device.name} " + ("is a CPU" if device.name == "cpu" else f"would train in {precision}")
                + ": use train.distributed=ddp (with quant.bits=4 where a replica does not fit)")
    return None


def recomputed_layers(cfg: RunConfig, d: ModelDims) -> int:
    """How many decoder layers recompute their activations (train.checkpointed_layers, all by default)."""
    if cfg.train.gradient_checkpointing is not True:
        return 0
    return min(cfg.train.checkpointed_layers or d.layers, d.layers)


def cpu_speedup(cores: int) -> float:
    """How many times faster than the reference cores a CPU job with `cores` cores trains (CPU_CORE_EXPONENT)."""
    return (cores / CPU_REFERENCE_CORES) ** CPU_CORE_EXPONENT


def with_checkpointing(cfg: RunConfig, on: bool, layers: int | None = None) -> RunConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, gradient_checkpointing=on, checkpointed_layers=layers))


def make_plan(cfg: RunConfig, gpu: str | None = None, device: Device | None = None, capacity_gb: float | None = None,
              calibrated: bool = False) -> Plan:
    """The plan for `cfg` on the GPU named `gpu` (or slurm.gpu_type, or the CPU for slurm.gpus: 0); a training
    process passes the `device` it runs on and the memory it has (`capacity_gb`) instead. `calibrated`: use
    what a probe job measured for this device and model (calibration.py) instead of the built-in estimate."""
    device = device or device_for(cfg, gpu)
    dims, source = find_dims(cfg)
    packing, packing_why = packing_choice(cfg.data.packing, dims.model_type, cfg.data.max_length)
    precision, why = precision_for(cfg, device)
    counts = parameter_counts(dims)
    trainable = lora_parameters(dims, cfg.lora.r, cfg.lora.target_modules)
    if capacity_gb is not None:
        capacity = capacity_gb
    else:
        capacity = slurm_mem_gb(cfg.slurm.mem) if device.name == "cpu" else device.memory_gb  # CPU: the job's RAM
    usable = capacity * 0.95
    world = world_size(cfg)
    per_node = cfg.slurm.gpus or cfg.train.cpu_ranks
    if device.name == "cpu" and world > 1:
        capacity = usable = capacity / per_node  # the ranks of a node share the job's memory

    def layout(c: RunConfig) -> tuple[str, str, dict, dict]:
        """(strategy, why, its parts at the configured micro-batch, per-strategy peaks) for config `c`."""
        peaks = {s: memory_gb(dims, c, device, precision, c.train.micro_batch_size, s, world)["peak_gb"] for s in ("ddp", "fsdp")} if world > 1 else {}
        smallest = {s: memory_gb(dims, c, device, precision, 1, s, world)["peak_gb"] for s in peaks}
        strategy, strategy_why = choose_strategy(c, device, smallest, usable)
        return strategy, strategy_why, memory_gb(dims, c, device, precision, c.train.micro_batch_size, strategy, world), peaks

    setting = cfg.train.gradient_checkpointing
    if setting == "auto":  # off wherever the run fits without it: recomputing a layer costs a third more of its compute
        plain = layout(with_checkpointing(cfg, False))
        checkpointing, layers = plain[2]["peak_gb"] > usable, None
        checkpointing_why = f"auto: the run fits in {capacity:.1f} GB without it ({plain[2]['peak_gb']:.1f} GB)"
        if checkpointing:  # as few recomputing layers as fit with headroom: each one more saves a layer's activations
            target = usable * SELECTIVE_HEADROOM
            layers = next((n for n in range(1, dims.layers) if layout(with_checkpointing(cfg, True, n))[2]["peak_gb"] <= target), None)
            checkpointing_why = (f"auto: without it the run needs {plain[2]['peak_gb']:.1f} GB, more than the {usable:.1f} GB it may use "
                                 f"(95% of {capacity:.1f} GB); {layers or dims.layers} of {dims.layers} layers recompute")
        cfg = with_checkpointing(cfg, checkpointing, layers)
    else:
        checkpointing_why = f"train.gradient_checkpointing={str(bool(setting)).lower()}"
        if setting and cfg.train.checkpointed_layers:
            checkpointing_why += f", {recomputed_layers(cfg, dims)} of {dims.layers} layers recompute"
    checkpointing = cfg.train.gradient_checkpointing is True
    strategy, strategy_why, parts, peaks = layout(cfg)

    def peak(strategy: str, micro: int) -> dict[str, float]:
        return memory_gb(dims, cfg, device, precision, micro, strategy, world)

    max_micro = 0
    for b in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        if peak(strategy, b)["peak_gb"] <= usable:
            max_micro = b
    micro = min(cfg.train.micro_batch_size, max_micro) if max_micro else 0
    effective = cfg.train.micro_batch_size * cfg.train.grad_accum
    accum = math.ceil(effective / micro) if micro else cfg.train.grad_accum

    # Tokens/s from the device's peak FLOPs: forward 2N, backward (input gradients only: the base is
    # frozen) 2N, recomputation 2N more for the share of layers that recompute; causal attention on top.
    per_token = (4 + 2 * recomputed_layers(cfg, dims) / dims.layers) * counts["total"]
    per_token += 3 * 2 * dims.layers * dims.hidden * cfg.data.max_length
    efficiency = EFFICIENCY["cpu" if device.name == "cpu" else "gpu"] * (EFFICIENCY["qlora"] if cfg.quant.bits else 1)
    if device.name != "cpu":
        efficiency *= min(1.0, dims.hidden / 4096) ** 0.5 * (EFFICIENCY["eager"] if eager_attention(dims, cfg) else 1)
    peak_flops = device.tflops * 1e12
    if device.name == "cpu":  # the node's cores, shared by its ranks
        peak_flops *= cpu_speedup(cfg.slurm.cpus_per_task) / per_node
    rank_tokens_per_s = peak_flops * efficiency / per_token
    scaling = 1.0 if world == 1 else SCALING[strategy][0 if cfg.slurm.nodes == 1 else 1]
    tokens_per_s = rank_tokens_per_s * world * scaling
    measured = None
    if calibrated:
        from . import calibration

        measured = calibration.find(device.name, cfg.model.name)
    steps = planned_steps(cfg)
    note = f"estimate: {device.tflops} TFLOP/s peak x {efficiency:.2f} (efficiency measured on an H100 and a 2-core CPU)"
    if device.name == "cpu":
        note = (f"estimate: {device.tflops} TFLOP/s of {CPU_REFERENCE_CORES} cores x {cpu_speedup(cfg.slurm.cpus_per_task):.2f} for "
                f"{cfg.slurm.cpus_per_task} cores x {efficiency:.2f} efficiency (cores scaling fitted on one report; `hpclora probe` measures)")
    if world > 1:
        note += f"; {world} ranks x {scaling:.2f} scaling ({strategy.upper()} {'within a node' if cfg.slurm.nodes == 1 else 'across nodes'}: assumed, not measured)"
    peak_gb, peak_note = parts["peak_gb"], ""
    if measured is not None:  # this cluster's own numbers: speed as a ratio, memory where the settings are the probe's
        from .calibration import memory_settings

        note = (f"measured by {measured.by()} on {measured.node}: {measured.tokens_per_s:,.1f} tokens/s where the estimate said "
                f"{measured.planned_tokens_per_s:,.1f}, so the estimate x {measured.speed_ratio:.2f}")
        tokens_per_s *= measured.speed_ratio
        if measured.settings == memory_settings(cfg, checkpointing, cfg.train.checkpointed_layers if checkpointing else None):
            peak_gb = measured.peak_gb
            peak_note = f"measured by {measured.by()}; the estimate was {parts['peak_gb']:.2f} GB"
    seconds = None
    if steps is not None:
        tokens = steps * effective * world * cfg.data.max_length  # full rows: an upper bound
        seconds = tokens / tokens_per_s + 300  # plus loading the model and evaluations
    return Plan(
        model=cfg.model.name, dims_source=source, device=device.name, params_total=counts["total"], params_trainable=trainable,
        precision=precision, precision_reason=why, micro_batch=cfg.train.micro_batch_size,
        weights_gb=parts["weights_gb"], optimizer_gb=round(parts["lora_gb"] + parts["optimizer_gb"], 3),
        activations_gb=round(parts["activations_gb"] + parts["logits_gb"], 3), peak_gb=peak_gb, capacity_gb=round(capacity, 3),
        fits=peak_gb <= usable, max_micro_batch=max_micro, grad_accum=accum, steps=steps,
        tokens_per_s=round(tokens_per_s, 1), tokens_per_s_note=note,
        time=slurm_time(seconds) if seconds else None, recommended=resources(cfg, device, counts, parts, seconds), breakdown=parts,
        nodes=cfg.slurm.nodes, ranks_per_node=per_node, world_size=world, strategy=strategy, strategy_reason=strategy_why,
        peak_by_strategy_gb=peaks, scaling_efficiency=scaling, quantized_4bit=cfg.quant.bits == 4, gradient_checkpointing=checkpointing,
        checkpointed_layers=cfg.train.checkpointed_layers if checkpointing else None, checkpointing_reason=checkpointing_why, packing=packing, packing_reason=packing_why, peak_note=peak_note,
    )


def resources(cfg: RunConfig, device: Device, counts: dict, parts: dict, seconds: float | None) -> dict:
    """The sbatch resources the plan suggests: per node, for its ranks (each loads the model into host RAM first)."""
    per_node = (cfg.slurm.gpus or 1) if device.name != "cpu" else cfg.train.cpu_ranks
    weights_fp16 = counts["total"] * 2 / GB
    if device.name == "cpu":
        mem = math.ceil(parts["peak_gb"] * 1.3 * per_node)
    else:
        mem = math.ceil(per_node * weights_fp16 * 1.2 + 8)
    recommended = {
        "nodes": cfg.slurm.nodes,
        "ntasks_per_node": 1,  # one torchrun (or one training process) per node
        "gres": "none (CPU job)" if device.name == "cpu" else f"gpu:{device.name.split('-')[0]}:{per_node}",
        "mem": f"{max(8, mem)}G",
        "cpus_per_task": 8 * per_node if device.name != "cpu" else cfg.slurm.cpus_per_task,
        "time": slurm_time(seconds * 1.3) if seconds else None,
    }
    return recommended


def format_plan(p: Plan) -> str:
    rows = [
        ("model", f"{p.model} ({p.dims_source})"),
        ("device", p.device),
        *([("world", f"{p.world_size} ranks: {p.nodes} node(s) x {p.ranks_per_node} {'GPUs' if p.device != 'cpu' else 'CPU ranks'}"),
           ("per GPU" if p.device != "cpu" else "per rank", " | ".join(f"{s.upper()} {gb:.2f} GB" for s, gb in p.peak_by_strategy_gb.items())),
           ("strategy", f"{p.strategy.upper()}: {p.strategy_reason}")] if p.world_size > 1 else []),
        ("parameters", f"{p.params_total / 1e9:.2f} B total, {p.params_trainable / 1e6:.1f} M trainable (LoRA)"),
        ("precision", f"{p.precision}: {p.precision_reason}"),
        ("weights", f"{p.weights_gb:.2f} GB"),
        ("LoRA + optim", f"{p.optimizer_gb:.2f} GB"),
        ("activations", f"{p.activations_gb:.2f} GB at micro-batch {p.micro_batch} (incl. logits)"),
        ("overhead", f"{p.breakdown['runtime_gb'] + p.breakdown.get('allocator_gb', 0):.2f} GB "
                     + ("(Python, torch and libraries)" if p.device == "cpu" else "(CUDA context, allocator slack)")),
        ("checkpointing", f"{'on' if p.gradient_checkpointing else 'off'} ({p.checkpointing_reason})"),
        ("packing", p.packing_reason),
        ("peak", f"{p.peak_gb:.2f} GB of {p.capacity_gb:.1f} GB{' per rank' if p.world_size > 1 else ''}: {'fits' if p.fits else 'DOES NOT FIT'}"
                 + (f" ({p.peak_note})" if p.peak_note else "")),
        ("micro-batch", f"up to {p.max_micro_batch} fits; use {min(p.micro_batch, p.max_micro_batch)} x {p.grad_accum} accumulation"
                        if p.max_micro_batch else f"not even 1 row fits: try {shrink_advice(p)}"),
        ("speed", f"~{p.tokens_per_s:,.{1 if p.tokens_per_s < 100 else 0}f} tokens/s ({p.tokens_per_s_note})"),
        ("time", f"{p.time} for {p.steps} steps (full-length rows: an upper bound)" if p.time else "unknown (row count not known: set train.max_steps)"),
        ("sbatch", ", ".join(f"{k}={v}" for k, v in p.recommended.items() if v)),
    ]
    return "\n".join(f"{k:<13} {v}" for k, v in rows)


def shrink_advice(p: Plan) -> str:
    """What can still make a run fit that does not fit at micro-batch 1: only what it does not do already."""
    options = []
    if not p.quantized_4bit:
        options.append("quant.bits=4")
    if not p.gradient_checkpointing:
        options.append("train.gradient_checkpointing=true")
    elif p.checkpointed_layers:
        options.append("train.checkpointed_layers=null (every layer recomputes)")
    options.append("a shorter data.max_length")
    options.append("more GPUs (slurm.gpus, FSDP on bf16 GPUs)" if p.device != "cpu" and p.world_size == 1 else
                   "more memory (slurm.mem)" if p.device == "cpu" else "a larger GPU")
    return ", ".join(options[:-1]) + " or " + options[-1]


def check_before_submit(cfgs: list[RunConfig], force: bool) -> list[str]:
    """What `submit` and `sweep` learn from the planner: refuse a run that does not fit (unless forced),
    fill `slurm.time: auto` (the longest trial's estimate) and `train.distributed: auto` (the strategy it
    chose), and return lines to print."""
    lines, times = [], []
    for i, cfg in enumerate(cfgs):
        label = f"trial {i}: " if len(cfgs) > 1 else ""
        try:
            p = make_plan(cfg, calibrated=True)
        except ConfigError:  # the config cannot train this model (data.packing on BLOOM)
            raise
        except UserError as exc:
            if cfg.slurm.time == "auto":
                raise UserError(f"slurm.time: auto needs a plan, and there is none: {exc}") from None
            lines.append(f"warning: {label}no memory check ({exc})")
            continue
        device = known_devices()[p.device]
        if (problem := strategy_problem(p.strategy, device, p.precision)) is not None:
            raise UserError(f"train.distributed: {label}{problem}")
        if not p.fits and not force:
            fix = f"train.micro_batch_size={p.max_micro_batch} train.grad_accum={p.grad_accum}" if p.max_micro_batch else shrink_advice(p)
            raise UserError(
                f"{label}predicted peak {p.peak_gb:.1f} GB does not fit in {p.capacity_gb:.1f} GB on {p.device} "
                f"(`hpclora plan` shows the breakdown): try {fix}, or pass --force"
            )
        if cfg.slurm.time == "auto":
            if p.recommended["time"] is None:
                raise UserError("slurm.time: auto needs the number of steps: set train.max_steps, or use a local data file")
            times.append(p.recommended["time"])
        # The job trains with what the planner chose, which its config.yaml records.
        if cfg.train.distributed == "auto" and p.world_size > 1:
            cfg.train.distributed = p.strategy
        if cfg.train.gradient_checkpointing == "auto":
            cfg.train.gradient_checkpointing, cfg.train.checkpointed_layers = p.gradient_checkpointing, p.checkpointed_layers
        if cfg.data.packing == "auto":
            cfg.data.packing = p.packing
        world = f" per rank, {p.world_size} ranks with {p.strategy.upper()} ({p.strategy_reason})" if p.world_size > 1 else ""
        lines.append(f"plan: {label}peak {p.peak_gb:.1f} of {p.capacity_gb:.1f} GB on {p.device}{world}, {p.precision}, "
                     f"gradient checkpointing {'on' if p.gradient_checkpointing else 'off'}" + ("" if p.fits else " (DOES NOT FIT: forced)"))
    if times:
        longest = max(times, key=slurm_seconds)
        for cfg in cfgs:
            cfg.slurm.time = longest
            grace = preempt_grace_problem(cfg.train.preempt_grace_s, longest)
            if grace:
                raise UserError(f"train.preempt_grace_s: {grace}")
        lines.append(f"plan: slurm.time auto -> {longest} (estimate x 1.3)")
    return lines

