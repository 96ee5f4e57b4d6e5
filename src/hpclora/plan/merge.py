"""What a merge (`hpclora merge`, and `hpclora export`, which merges first) asks of a CPU node: host memory and
time, from the model's dimensions alone (no torch), for `hpclora export --submit` to request.

Memory: results/merge.py loads the whole base unquantized in fp32 (a 16-bit or 4-bit base cannot hold the merged
update exactly), merges the adapter into it, checks every weight and casts it tensor by tensor: the fp32 weights,
plus a few copies of the largest tensor at a time (the safe merge, the finite check, the cast), plus the interpreter
and libraries. The converter then reads the saved model lazily and llama.cpp maps the GGUF from disk (pages the
kernel may drop): both stay below the merge's peak. Measured on SmolLM2-135M from a bf16 safetensors checkpoint:
0.32 GB before loading, 1.18 GB at the peak, for 0.54 GB of fp32 weights and a 0.11 GB embedding.
Time: a generous bound, so that the job is not killed at its limit. The export of SmolLM2-135M took 0.55 minutes per
GB of fp32 weights on this project's 2-core machine with a local disk (merge, conversion, quantization, check);
the bound takes 2, for slower shared storage, and a fixed part for starting up.
"""

from __future__ import annotations

import math

from ..catalog.dims import ModelDims, parameter_counts, projections
from .memory import CPU_BASELINE_GB, GB

MERGE_BYTES = 4  # per parameter: the fp32 base the adapter is merged into
LARGEST_COPIES = 3  # copies of the largest tensor alive at once (measured: 0.34 GB over the weights, embedding 0.11 GB)
MINUTES_PER_GB, FIXED_MINUTES = 2, 15


def largest_tensor(d: ModelDims) -> int:
    """Elements of the model's largest weight: the embedding (or head), or its widest projection."""
    return max(d.vocab * d.hidden, *(a * b for a, b in projections(d).values()))


def merge_memory_gb(d: ModelDims) -> float:
    """Peak host memory of merging an adapter into the base of dimensions `d`."""
    return CPU_BASELINE_GB + (parameter_counts(d)["total"] + LARGEST_COPIES * largest_tensor(d)) * MERGE_BYTES / GB


def merge_job_minutes(d: ModelDims) -> int:
    """A time limit for a merge-and-export job, in whole 5 minutes."""
    minutes = FIXED_MINUTES + MINUTES_PER_GB * parameter_counts(d)["total"] * MERGE_BYTES / GB
    return 5 * math.ceil(minutes / 5)
