"""The run's typed schema and its loader: dataclass defaults <- YAML <- `key=value` overrides.

Every field is documented where it is declared (`help` in its metadata); `hpclora validate --explain`
prints those texts. OmegaConf does the parsing and type coercion; this module walks the user's values
against the schema itself so that *every* problem is collected and reported with its full key path,
instead of stopping at the first one. Only plain dataclasses leave this module.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import ConfigError, UserError
from ..catalog.hub import local_data_path
from .slurm_syntax import MAX_SIGNAL_LEAD_S, SLURM_MEM, SLURM_TIME, SLURM_WORDS, UNSAFE_IN_SBATCH_LINES, preempt_grace_problem, sbatch_option_problem


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


@dataclass
class ModelSection:
    name: str = opt(
        "smollm2-135m",
        "Base model: a hub id (owner/name), a local directory, or `smollm2-135m` for the bundled small model.",
    )
    revision: Optional[str] = opt(None, "Hub revision (branch, tag or commit) of the base model; null = main.")
    trust_remote_code: bool = opt(False, "Allow the model repository's own Python code to run (some Japanese models need it).")
    attn_implementation: str = opt(
        "auto",
        "Attention kernel: auto (FlashAttention 2 where installed and usable, else PyTorch's sdpa, once per example on "
        "packed rows; eager where the architecture has nothing else, as BLOOM), sdpa (packed rows with a block mask), "
        "sdpa_varlen (sdpa once per packed example), eager, or flash_attention_2 (Ampere+ with flash-attn installed).",
        choices=("auto", "sdpa", "sdpa_varlen", "eager", "flash_attention_2"),
    )


@dataclass
class QuantSection:
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
    r: int = opt(8, "LoRA rank: trainable parameters and capacity grow linearly with it.", min=1, max=4096)
    alpha: float = opt(16.0, "LoRA scaling numerator; the update is scaled by alpha / r.", gt=0, max=1e6)
    dropout: float = opt(0.05, "Dropout on the LoRA input path.", min=0, lt=1)
    target_modules: Any = opt("auto", "`auto` (per-architecture choice, logged) or a list of module names such as [q_proj, v_proj].")
    bias: str = opt("none", "Which biases train: none, all, or lora_only.", choices=("none", "all", "lora_only"))
    use_dora: bool = opt(False, "Weight-decomposed LoRA (DoRA): often better at low rank, slower per step.")


@dataclass
class DataSection:
    path: str = opt(REQUIRED, "Local .jsonl/.json/.csv/.parquet file, or a hub dataset id (owner/name).")
    split: str = opt("train", "Split to read from a hub dataset (local files have one split).")
    format: str = opt(
        "auto",
        "Row format: alpaca (instruction/input/output), sharegpt (conversations of from/value), "
        "messages (role/content), text; auto detects it from the first row.",
        choices=("auto", "alpaca", "sharegpt", "messages", "text"),
    )
    template: str = opt(
        "alpaca",
        "Prompt template: alpaca, alpaca_ja, calm (ユーザー:/システム:), chat (the tokenizer's chat template), none.",
        choices=("alpaca", "alpaca_ja", "calm", "chat", "none"),
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


@dataclass
class TrainSection:
    epochs: float = opt(3.0, "Passes over the training rows (fractions allowed); ignored when max_steps is set.", gt=0, max=10_000)
    max_steps: Optional[int] = opt(None, "Stop after this many optimizer steps; null = derive from epochs.", min=1, max=10_000_000)
    lr: float = opt(2e-4, "Peak learning rate of the LoRA parameters.", gt=0, lt=1)
    scheduler: str = opt(
        "cosine",
        "Learning-rate schedule after warmup.",
        choices=("cosine", "linear", "constant", "constant_with_warmup"),
    )
    warmup_ratio: float = opt(0.03, "Fraction of the steps spent warming the learning rate up from 0.", min=0, lt=1)
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
    hf_home: Optional[str] = opt(
        None, "Shared Hugging Face cache (HF_HOME) that `hpclora stage` fills and jobs read; null = $HF_HOME or ~/.cache/huggingface.",
    )
    offline_jobs: bool = opt(
        True, "Jobs run with HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1 and TRANSFORMERS_OFFLINE=1 (compute nodes without internet).",
    )


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    quant: QuantSection = field(default_factory=QuantSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    slurm: SlurmSection = field(default_factory=SlurmSection)
    container: ContainerSection = field(default_factory=ContainerSection)
    cache: CacheSection = field(default_factory=CacheSection)


SECTIONS: dict[str, type] = {
    "run": RunSection, "model": ModelSection, "quant": QuantSection, "lora": LoraSection,
    "data": DataSection, "train": TrainSection, "slurm": SlurmSection, "container": ContainerSection,
    "cache": CacheSection,
}



# ----------------------------------------------------------------------------------------------
# Loading


def load_run_config(path: str | os.PathLike) -> RunConfig:
    """The resolved config.yaml of a run directory. Its data file may since have moved: not checked."""
    return load(path, check_files=False)


def load(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (), check_files: bool = True) -> RunConfig:
    """Read a YAML config, apply `key=value` overrides, check everything, and return plain dataclasses.

    Relative `data.path` values are looked up in the working directory, then next to the config file;
    paths are made absolute so that a job never depends on where it was started.
    Raises ConfigError listing every problem.
    """
    problems: list[tuple[str, str]] = []
    raw = _read_yaml(path) if path is not None else {}
    raw = _deep_merge(raw, _parse_overrides(overrides, problems))
    known = _drop_mistyped(_drop_unknown(raw, problems), problems)
    cfg, missing = _to_dataclasses(_literal(known))
    problems.extend((key, "required, but not set") for key in missing)
    _resolve_paths(cfg, Path(path).resolve().parent if path is not None else Path.cwd())
    reported = {key for key, _ in problems}
    for key, message in check_values(cfg, check_files):  # one problem per key: the first is the one to fix
        if key not in reported:
            problems.append((key, message))
            reported.add(key)
    if problems:
        raise ConfigError(problems)
    return cfg


def _read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if p.is_dir():
        configs = sorted(f.name for f in p.glob("*.yaml"))[:5]
        hint = f" such as {p / configs[0]}" if configs else ""
        raise UserError(f"{p}: is a directory; give a config file{hint} (`hpclora status` and `report` take run directories)")
    if not p.is_file():
        raise UserError(f"{p}: config file not found")
    stat = p.stat()
    return copy.deepcopy(_parse_yaml(str(p.resolve()), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=8)
def _parse_yaml(path: str, mtime_ns: int, size: int) -> dict:
    """Parsed once per file version: a sweep loads the same YAML for every trial."""
    from omegaconf import OmegaConf

    p = Path(path)
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
    except UnicodeDecodeError as exc:
        raise UserError(f"{p}: not UTF-8 text (byte {exc.object[exc.start]:#x} at offset {exc.start}): save it as UTF-8") from None
    except Exception as exc:  # yaml.YAMLError and OmegaConf's own errors: show the parser's message
        first = str(exc).strip().splitlines()
        raise UserError(f"{p}: not valid YAML: {' '.join(s.strip() for s in first[:4])}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"{p}: a config must be a mapping of sections (run:, model:, data:, ...)")
    return loaded


KEY_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def _parse_overrides(overrides, problems: list[tuple[str, str]]) -> dict:
    """`section.key=value` items as one nested mapping; each item that cannot be read is a problem of its own."""
    from omegaconf import OmegaConf

    parsed: dict = {}
    for item in overrides:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            problems.append((item, "an override must look like section.key=value"))
        elif "\n" in item or "\r" in item:
            problems.append((key, "an override is one line, but this one holds a line break: give each value on one line"))
        elif not KEY_PATH.match(key):
            problems.append((key, "not a key path such as lora.r (names of letters, digits and _, joined by dots)"))
        else:
            try:
                parsed = _deep_merge(parsed, OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False))
            except Exception as exc:
                problems.append((key, f"cannot read the value {value!r} ({_parser_reason(exc)}); put it in quotes: {key}='{value}'"))
    return parsed


def _parser_reason(exc: Exception) -> str:
    """The YAML scanner's own reason (`found character '`' that cannot start any token`), without its context."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = [line for line in lines if line.startswith("found ") or line.startswith("expected ")]
    return (reasons or lines or [type(exc).__name__])[0]


