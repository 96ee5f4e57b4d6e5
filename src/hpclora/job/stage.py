"""`hpclora stage`: on a node with internet, fill the shared Hugging Face cache with what offline jobs
need (the model at model.revision, the dataset), tokenize the data into hpclora's cache, and write a
manifest of what was staged (ids, commits, sha256 of every file). The lookups jobs make in that cache
are in hub.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import UserError
from ..rundir import sha256_file
from ..catalog.hub import hf_home, hub_dataset_id, hub_model_id, is_offline, offline_switches, use_cache
from ..data.sources import data_sources


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
    return {str(p.relative_to(snapshot)): sha256_file(p) for p in sorted(snapshot.rglob("*")) if p.is_file()}


def _weights_patterns(files: list[str]) -> list[str]:
    """Download one weight format: safetensors when the repository has them, else PyTorch .bin files."""
    if any(f.endswith(".safetensors") for f in files):
        return ["*.bin", "*.pth", "*.pt", "*.h5", "*.msgpack", "*.onnx", "*.ot", "*.gguf"]
    return ["*.h5", "*.msgpack", "*.onnx", "*.ot", "*.gguf"]


def stage(cfg, config_path: str | None) -> dict:
    """Download model (at model.revision) and dataset into the shared cache, tokenize the data into its
    cache, and write a manifest; returns the manifest. Call use_cache(cfg) before any hub library is imported."""
    if is_offline():
        raise UserError(f"stage downloads from the hub, but this node is offline ({', '.join(offline_switches())} set): run it where there is internet")
    home = hf_home(cfg)  # the hub libraries write there when use_cache(cfg) ran before they were imported
    from huggingface_hub import HfApi, snapshot_download

    manifest: dict = {"config": str(config_path), "hf_home": str(home), "staged": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    api = HfApi()
    model = hub_model_id(cfg.model.name)
    if model:
        revision = cfg.model.revision or "main"
        info = _ask_hub(lambda: api.model_info(model, revision=revision), f"model.name: {model}")
        files = [s.rfilename for s in info.siblings or []]
        print(f"model {model}@{revision} (commit {info.sha}): downloading into {home / 'hub'}", flush=True)
        # By the name model.revision gives, so that the cache records that name for offline jobs to find.
        snapshot = Path(snapshot_download(model, revision=revision, ignore_patterns=_weights_patterns(files)))
        manifest["model"] = {"id": model, "revision": revision, "commit": snapshot.name, "files": _hashes(snapshot)}
    datasets = []  # each hub dataset of the run (data.path, or of data.sources) at the commit read now
    for source in data_sources(cfg.data):
        if dataset := hub_dataset_id(source.data.path):
            info = _ask_hub(lambda: api.dataset_info(dataset), f"{source.key}.path: {dataset}")
            print(f"dataset {dataset} (commit {info.sha}): downloading", flush=True)
            datasets.append({"id": dataset, "split": source.data.split, "commit": info.sha})

    from ..data import default_cache_dir, prepare
    from .model import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    data = prepare(cfg.data, tokenizer, cfg.run.seed, method=cfg.method.name)  # reads the dataset (hub: into the cache), tokenizes it
    for dataset in datasets:  # the data files `datasets` fetched into the hub cache while reading
        snapshot = snapshot_download(dataset["id"], repo_type="dataset", revision=dataset["commit"], cache_dir=home / "hub", local_files_only=True)
        dataset["files"] = _hashes(Path(snapshot))
    if datasets:
        manifest["datasets"] = datasets
    manifest["tokenized"] = {
        "cache_dir": cfg.data.cache_dir or str(default_cache_dir()),
        **{k: v for k, v in data.stats.items() if k.endswith(("_examples", "_tokens"))},
    }

    out = home / "hpclora" / "staged" / f"{time.strftime('%Y%m%d-%H%M%S')}-{Path(str(config_path)).stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    manifest["manifest"] = str(out)
    return manifest


def stage_command(config_path: str, overrides: list[str]) -> str:
    """`hpclora stage CONFIG`: fill the shared cache, and say what is there now."""
    from .. import config
    from .quiet import quiet_libraries

    cfg = config.load(config_path, overrides)
    use_cache(cfg)  # before any hub library is imported
    quiet_libraries()
    manifest = stage(cfg, config_path)
    lines = [f"{part}: {manifest[part]['id']} at commit {manifest[part]['commit']}" for part in ("model", "dataset") if part in manifest]
    tokenized = manifest["tokenized"]
    lines += [f"tokenized data: {tokenized['cache_dir']} ({tokenized.get('train_examples', 0)} train examples)",
              f"manifest: {manifest['manifest']}", f"jobs with HF_HOME={manifest['hf_home']} (cache.hf_home) can now run offline"]
    return "\n".join(lines)
