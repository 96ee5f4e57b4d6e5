"""What the login node checks beyond the config's own values, before anything reaches the queue.

- Every row of a local data file is read and normalised exactly as training will read it, so that a bad
  row 3 fails here with the same `file:line` error, not in the job. Rows are streamed (a large file is
  never held in memory) and no torch is imported; a file is checked once per version, so a sweep of many
  trials on the same data reads it once.
- data.max_length must fit the model's context (max_position_embeddings), and lora.target_modules must name
  its layers, known from its config.json on disk or in the cache, or from the built-in tables; an unknown
  model is not checked here.
- slurm.gpu_type rules out bf16, and FSDP in fp16, on GPUs without bf16 (V100, T4).

Hub datasets are read in the job (or by `hpclora stage`), so they are not checked here. Each source of a mix
(data.sources) is checked as a single file would be.
"""

from __future__ import annotations

from ..catalog.dims import find_dims
from ..catalog.models import missing_targets
from ..catalog.precision import cpu_job_notes, fsdp_problem
from ..catalog.hub import local_data_path
from ..config import RunConfig
from ..data.sources import data_sources
from ..data import check_rows, validation_rows
from ..data.split import held_out_warning
from ..errors import ConfigError, UserError
from ..catalog.torch_builds import capability_tuple
from .make import device_for, precision_for

_checked: dict[tuple, dict] = {}  # data file version and reading settings -> what check_rows found


def check(cfg: RunConfig, data: bool = True) -> dict | None:
    """Check the GPU type's precision, the model's context and (with `data`) every data row; returns the row count
    and format of a local data file, or None. Raises ConfigError or DataError."""
    check_device(cfg)
    check_model(cfg)
    return check_data(cfg) if data else None


def notes(cfg: RunConfig) -> list[str]:
    """What the config's GPU settings mean in a CPU job (catalog.precision.cpu_job_notes)."""
    return cpu_job_notes(cfg.quant.bits, cfg.train.optimizer, cfg.train.distributed) if cfg.slurm.gpus == 0 else []


def check_device(cfg: RunConfig) -> None:
    """What slurm.gpu_type rules out, by the rules the planner and the job apply: bf16 on a GPU without it (V100, T4),
    and FSDP in the precision such a GPU trains in. A type the planner does not know is `plan`'s to report."""
    flash = cfg.model.attn_implementation == "flash_attention_2"
    if flash and cfg.slurm.gpus == 0:
        raise ConfigError([("model.attn_implementation", "flash_attention_2 runs on GPUs only, and this is a CPU job (slurm.gpus: 0): "
                                                         "use auto (PyTorch's sdpa on a CPU)")])
    if cfg.slurm.gpus == 0 or not cfg.slurm.gpu_type:
        return
    try:
        device = device_for(cfg, None)
    except UserError:
        return
    if flash and device.capability and capability_tuple(device.capability) < (8, 0):
        raise ConfigError([("model.attn_implementation", f"flash_attention_2 needs an Ampere or newer GPU (sm_80+), and {device.name} "
                                                         f"is sm_{device.capability.replace('.', '')}: use auto (PyTorch's sdpa there)")])
    precision, _ = precision_for(cfg, device)  # raises ConfigError for bf16 on a GPU without it
    if cfg.train.distributed == "fsdp" and (problem := fsdp_problem(precision, cfg.quant.bits, cfg.train.optimizer)):
        raise ConfigError([("train.distributed", f"on {device.name}: {problem}")])


def check_model(cfg: RunConfig) -> None:
    try:
        dims, source = find_dims(cfg)
    except ConfigError:  # a config.json that no library can read
        raise
    except UserError:  # dimensions unknown on this node: `plan` says so; the job checks when it loads the model
        return
    if (found := missing_targets(dims.model_type, cfg.lora.target_modules)) and found[0]:
        raise ConfigError([("lora.target_modules", f"{found[0]} not found in {cfg.model.name}, a {dims.model_type} model "
                                                   f"(from {source}); its layers are {found[1]}")])
    layers = cfg.train.checkpointed_layers
    if cfg.train.gradient_checkpointing is not False and layers and dims.layers and layers > dims.layers:
        raise ConfigError([("train.checkpointed_layers", f"{layers} layers recompute, but {cfg.model.name} has {dims.layers} "
                                                         f"(from {source}): at most {dims.layers}, or null for all")])
    if dims.context and cfg.data.max_length > dims.context:
        raise ConfigError([("data.max_length", (
            f"{cfg.data.max_length} tokens do not fit the context of {cfg.model.name}, {dims.context} tokens "
            f"(max_position_embeddings, from {source}): use at most {dims.context}"))])


def check_pairs(cfg: RunConfig, source) -> dict | None:
    """A preference run's pairs read and tokenized as the job will (data.preference), where the model's tokenizer files
    are on this node (else None): a prompt that leaves no room for its answers within data.max_length fails here,
    naming its row. Returns the row count and format, as check_rows."""
    from ..catalog.tokenizer_files import file_tokenizer
    from ..data import load_conversations
    from ..data.preference import encode_examples

    tokenizer = file_tokenizer(cfg)
    if tokenizer is None:
        return
    pairs, numbers, fmt = load_conversations(source.data, source.key, cfg.method.name)
    encode_examples(pairs, numbers, source.data.path, tokenizer, source.data.template, source.data.max_length)
    return {"rows": len(pairs), "format": fmt}


def check_data(cfg: RunConfig) -> dict | None:
    """Every row of each local data file of the run (data.path, or each of data.sources); returns their row count
    (`rows`, and `per_source`) and format, or None where a source is not a local file (a hub id, or a missing file,
    which the config check reports)."""
    counted = []
    for source in data_sources(cfg.data):
        path = local_data_path(source.data.path)
        if path is None or not path.is_file():
            counted.append(None)
            continue
        d, stat = source.data, path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size, d.split, d.format, d.template, tuple(sorted(d.columns.items())), d.max_rows,
               cfg.method.name, d.max_length)
        if key not in _checked:  # a preference run's pairs read once: tokenized where the tokenizer is here, else checked
            _checked[key] = (cfg.method.name != "sft" and check_pairs(cfg, source)) or check_rows(d, source.key, cfg.method.name)
        counted.append(_checked[key])
    if None in counted:
        return None
    rows = [c["rows"] for c in counted]
    held = validation_rows(sum(rows), cfg.data.val_size)  # refuses a split that leaves nothing to train on
    formats = sorted({c["format"] for c in counted})
    return {"rows": sum(rows), "per_source": rows, "format": formats[0] if len(formats) == 1 else " and ".join(formats),
            "held_out": held, "warning": held_out_warning(sum(rows), cfg.data.val_size)}