def _literal(value: Any) -> Any:
    """Escape OmegaConf's `${...}` interpolation: values are literal text, so that shell lines such as
    `slurm.setup: ['export X=${SLURM_CPUS_PER_TASK}']` and paths reach the job exactly as written."""
    if isinstance(value, str):
        # OmegaConf reads `\${` as a literal `${`, and backslashes right before it as escapes of each other.
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    if isinstance(value, dict):
        return {k: _literal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_literal(v) for v in value]
    return value


def _deep_merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _all_key_paths() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _suggest(key: str, candidates: list[str], prefix: str = "") -> str:
    """` (did you mean 'lora.r'?)` for the nearest known key, or nothing when none is close."""
    # A key put in the wrong section: `train.max_length` -> `data.max_length`.
    elsewhere = [p for p in _all_key_paths() if p.split(".")[1] == key]
    if elsewhere and prefix:
        return f" (did you mean '{elsewhere[0]}'?)"
    near = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not near:
        # Short keys score low with difflib (`rnak` vs `r`): fall back to a shared first letter.
        near = [c for c in candidates if len(c) <= 2 and key.startswith(c)]
    return f" (did you mean '{prefix}{near[0]}'?)" if near else ""


def _drop_unknown(raw: dict, problems: list[tuple[str, str]]) -> dict:
    """Keep the known sections and keys; record each unknown one with its full path and a suggestion."""
    known: dict = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            problems.append((str(section), "unknown section" + _suggest(str(section), list(SECTIONS))))
            continue
        if values is None:
            continue
        if not isinstance(values, dict):
            problems.append((section, f"expected a mapping of keys, got {type(values).__name__} {values!r}"))
            continue
        names = [f.name for f in dataclasses.fields(SECTIONS[section])]
        known[section] = {}
        for key, value in values.items():
            if key in names:
                known[section][key] = value
            else:
                problems.append((f"{section}.{key}", "unknown key" + _suggest(str(key), names, prefix=f"{section}.")))
    return known


