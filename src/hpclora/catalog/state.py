"""Where hpclora keeps what outlives a run, per user: its state (the job index, probe measurements, the user's own
GPU types) and its caches (the bundled model converted once, tokenized data)."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """This user's hpclora state: $HPCLORA_STATE_DIR, else $XDG_STATE_HOME/hpclora (~/.local/state by default).
    Several people or trials sharing one account keep apart by setting HPCLORA_STATE_DIR per project."""
    root = os.environ.get("HPCLORA_STATE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "hpclora"
    return Path(root)


def cache_root() -> Path:
    """Root of hpclora's caches: $HPCLORA_CACHE, else ~/.cache/hpclora."""
    return Path(os.environ.get("HPCLORA_CACHE") or Path.home() / ".cache" / "hpclora").expanduser()
