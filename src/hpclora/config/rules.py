"""Value checks beyond the types: ranges, choices, and the combinations a config cannot hold, each reported with
its key path. What the config alone can tell; what needs the model or the GPU is the planner's (plan/).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from typing import Any

from ..catalog.hub import LOCAL_DATA_SUFFIXES, hub_id_problem, local_data_path, local_model_path
from ..catalog.models import BUNDLED, packing_problem
from ..catalog.precision import fsdp_problem, trained_bias_problem
from ..catalog.start_adapter import adapter_problem
from .schema import DPO_LOSSES, ENTRIES, KTO_LOSSES, SECTIONS, MethodSection, RunConfig
from .credentials import looks_secret
from .value_types import number_words
from ..data.sources import data_sources
from .slurm_syntax import SLURM_MEM, SLURM_WORDS, UNSAFE_IN_SBATCH_LINES, preempt_grace_problem, sbatch_option_problem, slurm_time_problem


def check_values(cfg: RunConfig, check_files: bool = True) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            problems.extend(_check_field(f"{section}.{f.name}", getattr(obj, f.name), f.metadata))
    for key, cls in ENTRIES.items():
        section, name = key.split(".")
        for i, entry in enumerate(getattr(getattr(cfg, section), name)):
            for f in dataclasses.fields(cls):
                if f.name in entry:
                    problems.extend(_check_field(f"{key}[{i}].{f.name}", entry[f.name], f.metadata))

    if not cfg.run.name.strip():
        problems.append(("run.name", "must not be empty"))
    tm = cfg.lora.target_modules
    if isinstance(tm, str):
        if tm != "auto":
            problems.append(("lora.target_modules", f"expected 'auto' or a list of module names, got {tm!r}"))
    elif not (isinstance(tm, list) and tm and all(isinstance(m, str) and m for m in tm)):
        problems.append(("lora.target_modules", f"expected 'auto' or a non-empty list of module names, got {tm!r}"))
    if math.isfinite(cfg.data.val_size) and cfg.data.val_size >= 1 and cfg.data.val_size != int(cfg.data.val_size):
        problems.append(("data.val_size", f"a row count must be a whole number, got {cfg.data.val_size}"))
    problems.extend(source_problems(cfg, check_files))
    if (packing := packing_problem(cfg.data.packing, None, cfg.data.max_length, cfg.method.name)) is not None:
        problems.append(packing)
    if cfg.quant.bits is None and (cfg.quant.type != "nf4" or cfg.quant.compute_dtype != "auto"):
        problems.append(("quant.bits", "quant.type / quant.compute_dtype are set but quant.bits is null: set quant.bits=4 or 8"))
    if cfg.quant.bits == 8 and cfg.quant.type != "nf4":
        problems.append(("quant.type", "applies to 4-bit loading only; 8-bit has no data type to choose"))
    precision = None if cfg.train.precision == "auto" else cfg.train.precision
    if problem := trained_bias_problem(cfg.lora.bias, cfg.quant.bits, cfg.quant.compute_dtype, precision):
        problems.append(("lora.bias", problem))
    if cfg.lora.use_dora and cfg.quant.bits == 8:
        problems.append(("lora.use_dora", "DoRA is not supported on 8-bit bitsandbytes layers; use quant.bits=4 or null"))
    if cfg.train.cpu_ranks > 1 and cfg.slurm.gpus > 0:
        problems.append(("train.cpu_ranks", f"sets CPU ranks of a CPU job, but slurm.gpus={cfg.slurm.gpus} trains a rank per GPU: "
                                            "drop train.cpu_ranks, or set slurm.gpus=0"))
    problems.extend(check_slurm(cfg.slurm))
    problems.extend(check_method(cfg))
    problems.extend(check_strategy(cfg))
    if cfg.run.wandb_project is not None and (problem := wandb_project_problem(cfg.run.wandb_project)):
        problems.append(("run.wandb_project", problem))
    problems.extend(secret_values(cfg))
    if cfg.slurm.time != "auto" and slurm_time_problem(cfg.slurm.time) is None:
        grace = preempt_grace_problem(cfg.train.preempt_grace_s, cfg.slurm.time)
        if grace:
            problems.append(("train.preempt_grace_s", grace))
    problems.extend(check_container(cfg.container))
    return problems


def source_problems(cfg: RunConfig, check_files: bool) -> list[tuple[str, str]]:
    """data.path (or each of data.sources) and model.name: a local file (directory) that is there, or a well-formed
    hub id; data that can be templated as asked."""
    problems = []
    if cfg.data.sources and cfg.data.path:
        problems.append(("data.sources", f"and data.path ({cfg.data.path}) are both set: list every file of the mix in "
                                         "data.sources, and leave data.path out"))
    for source in data_sources(cfg.data):
        problems.extend(data_file_problems(source.data.path, f"{source.key}.path", check_files))
        if source.data.format == "text" and source.data.template != "none":
            key = f"{source.key}.template"
            problems.append((key, f"plain-text data has no prompt to template: use {key}=none (got {source.data.template!r})"))
    if not cfg.model.name.strip():  # '' would be read as the directory hpclora runs in
        problems.append(("model.name", f"is empty: give a hub id (owner/name), a local model directory, or {' or '.join(BUNDLED)}"))
    elif cfg.model.name not in BUNDLED and local_model_path(cfg.model.name) is None:
        if problem := hub_id_problem(cfg.model.name, "model directory"):
            problems.append(("model.name", problem))
    if cfg.model.adapter is not None and check_files and (problem := adapter_problem(cfg.model.adapter, cfg.model.name)):
        problems.append(("model.adapter", problem))
    return problems


def data_file_problems(path: str, key: str, check_files: bool) -> list[tuple[str, str]]:
    data = local_data_path(path)
    if data is None:
        problem = hub_id_problem(path, "data file")
    elif not check_files:
        problem = None
    elif not data.exists():
        problem = f"file not found: {path}"
    elif data.is_dir():
        problem = f"{path} is a directory: give one data file in it ({', '.join(LOCAL_DATA_SUFFIXES)})"
    elif not data.is_file():
        problem = f"{path} is not a regular file (a device or a pipe): give a data file"
    else:
        problem = None
    return [(key, problem)] if problem else []


def check_method(cfg: RunConfig) -> list[tuple[str, str]]:
    """The method's own settings: loss types the method has, weights that match them, none of another method's set."""
    m, problems = cfg.method, []
    defaults = MethodSection()
    owners = {"beta": ("dpo", "orpo", "simpo", "kto"), "loss_type": ("dpo", "kto"), "loss_weights": ("dpo",),
              "label_smoothing": ("dpo", "simpo"), "simpo_gamma": ("simpo",), "desirable_weight": ("kto",), "undesirable_weight": ("kto",)}
    for key, methods in owners.items():
        if m.name not in methods and getattr(m, key) != getattr(defaults, key):
            problems.append((f"method.{key}", f"applies to method.name {' or '.join(methods)}, not {m.name}: drop it"))
    if m.name == "dpo":
        problems += dpo_loss_problems(m.loss_type, m.loss_weights)
    if m.name == "kto":
        problems += kto_problems(m, cfg.train.micro_batch_size)
    if m.name != "sft" and cfg.data.train_on_prompt:
        problems.append(("data.train_on_prompt", f"method.name={m.name} scores the answers of each pair, never the prompt: drop it"))
    return problems


def dpo_loss_problems(loss_type, weights) -> list[tuple[str, str]]:
    losses = [loss_type] if isinstance(loss_type, str) else loss_type
    if not isinstance(losses, list) or not losses or not all(isinstance(x, str) for x in losses):
        return [("method.loss_type", f"expected auto, a loss type or a list of them, got {loss_type!r}")]
    if loss_type != "auto" and (unknown := [x for x in losses if x not in DPO_LOSSES]):
        near = difflib.get_close_matches(unknown[0], DPO_LOSSES, n=1)
        return [("method.loss_type", f"{unknown[0]!r} is not a dpo loss" + (f" (did you mean {near[0]}?)" if near else "")
                 + f"; they are {', '.join(DPO_LOSSES)}")]
    if weights is not None and len(weights) != len(losses):
        return [("method.loss_weights", f"{len(weights)} weights for {len(losses)} loss types: give one per method.loss_type")]
    return []


def with_kl_term(method) -> bool:
    """Whether the method's loss estimates kto's KL term (all of kto's losses but apo_zero_unpaired), from each prompt
    with another row's answer in its micro-batch."""
    return method.name == "kto" and method.loss_type in ("auto", "kto")


def kto_problems(method, micro_batch_size: int) -> list[tuple[str, str]]:
    loss_type = method.loss_type
    if loss_type != "auto" and loss_type not in KTO_LOSSES:
        near = difflib.get_close_matches(str(loss_type), KTO_LOSSES, n=1)
        return [("method.loss_type", f"{loss_type!r} is not a kto loss" + (f" (did you mean {near[0]}?)" if near else "")
                 + f"; they are {', '.join(KTO_LOSSES)}")]
    if with_kl_term(method) and micro_batch_size < 2:
        return [("train.micro_batch_size", "method.name=kto estimates its KL term from the other answers of a micro-batch "
                 "(each prompt with its neighbour's answer): it needs at least 2 rows; set train.micro_batch_size=2 or more")]
    return []


def check_strategy(cfg: RunConfig) -> list[tuple[str, str]]:
    """What FSDP cannot do, known from the config alone (the GPU's bf16 is the planner's and the job's to check)."""
    if cfg.train.distributed != "fsdp":
        return []
    precision = None if cfg.train.precision == "auto" else cfg.train.precision
    problem = fsdp_problem(precision, cfg.quant.bits, cfg.train.optimizer)
    return [("train.distributed", problem)] if problem else []


# What W&B refuses in a project name (its SDK's INVALID_URL_CHARACTERS and length limit): the job would stop at its start.
WANDB_NAME_MAX, WANDB_REFUSED = 128, "/\\#?%:"


def wandb_project_problem(name: str) -> str | None:
    if not name.strip():
        return "is empty: give a project name, or leave it out (null)"
    if len(name) > WANDB_NAME_MAX:
        return f"W&B takes project names of at most {WANDB_NAME_MAX} characters; this one has {len(name)}"
    if found := sorted(set(name) & set(WANDB_REFUSED)):
        return f"W&B refuses {' '.join(map(repr, found))} in a project name"
    return None


# Variables that hold credentials: they reach jobs through the environment, never through files.
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)
def secret_values(cfg: RunConfig) -> list[tuple[str, str]]:
    """Every value of the config that looks like a credential, by key path. The message never repeats the value:
    it would reach the terminal, logs and scripts, which is what the check keeps it from."""
    def walk(key: str, value: Any):
        if isinstance(value, str):
            if looks_secret(key, value):
                yield (key, "holds what looks like a token or key: config.yaml and job scripts are files others can read; "
                            "export it in your shell (jobs pass the environment on) and leave it out of the config")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                yield from walk(f"{key}[{i}]", item)
        elif isinstance(value, dict):
            for name, item in value.items():
                yield from walk(f"{key}.{name}", item)

    return [problem for section in SECTIONS for f in dataclasses.fields(getattr(cfg, section))
            for problem in walk(f"{section}.{f.name}", getattr(getattr(cfg, section), f.name))]