@functools.lru_cache(maxsize=None)
def _field_types(section: str) -> dict[str, Any]:
    return typing.get_type_hints(SECTIONS[section])


BOOL_WORDS = ("true", "false", "yes", "no", "on", "off")


def _fits(value: Any, tp: Any) -> bool:
    """Whether OmegaConf turns `value` into a `tp` the way a user means it (stricter than OmegaConf itself,
    which reads 2 as true and lets [[1]] into a list of strings)."""
    if tp is Any:
        return True
    if tp is bool:
        return isinstance(value, bool) or isinstance(value, str) and value.strip().lower() in BOOL_WORDS
    if isinstance(value, bool):
        return False
    if tp is int:
        return isinstance(value, int) or isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value) is not None
    if tp is float:
        if isinstance(value, (int, float)):
            return True
        try:
            float(value)
            return isinstance(value, str)
        except (TypeError, ValueError):
            return False
    if tp is str:
        return isinstance(value, (str, int, float))
    if typing.get_origin(tp) is list:
        return isinstance(value, list) and all(_fits(v, str) for v in value)
    return False


def _describe(tp: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(tp) or (
        "a list such as [a, b]" if typing.get_origin(tp) is list else "a mapping such as {name: value}")


def _shown(value: Any) -> str:
    """A value as the user wrote it in YAML: null, true, 'text', [..]."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)


def _type_problems(key: str, value: Any, tp: Any) -> list[tuple[str, str]]:
    """Why `value` cannot be the field `key` of type `tp`, in the user's words (never OmegaConf's)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union:  # Optional[X]
        if value is None:
            return []
        tp = next(a for a in args if a is not type(None))
        args = typing.get_args(tp)
    if value is None:
        return [] if tp is Any else [(key, f"must be {_describe(tp)}, not null")]
    if typing.get_origin(tp) is dict:  # name each entry: data.columns.instruction
        if not isinstance(value, dict):
            return [(key, f"expected {_describe(tp)}, got {_shown(value)}")]
        return [(f"{key}.{name}", f"expected text, got {_shown(v)}") for name, v in value.items()
                if not isinstance(name, str) or not _fits(v, str)]
    return [] if _fits(value, tp) else [(key, f"expected {_describe(tp)}, got {_shown(value)}")]


def _drop_mistyped(known: dict, problems: list[tuple[str, str]]) -> dict:
    """Keep the values their fields can hold; record each other one with its key path."""
    kept: dict = {}
    for section, values in known.items():
        kept[section] = {}
        for key, value in values.items():
            found = _type_problems(f"{section}.{key}", value, _field_types(section)[key])
            if found:
                problems.extend(found)
            else:
                kept[section][key] = value
    return kept


@functools.lru_cache(maxsize=None)
def _schema():
    """The OmegaConf schema of RunConfig, built once."""
    from omegaconf import OmegaConf

    return OmegaConf.structured(RunConfig)


