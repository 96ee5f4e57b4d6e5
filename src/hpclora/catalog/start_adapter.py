"""The adapter a run goes on from (model.adapter): a finished run's directory, or an adapter directory itself."""

from __future__ import annotations

import json
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"  # PEFT's, in every saved adapter


def adapter_dir(value: str) -> Path | None:
    """The adapter directory `value` names (a run directory's adapter/, or the directory itself), or None."""
    path = Path(value).expanduser()
    for candidate in (path / "adapter", path):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate.resolve()
    return None


def adapter_problem(value: str, model_name: str) -> str | None:
    """Why model.adapter cannot start this run: no adapter there, or one trained on another base than model.name
    (as the run it came from records it)."""
    found = adapter_dir(value)
    if found is None:
        why = "does not exist" if not Path(value).expanduser().exists() else f"holds no adapter ({ADAPTER_CONFIG})"
        return f"{value} {why}: give a finished run's directory (it has adapter/) or an adapter directory"
    try:
        json.loads((found / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{found / ADAPTER_CONFIG} cannot be read ({exc}): the adapter is damaged"
    base = trained_base(found)
    if base is not None and not same_model(base, model_name):
        return f"the adapter in {found} was trained on {base}, and model.name is {model_name}: set model.name={base}"
    return None


def trained_base(adapter: Path) -> str | None:
    """model.name of the run an adapter directory belongs to (its run's config.yaml), or None where there is no run."""
    run_config = adapter.parent / "config.yaml"
    if adapter.name != "adapter" or not run_config.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        return str(OmegaConf.load(run_config).model.name)
    except Exception:  # a config another version wrote: the job's loading of the adapter is the check
        return None


def same_model(a: str, b: str) -> bool:
    """Whether two model.name values name one model: equal, or paths to one directory."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