# What apptainer's -B reads as more than a path: ',' between binds, ':' between source and destination, '\\' escaping.
BIND_SEPARATORS = ",:\\"


def check_container(container: "ContainerSection") -> list[tuple[str, str]]:
    problems = []
    for i, bind in enumerate(container.binds):
        if not bind.strip() or any(c in bind for c in BIND_SEPARATORS.replace(":", "") + "\n\r"):
            problems.append((f"container.binds[{i}]", f"expected one path or src:dst[:ro] without ',' or '\\', got {bind!r}"))
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
    if slurm.time != "auto" and (problem := slurm_time_problem(slurm.time)):
        problems.append(("slurm.time", problem))
    if not SLURM_MEM.match(slurm.mem):
        problems.append(("slurm.mem", f"expected a size such as 32G or 64000M, got {slurm.mem!r}"))
    for key, pattern in SLURM_WORDS.items():
        value = getattr(slurm, key)
        if value is not None and not pattern.match(value):
            problems.append((f"slurm.{key}", f"unexpected characters in {value!r}"))
    if any(c in slurm.log_dir for c in UNSAFE_IN_SBATCH_LINES):
        problems.append(("slurm.log_dir", "cannot hold double quotes, backslashes or line breaks: an #SBATCH line cannot carry them"))
    if slurm.gpu_type and slurm.gpus == 0:
        problems.append(("slurm.gpu_type", "is set but slurm.gpus is 0 (a CPU-only job, as in configs/demo-cpu.yaml): add slurm.gpus=1 for a GPU job, or drop slurm.gpu_type"))
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