def _to_dataclasses(cleaned: dict) -> tuple[RunConfig, list[str]]:
    """The merged config, and the required keys nobody set (filled with "" so checks can go on)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(_schema(), cleaned)
        missing = []
        for section, cls in SECTIONS.items():
            for f in dataclasses.fields(cls):
                if OmegaConf.is_missing(merged[section], f.name):
                    missing.append(f"{section}.{f.name}")
                    merged[section][f.name] = ""
        return OmegaConf.to_object(merged), missing
    except OmegaConfBaseException as exc:  # a value _drop_mistyped let through: still the user's to fix
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError([(key, f"cannot be read: {str(exc).splitlines()[0]}")]) from None


def _resolve_paths(cfg: RunConfig, config_dir: Path) -> None:
    cfg.run.output_root = str(Path(cfg.run.output_root).expanduser().resolve())
    if cfg.data.cache_dir:
        cfg.data.cache_dir = str(Path(cfg.data.cache_dir).expanduser().resolve())
    cfg.slurm.log_dir = str(Path(cfg.slurm.log_dir).expanduser().resolve())
    if cfg.container.image:
        cfg.container.image = str(Path(cfg.container.image).expanduser().resolve())
    if cfg.cache.hf_home:
        cfg.cache.hf_home = str(Path(cfg.cache.hf_home).expanduser().resolve())
        if not cfg.data.cache_dir:  # tokenized data goes to the shared cache too, where `stage` puts it
            cfg.data.cache_dir = str(Path(cfg.cache.hf_home) / "hpclora" / "tokenized")
    data = Path(cfg.data.path).expanduser()
    for candidate in (data, config_dir / data):
        if candidate.exists():
            cfg.data.path = str(candidate.resolve())
            break


# ----------------------------------------------------------------------------------------------
# Value checks: ranges, choices, combinations


def check_values(cfg: RunConfig, check_files: bool = True) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            problems.extend(_check_field(f"{section}.{f.name}", getattr(obj, f.name), f.metadata))

    if not cfg.run.name.strip():
        problems.append(("run.name", "must not be empty"))
    tm = cfg.lora.target_modules
    if isinstance(tm, str):
        if tm != "auto":
            problems.append(("lora.target_modules", f"expected 'auto' or a list of module names, got {tm!r}"))
    elif not (isinstance(tm, list) and tm and all(isinstance(m, str) and m for m in tm)):
        problems.append(("lora.target_modules", f"expected 'auto' or a non-empty list of module names, got {tm!r}"))
    if cfg.data.val_size >= 1 and cfg.data.val_size != int(cfg.data.val_size):
        problems.append(("data.val_size", f"a row count must be a whole number, got {cfg.data.val_size}"))
    if check_files and (data := local_data_path(cfg.data.path)) is not None and not data.exists():
        problems.append(("data.path", f"file not found: {cfg.data.path}"))
    if cfg.data.format == "text" and cfg.data.template != "none":
        problems.append(("data.template", f"plain-text data has no prompt to template: use data.template=none (got {cfg.data.template!r})"))
    if cfg.data.packing is True and cfg.data.max_length < 64:
        problems.append(("data.max_length", "packing needs rows of at least 64 tokens"))
    if cfg.quant.bits is None and (cfg.quant.type != "nf4" or cfg.quant.compute_dtype != "auto"):
        problems.append(("quant.bits", "quant.type / quant.compute_dtype are set but quant.bits is null: set quant.bits=4 or 8"))
    if cfg.quant.bits == 8 and cfg.quant.type != "nf4":
        problems.append(("quant.type", "applies to 4-bit loading only; 8-bit has no data type to choose"))
    if cfg.lora.use_dora and cfg.quant.bits == 8:
        problems.append(("lora.use_dora", "DoRA is not supported on 8-bit bitsandbytes layers; use quant.bits=4 or null"))
    problems.extend(check_slurm(cfg.slurm))
    problems.extend(check_strategy(cfg))
    if cfg.slurm.time != "auto" and SLURM_TIME.match(cfg.slurm.time):
        grace = preempt_grace_problem(cfg.train.preempt_grace_s, cfg.slurm.time)
        if grace:
            problems.append(("train.preempt_grace_s", grace))
    problems.extend(check_container(cfg.container))
    return problems


def check_strategy(cfg: RunConfig) -> list[tuple[str, str]]:
    """What FSDP cannot do, known from the config alone (the GPU's bf16 is the planner's and the job's to check)."""
    if cfg.train.distributed != "fsdp":
        return []
    if cfg.slurm.gpus == 0:
        return [("train.distributed", "fsdp shards over GPUs; CPU ranks (train.cpu_ranks) train with ddp: use train.distributed=ddp")]
    if cfg.train.precision in ("fp16", "fp32"):
        return [("train.distributed", f"fsdp trains in bf16 here, not {cfg.train.precision}: use train.precision=bf16 (A100/H100), "
                                      "or train.distributed=ddp with quant.bits=4 so that each GPU holds a 4-bit copy")]
    if cfg.quant.bits == 8:
        return [("quant.bits", "8-bit weights cannot be sharded by fsdp: use quant.bits=4 (stored in bf16 for fsdp) or train.distributed=ddp")]
    return []


# Variables that hold credentials: they reach jobs through the environment, never through files.
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)


