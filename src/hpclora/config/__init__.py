"""The run's config: its typed schema (schema.py), loading with overrides (load.py), the checks a config alone
allows (rules.py), Slurm's own syntax (slurm_syntax.py), the numbers it implies (derived.py) and its reference
text (reference.py). Light: no torch, and only plain dataclasses leave it.
"""

from .derived import ranks_per_node, world_size
from .load import load, load_run_config, to_yaml
from .reference import explain, markdown as reference_markdown
from .schema import SECTIONS, RunConfig

__all__ = ["RunConfig", "SECTIONS", "explain", "load", "load_run_config", "ranks_per_node", "reference_markdown", "to_yaml", "world_size"]
