"""Command lines for Singularity/Apptainer: what runs hpclora inside a job's image.

Pure functions of the config (tested against golden files), plus finding the runtime on PATH. Jobs
never use `--cleanenv`: SLURM_*, SUBMITIT_* and the job's own variables (HF_HOME, the offline
switches, secrets such as HF_TOKEN) reach the process inside through the environment.
"""

from __future__ import annotations

from ..config import RunConfig
from ..data.sources import data_sources
from ..errors import UserError
from ..catalog.hub import local_data_path, local_model_path
from ..catalog.node import find_runtime


def require_runtime(preferred: str = "auto") -> str:
    runtime = find_runtime(preferred)
    if runtime is None:
        wanted = "apptainer or singularity" if preferred == "auto" else preferred
        raise UserError(
            f"{wanted} is not on PATH here. Build and check images where it is installed (often a login or build "
            "node: try `module load apptainer`), then copy the .sif to shared storage"
        )
    return runtime


def job_binds(cfg: RunConfig) -> list[str]:
    """What a job inside the image must see: output root (run directories), data, caches, a local model,
    and `container.binds`. Paths under another bound path are left out; order is kept."""
    wanted = [cfg.run.output_root]
    for source in data_sources(cfg.data):
        if (data := local_data_path(source.data.path)) is not None:
            wanted.append(str(data.parent))
    for path in (cfg.data.cache_dir, cfg.cache.hf_home):
        if path:
            wanted.append(path)
    if (model := local_model_path(cfg.model.name)) is not None:
        wanted.append(str(model))
    if cfg.model.adapter:  # the adapter directory the run goes on from (config.load made it absolute)
        wanted.append(cfg.model.adapter)
    def inside(path: str, other: str) -> bool:
        return path.startswith(other.rstrip("/") + "/")

    binds = [p for i, p in enumerate(wanted) if p not in wanted[:i] and not any(inside(p, q) for q in wanted)]
    return binds + [b for b in cfg.container.binds if b not in binds]


def uses_nv(cfg: RunConfig) -> bool:
    """Whether the job's image runs with --nv (the host's NVIDIA driver and GPUs): container.nv, else when it asks for GPUs."""
    return cfg.container.nv if cfg.container.nv is not None else cfg.slurm.gpus > 0


def filled_binds(cfg: RunConfig) -> list[str]:
    """The bound folders the job itself fills (the caches): apptainer refuses to start where a bind's source does not
    exist yet, so the job script makes them first."""
    return [path for path in (cfg.data.cache_dir, cfg.cache.hf_home) if path]


def exec_argv(cfg: RunConfig, runtime: str) -> list[str]:
    """`[env K=V ...] <runtime> exec [--nv] -B PATH ... IMAGE`: what runs a command inside the job's image.
    container.env reaches the process inside as the runtime's own environment, which apptainer hands on as it is:
    its `--env K=V` (and APPTAINERENV_K) values are evaluated as shell text inside the container, `$(...)` run."""
    variables = [f"{name}={value}" for name, value in cfg.container.env.items()]
    words = [*(["env", *variables] if variables else []), runtime, "exec", *(["--nv"] if uses_nv(cfg) else [])]
    for bind in job_binds(cfg):
        words += ["-B", bind]
    return [*words, cfg.container.image]
