"""What `hpclora probe` jobs measured on this user's cluster, per GPU type (or CPU) and model, in the per-user
calibration.json, which `hpclora plan`, `slurm.time: auto` and `hpclora doctor` read, so that their speed (and,
for the same settings, memory) comes from this cluster rather than from the built-in estimate. (GPU types the
planner does not know are the user's gpus.json: catalog/devices.py.)

Speed is kept as the ratio of measured to planned tokens/s: the planner's estimate for another sequence
length, batch or core count is multiplied by it. Memory is taken as measured only for the same memory
settings (a probe at micro-batch 1 says little about micro-batch 8). No torch: login nodes read it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ..catalog.state import state_dir
from ..config import world_size
from ..rundir import write_json

CALIBRATION_FILE = "calibration.json"


@dataclass
class Measurement:
    device: str  # the planner's name: v100-16gb, a100-80gb, cpu
    model: str
    job_id: str | None
    measured_on: str  # date, YYYY-MM-DD
    node: str
    gpu: str  # what the node called its GPU (or CPU model)
    tokens_per_s: float
    planned_tokens_per_s: float
    peak_gb: float
    planned_peak_gb: float
    settings: dict  # memory_settings() of the probed run (and its cores)

    @property
    def speed_ratio(self) -> float:
        return self.tokens_per_s / self.planned_tokens_per_s if self.planned_tokens_per_s else 1.0

    def by(self) -> str:
        return f"probe job {self.job_id or '(local)'} on {self.measured_on}"


def path() -> Path:
    return state_dir() / CALIBRATION_FILE


def load() -> dict[str, Measurement]:
    """Every measurement by `device|model`; no file is no calibration, and one that cannot be read is none either,
    said on stderr (plans go on without it: a broken file must not stop a submission)."""
    file = path()
    try:
        rows = json.loads(file.read_text(encoding="utf-8"))
        return {key: Measurement(**row) for key, row in rows.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, AttributeError, RecursionError) as exc:
        if file not in _warned:
            _warned.add(file)
            print(f"warning: {file} is not a calibration file hpclora can read ({type(exc).__name__}: {exc}); planning "
                  "with the built-in estimate (the next `hpclora probe` writes it anew)", file=sys.stderr)
        return {}


_warned: set[Path] = set()  # files already warned about in this process


def key(device: str, model: str) -> str:
    return f"{device}|{model}"


def find(device: str, model: str) -> Measurement | None:
    return load().get(key(device, model))


def record(m: Measurement) -> Path:
    """Keep `m` as the measurement for its device and model (the newest probe wins)."""
    rows = {k: asdict(v) for k, v in load().items()}
    rows[key(m.device, m.model)] = asdict(m)
    path().parent.mkdir(parents=True, exist_ok=True)
    write_json(path(), rows)
    return path()


def forget(device: str, model: str | None = None) -> list[str]:
    """Remove the measurements of `device` (of `model` only, if given); the keys removed."""
    rows = load()
    gone = [k for k, m in rows.items() if m.device == device and (model is None or m.model == model)]
    if gone:
        write_json(path(), {k: asdict(v) for k, v in rows.items() if k not in gone})
    return gone


def memory_settings(cfg, checkpointing: bool, checkpointed_layers: int | None) -> dict:
    """The settings a peak memory depends on, beyond the device and model (checkpointing as the plan resolved it)."""
    return {
        "max_length": cfg.data.max_length, "micro_batch_size": cfg.train.micro_batch_size, "lora_r": cfg.lora.r,
        "target_modules": cfg.lora.target_modules if isinstance(cfg.lora.target_modules, str) else list(cfg.lora.target_modules),
        "quant_bits": cfg.quant.bits, "precision": cfg.train.precision, "optimizer": cfg.train.optimizer,
        "gradient_checkpointing": checkpointing, "checkpointed_layers": checkpointed_layers,
        "ranks": world_size(cfg),
    }
