"""Offline compute nodes: what a run needs from the Hugging Face hub, whether the shared cache has it,
and `hpclora stage`, which fills that cache on a node with internet.

The checks read the cache's directory layout only (no hub client, no torch), so that `submit` can
warn on the login node and a job fails in its first second, not after loading half a model.
Hub cache layout: <HF_HOME>/hub/{models,datasets}--<owner>--<name>/{refs/<revision>, snapshots/<commit>/...}.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import time
from pathlib import Path

from .config import RunConfig, looks_local
from .errors import UserError

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def hf_home(cfg: RunConfig) -> Path:
    """cache.hf_home, else $HF_HOME, else ~/.cache/huggingface."""
    return Path(cfg.cache.hf_home or os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")


def use_cache(cfg: RunConfig) -> None:
    """Point the hub libraries at cache.hf_home; they read HF_HOME when imported, so call this first."""
    if cfg.cache.hf_home:
        os.environ["HF_HOME"] = cfg.cache.hf_home


def is_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in OFFLINE_VARS)


def local_model_path(cfg: RunConfig) -> Path | None:
    """model.name as a directory when it names one (it exists, or is written as a path)."""
    name = cfg.model.name
    if Path(name).expanduser().exists() or name.startswith(("/", "./", "../", "~")):
        return Path(name).expanduser().resolve()
    return None


def hub_model_id(cfg: RunConfig) -> str | None:
    """model.name when it names a hub repository (not a local directory, not the bundled model)."""
    from .bundled import BUNDLED_NAME

    if cfg.model.name == BUNDLED_NAME or local_model_path(cfg):
        return None
    return cfg.model.name


def hub_dataset_id(cfg: RunConfig) -> str | None:
    path = cfg.data.path
    return None if looks_local(path) or Path(path).expanduser().exists() else path


def _repo_dir(home: Path, kind: str, repo_id: str) -> Path:
    return home / "hub" / f"{kind}s--{repo_id.replace('/', '--')}"


def cached_snapshot(home: Path, kind: str, repo_id: str, revision: str | None, needs: str | None) -> Path | None:
    """The snapshot directory of repo@revision in the cache (holding `needs`, if given), or None."""
    repo = _repo_dir(home, kind, repo_id)
    revision = revision or "main"
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo / "snapshots" / commit
    if not snapshot.is_dir() or not any(snapshot.iterdir()):
        return None
    if needs and not (snapshot / needs).exists():
        return None
    return snapshot


def dataset_cached(home: Path, dataset_id: str) -> bool:
    """Hub files of the dataset, or the Arrow tables `datasets` prepared from them."""
    prepared = home / "datasets" / dataset_id.replace("/", "___")
    return cached_snapshot(home, "dataset", dataset_id, None, None) is not None or prepared.is_dir()


def missing_from_cache(cfg: RunConfig) -> list[str]:
    """What the run would fetch from the hub but is not in the cache, in words."""
    home, missing = hf_home(cfg), []
    model = hub_model_id(cfg)
    if model and cached_snapshot(home, "model", model, cfg.model.revision, "config.json") is None:
        missing.append(f"model {model} (revision {cfg.model.revision or 'main'})")
    dataset = hub_dataset_id(cfg)
    if dataset and not dataset_cached(home, dataset):
        missing.append(f"dataset {dataset}")
    return missing


def stage_command(config_path: str | None) -> str:
    return f"hpclora stage {shlex.quote(str(config_path)) if config_path else 'CONFIG'}"


def require_staged(cfg: RunConfig, config_path: str | None) -> None:
    """On an offline node, stop at once when the cache lacks what the run needs, and say how to fix it."""
    if not is_offline():
        return
    missing = missing_from_cache(cfg)
    if missing:
        raise UserError(
            f"this node is offline ({'/'.join(v for v in OFFLINE_VARS if os.environ.get(v))} set) and the Hugging Face cache "
            f"at {hf_home(cfg)} lacks: {', '.join(missing)}. On a node with internet, run `{stage_command(config_path)}` "
            "(with the same cache.hf_home), then submit again"
        )


# ----------------------------------------------------------------------------------------------
# hpclora stage


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _ask_hub(call, what: str):
    """A hub request whose failure is the user's to fix (typo, gated, no network): a clear error, not a traceback."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return call()
    except GatedRepoError:
        raise UserError(f"{what}: gated repository: accept its terms on the hub and export HF_TOKEN, then stage again") from None
    except RepositoryNotFoundError:
        raise UserError(f"{what}: no such repository on the hub (or it is private: export HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise UserError(f"{what}: the revision does not exist (model.revision)") from None
    except Exception as exc:  # no network (the HTTP client's own errors), server errors, ...
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(
            f"{what}: the hub did not answer ({type(exc).__name__}: {first}): check the id, HF_TOKEN for private "
            "repositories, and that this node has internet"
        ) from None


def _hashes(snapshot: Path) -> dict[str, str]:
    """sha256 of every file of a cached snapshot, by its path in the repository."""
    return {str(p.relative_to(snapshot)): _sha256(p) for p in sorted(snapshot.rglob("*")) if p.is_file()}


def _weights_patterns(files: list[str]) -> list[str]:
    """Download one weight format: safetensors when the repository has them, else PyTorch .bin files."""
    if any(f.endswith(".safetensors") for f in files):
        return ["*.bin", "*.pth", "*.pt", "*.h5", "*.msgpack", "*.onnx", "*.ot", "*.gguf"]
    return ["*.h5", "*.msgpack", "*.onnx", "*.ot", "*.gguf"]


def stage(cfg: RunConfig, config_path: str | None) -> dict:
    """Download model (at model.revision) and dataset into the shared cache, tokenize the data into its
    cache, and write a manifest; returns the manifest. Call use_cache(cfg) before any hub library is imported."""
    if is_offline():
        raise UserError(f"stage downloads from the hub, but this node is offline ({', '.join(v for v in OFFLINE_VARS if os.environ.get(v))} set): run it where there is internet")
    home = hf_home(cfg)  # the hub libraries write there when use_cache(cfg) ran before they were imported
    from huggingface_hub import HfApi, snapshot_download

    manifest: dict = {"config": str(config_path), "hf_home": str(home), "staged": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    api = HfApi()
    model = hub_model_id(cfg)
    if model:
        info = _ask_hub(lambda: api.model_info(model, revision=cfg.model.revision), f"model.name: {model}")
        files = [s.rfilename for s in info.siblings or []]
        print(f"model {model}@{cfg.model.revision or 'main'} (commit {info.sha}): downloading into {home / 'hub'}", flush=True)
        snapshot = Path(snapshot_download(model, revision=info.sha, ignore_patterns=_weights_patterns(files)))
        if cfg.model.revision is None or cfg.model.revision != info.sha:  # so that offline jobs find the revision they name
            ref = _repo_dir(home, "model", model) / "refs" / (cfg.model.revision or "main")
            ref.parent.mkdir(parents=True, exist_ok=True)
            ref.write_text(info.sha)
        manifest["model"] = {"id": model, "revision": cfg.model.revision or "main", "commit": info.sha, "files": _hashes(snapshot)}
    dataset = hub_dataset_id(cfg)
    if dataset:
        info = _ask_hub(lambda: api.dataset_info(dataset), f"data.path: {dataset}")
        print(f"dataset {dataset} (commit {info.sha}): downloading", flush=True)
        manifest["dataset"] = {"id": dataset, "split": cfg.data.split, "commit": info.sha}

    from .data import default_cache_dir, prepare
    from .model import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    data = prepare(cfg.data, tokenizer, cfg.run.seed)  # reads the dataset (hub: into the cache) and tokenizes it
    if dataset:  # the data files `datasets` fetched into the hub cache while reading
        snapshot = _repo_dir(home, "dataset", dataset) / "snapshots" / manifest["dataset"]["commit"]
        manifest["dataset"]["files"] = _hashes(snapshot) if snapshot.is_dir() else {}
    manifest["tokenized"] = {
        "cache_dir": cfg.data.cache_dir or str(default_cache_dir()),
        **{k: v for k, v in data.stats.items() if k.endswith(("_examples", "_tokens"))},
    }

    out = home / "hpclora" / "staged" / f"{time.strftime('%Y%m%d-%H%M%S')}-{Path(str(config_path)).stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    manifest["manifest"] = str(out)
    return manifest
