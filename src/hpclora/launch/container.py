"""Command lines for Singularity/Apptainer: build and test an image, and run hpclora inside one.

Pure functions of the config (tested against golden files), plus finding the runtime on PATH. Jobs
never use `--cleanenv`: SLURM_*, SUBMITIT_* and the job's own variables (HF_HOME, the offline
switches, secrets such as HF_TOKEN) reach the process inside through the environment.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..config import RunConfig
from ..data.sources import data_sources
from ..errors import UserError
from ..catalog.hub import local_data_path, local_model_path
from ..catalog.node import find_runtime

DEFAULT_DEF = Path("containers") / "hpclora.def"


def require_runtime(preferred: str = "auto") -> str:
    runtime = find_runtime(preferred)
    if runtime is None:
        wanted = "apptainer or singularity" if preferred == "auto" else preferred
        raise UserError(
            f"{wanted} is not on PATH here. Build and check images where it is installed (often a login or build "
            "node: try `module load apptainer`), then copy the .sif to shared storage"
        )
    return runtime


def build_command(runtime: str, definition: Path, image: Path) -> list[str]:
    """`<runtime> build --fakeroot IMAGE DEF`: --fakeroot builds without root, as on shared clusters."""
    return [runtime, "build", "--fakeroot", str(image), str(definition)]


def check_command(runtime: str, image: Path, gpu: bool) -> list[str]:
    """Run the image's %test section, with the host's NVIDIA driver when this machine has a GPU."""
    return [runtime, "test", *(["--nv"] if gpu else []), str(image)]


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
    def inside(path: str, other: str) -> bool:
        return path.startswith(other.rstrip("/") + "/")

    binds = [p for i, p in enumerate(wanted) if p not in wanted[:i] and not any(inside(p, q) for q in wanted)]
    return binds + [b for b in cfg.container.binds if b not in binds]


def exec_argv(cfg: RunConfig, runtime: str) -> list[str]:
    """`<runtime> exec [--nv] -B PATH ... [--env K=V ...] IMAGE`: what runs a command inside the job's image."""
    c = cfg.container
    nv = c.nv if c.nv is not None else cfg.slurm.gpus > 0
    words = [runtime, "exec", *(["--nv"] if nv else [])]
    for bind in job_binds(cfg):
        words += ["-B", bind]
    for name, value in c.env.items():
        words += ["--env", f"{name}={value}"]
    return [*words, c.image]


def container_command(action: str, image: str | None, definition: str, out: str, dry_run: bool) -> int:
    """`hpclora container build|check`: print the runtime's command line, and run it unless `dry_run`."""
    import shlex
    import subprocess

    runtime = find_runtime() or ("apptainer" if dry_run else require_runtime())
    if action == "build":
        definition_path = Path(definition).resolve()
        if not definition_path.is_file():
            raise UserError(f"{definition_path}: definition file not found (run from the repository root, or pass --def)")
        root = definition_path.parent.parent  # %files paths are relative to the project root
        argv = build_command(runtime, definition_path, Path(out).resolve())
    else:
        if not image:
            raise UserError("container check: give the image to test, e.g. hpclora container check hpclora.sif")
        root = Path.cwd()
        argv = check_command(runtime, Path(image).resolve(), gpu=shutil.which("nvidia-smi") is not None)
    print(f"(cd {shlex.quote(str(root))} && {shlex.join(argv)})")
    return 0 if dry_run else subprocess.run(argv, cwd=root).returncode
