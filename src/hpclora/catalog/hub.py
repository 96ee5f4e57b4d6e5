"""The Hugging Face hub as a run sees it, without downloading anything: whether this node is offline,
whether a model or dataset name is a local path or a hub id (decided here, and only here), and whether
the shared cache holds what an offline job will need.

Light: no torch, and huggingface_hub only where the cache is asked (its own lookup functions, not a
parse of its directory layout), so that `submit` warns on the login node and a job stops in its first
second, not after loading half a model. `hpclora stage`, which fills the cache, is in stage.py.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from ..catalog.models import BUNDLED
from ..errors import UserError

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
# Suffixes that say "this is meant to be a local file", so a missing one is an error, not a hub id.
LOCAL_DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".txt")
PATH_PREFIXES = ("/", "./", "../", "~")


def offline_switches() -> list[str]:
    """The offline variables set on in this environment."""
    return [v for v in OFFLINE_VARS if os.environ.get(v, "").lower() in ("1", "true", "yes")]


def is_offline() -> bool:
    return bool(offline_switches())


def hf_home(cfg=None) -> Path:
    """cache.hf_home, else $HF_HOME, else ~/.cache/huggingface (without a config: the process's own)."""
    return Path((cfg.cache.hf_home if cfg is not None else None) or os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")


def use_cache(cfg) -> None:
    """Point the hub libraries at cache.hf_home; they read HF_HOME when imported, so call this first."""
    from ..internals import use_hub_cache

    use_hub_cache(cfg.cache.hf_home)


# A hub repository id as the hub allows it: [owner/]name of letters, digits, `-`, `_` and `.`, at most 96 characters a
# part, not starting or ending in `-` or `.`, without `--` or `..`.
HUB_ID = re.compile(r"^(?!.*(--|\.\.))([\w](?:[\w.-]{0,94}[\w])?/)?[\w](?:[\w.-]{0,94}[\w])?$")


def hub_id_problem(name: str, what: str) -> str | None:
    """Why `name`, which names no local path, is no hub id either, or None."""
    if HUB_ID.match(name):
        return None
    return (f"{name!r} is neither a {what} here nor a hub id (owner/name: letters, digits, -, _ and ., no '--' or '..'); "
            "write a local path starting with / or ./")


def local_data_path(path: str) -> Path | None:
    """data.path as a local file when it names one (it exists, or is written as a path), else None: a hub id."""
    p = Path(path).expanduser()
    if p.exists() or path.startswith(PATH_PREFIXES) or path.lower().endswith(LOCAL_DATA_SUFFIXES):
        return p.resolve()
    return None


def local_model_path(name: str) -> Path | None:
    """model.name as a directory when it names one (it exists, or is written as a path); None for a hub id
    or the bundled model."""
    if name in BUNDLED:
        return None
    p = Path(name).expanduser()
    if p.exists() or name.startswith(PATH_PREFIXES):
        return p.resolve()
    return None


def hub_model_id(name: str) -> str | None:
    """model.name when it names a hub repository (not a local directory, not the bundled model)."""
    return None if name in BUNDLED or local_model_path(name) else name


def hub_dataset_id(path: str) -> str | None:
    return None if local_data_path(path) else path


def cached_model_file(cfg, filename: str) -> Path | None:
    """A file of the run's hub model at model.revision in the shared cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    model = hub_model_id(cfg.model.name)
    found = try_to_load_from_cache(model, filename, cache_dir=hf_home(cfg) / "hub", revision=cfg.model.revision)
    return Path(found) if isinstance(found, str) else None


def dataset_cached(cfg, dataset_id: str) -> bool:
    """Whether some revision of the dataset has files in the run's shared cache."""
    return dataset_in_cache(hf_home(cfg), dataset_id)


def dataset_in_cache(home: Path, dataset_id: str) -> bool:
    """Whether some revision of the dataset has files in the cache at `home` (an HF_HOME). `datasets` downloads by
    commit and records no branch name, so this asks huggingface_hub's cache scan rather than a revision lookup."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        repos = scan_cache_dir(home / "hub").repos
    except CacheNotFound:
        return False
    return any(r.repo_type == "dataset" and r.repo_id == dataset_id and any(v.nb_files for v in r.revisions) for r in repos)


def hub_datasets(cfg) -> list[str]:
    """The hub datasets the run reads: data.path, or the paths of data.sources (which data/sources.py reads alike)."""
    paths = [entry["path"] for entry in cfg.data.sources] or [cfg.data.path]
    return [dataset for path in paths if (dataset := hub_dataset_id(path))]


def missing_from_cache(cfg) -> list[str]:
    """What the run would fetch from the hub but is not in the cache, in words."""
    missing = []
    model = hub_model_id(cfg.model.name)
    if model and cached_model_file(cfg, "config.json") is None:
        missing.append(f"model {model} (revision {cfg.model.revision or 'main'})")
    for dataset in hub_datasets(cfg):
        if not dataset_cached(cfg, dataset):
            missing.append(f"dataset {dataset}")
    return missing


def stage_command(config_path: str | None) -> str:
    return f"hpclora stage {shlex.quote(str(config_path)) if config_path else 'CONFIG'}"


def require_staged(cfg, config_path: str | None) -> None:
    """On an offline node, stop at once when the cache lacks what the run needs, and say how to fix it."""
    if not is_offline():
        return
    missing = missing_from_cache(cfg)
    if missing:
        raise UserError(
            f"this node is offline ({'/'.join(offline_switches())} set) and the Hugging Face cache "
            f"at {hf_home(cfg)} lacks: {', '.join(missing)}. On a node with internet, run `{stage_command(config_path)}` "
            "(with the same cache.hf_home), then submit again"
        )