def check_container(container: "ContainerSection") -> list[tuple[str, str]]:
    problems = []
    if container.image is not None and not container.image.strip():
        problems.append(("container.image", "must be a path to an image, or null"))
    for i, bind in enumerate(container.binds):
        if not bind.strip() or any(c in bind for c in "\n\r,"):
            problems.append((f"container.binds[{i}]", f"expected one path or src:dst[:ro], got {bind!r}"))
    for name, value in container.env.items():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", str(name)):
            problems.append((f"container.env.{name}", "not a valid variable name"))
        elif SECRET_NAME.search(str(name)):
            problems.append((f"container.env.{name}", "looks like a secret: export it in your shell instead; jobs pass the environment on"))
        elif any(c in str(value) for c in "\n\r"):
            problems.append((f"container.env.{name}", "one line only"))
    return problems


def check_slurm(slurm: "SlurmSection") -> list[tuple[str, str]]:
    problems = []
    if slurm.time != "auto" and not SLURM_TIME.match(slurm.time):
        problems.append(("slurm.time", f"not a Slurm time (MM, HH:MM:SS or D-HH:MM:SS): {slurm.time!r}"))
    if not SLURM_MEM.match(slurm.mem):
        problems.append(("slurm.mem", f"expected a size such as 32G or 64000M, got {slurm.mem!r}"))
    for key, pattern in SLURM_WORDS.items():
        value = getattr(slurm, key)
        if value is not None and not pattern.match(value):
            problems.append((f"slurm.{key}", f"unexpected characters in {value!r}"))
    if any(c in slurm.log_dir for c in UNSAFE_IN_SBATCH_LINES):
        problems.append(("slurm.log_dir", "cannot hold double quotes, backslashes or line breaks: an #SBATCH line cannot carry them"))
    if slurm.gpu_type and slurm.gpus == 0:
        problems.append(("slurm.gpu_type", "is set but slurm.gpus is 0"))
    for i, line in enumerate(slurm.extra):
        problem = sbatch_option_problem(line)
        if problem:
            problems.append((f"slurm.extra[{i}]", problem))
    for i, line in enumerate(slurm.setup):
        if "\n" in line or "\r" in line:
            problems.append((f"slurm.setup[{i}]", "one shell line per item: split it into several items"))
    return problems


def _choice(value: Any) -> str:
    """A choice as YAML spells it: null, true, auto."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _check_field(key: str, value: Any, meta) -> list[tuple[str, str]]:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        shown = ", ".join(map(_choice, choices))
        near = difflib.get_close_matches(str(value), [str(c) for c in choices if c is not None], n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        return [(key, f"must be one of {shown}; got {value!r}{hint}")]
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return []
    if not math.isfinite(value):
        return [(key, f"must be a finite number, got {value}")]
    if "min" in meta and value < meta["min"]:
        return [(key, f"must be >= {meta['min']}, got {value}")]
    if "max" in meta and value > meta["max"]:
        return [(key, f"must be <= {meta['max']}, got {value}")]
    if "gt" in meta and value <= meta["gt"]:
        return [(key, f"must be > {meta['gt']}, got {value}")]
    if "lt" in meta and value >= meta["lt"]:
        return [(key, f"must be < {meta['lt']}, got {value}")]
    return []


# ----------------------------------------------------------------------------------------------
# Output


def to_yaml(cfg: RunConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg), sort_keys=False)


def explain() -> str:
    """Every key with its type, default and documentation, for `hpclora validate --explain`."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:" + (f"  # {cls.__doc__.strip()}" if cls.__doc__ and not dataclasses.fields(cls) else ""))
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = "(required)" if default == REQUIRED else ("null" if default is None else repr(default))
            choices = f.metadata.get("choices")
            lines.append(f"  {f.name}: {shown}")
            lines.append(f"      {f.metadata.get('help', '')}")
            if choices:
                lines.append("      one of: " + ", ".join(map(_choice, choices)))
    return "\n".join(lines)


def run_dir_slug(name: str) -> str:
    """A safe single path component for the run directory, whatever characters the run name holds."""
    slug = re.sub(r"[^\w.-]+", "-", name, flags=re.UNICODE).strip(".-")
    return slug[:80] or "run"