def _same_choice(value: Any, choice: Any) -> bool:
    """`value` is `choice` itself, not merely equal to it: 0 and 1 equal false and true in Python, but
    `data.packing=0` is no answer to a yes-or-no key."""
    return value == choice and type(value) is type(choice)


def _check_field(key: str, value: Any, meta) -> list[tuple[str, str]]:
    choices = meta.get("choices")
    if choices is not None and not any(_same_choice(value, c) for c in choices):
        shown = ", ".join(map(_choice, choices))
        near = difflib.get_close_matches(str(value), [str(c) for c in choices if c is not None], n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        return [(key, f"must be one of {shown}; got {value!r}{hint}")]
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return []
    if isinstance(value, float) and not math.isfinite(value):
        return [(key, f"must be a finite number, got {value}")]
    got = number_words(value)  # Python compares an int of any size with a float bound exactly
    if "min" in meta and value < meta["min"]:
        return [(key, f"must be >= {meta['min']}, got {got}")]
    if "max" in meta and value > meta["max"]:
        return [(key, f"must be <= {meta['max']}, got {got}")]
    if "gt" in meta and value <= meta["gt"]:
        return [(key, f"must be > {meta['gt']}, got {got}")]
    if "lt" in meta and value >= meta["lt"]:
        return [(key, f"must be < {meta['lt']}, got {got}")]
    return []

