"""`doctor`, without a compute node: has the torch that jobs will run kernels for the partition's GPUs? The torch of
the image (container.image, asked through the runtime) or else of this Python (jobs run the `hpclora` on PATH),
each read from its version.py without importing it (catalog/torch_builds.py)."""

from __future__ import annotations

import subprocess

from ..catalog.node import find_runtime
from ..catalog.torch_builds import VERSION_FILE_SCRIPT, TorchBuild, build_from_version_file, has_kernels, kernels_fix, \
    published_archs, torch_here, capability_tuple


def jobs_torch(cfg) -> tuple[TorchBuild | None, str]:
    """(the build jobs will import, where it is) or (None, why it is not known)."""
    image = cfg.container.image
    if not image:
        build = torch_here()
        return build, "this Python's environment" if build else "no torch in this Python's environment"
    runtime = find_runtime(cfg.container.runtime)
    if runtime is None:
        return None, f"the image {image} (no apptainer or singularity here to ask it)"
    try:
        done = subprocess.run([runtime, "exec", image, "python3", "-c", VERSION_FILE_SCRIPT], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"the image {image} ({exc})"
    build = build_from_version_file(done.stdout) if done.returncode == 0 else None
    return build, f"the image {image}" if build else f"the image {image} (its python3 has no torch: {done.stderr.strip()[-200:]})"


def kernel_verdicts(build: TorchBuild, gpus: dict[str, str]) -> list[tuple[str, str | None]]:
    """For each planner GPU name -> capability: (what the build offers it, the fix where it has no kernels)."""
    archs = published_archs(build)
    verdicts = []
    for name, capability in gpus.items():
        if has_kernels(archs, *capability_tuple(capability)):
            verdicts.append((f"{build.describe()} has kernels for {name} (sm_{capability.replace('.', '')})", None))
        elif not build.cuda:
            verdicts.append((f"{build.describe()}: jobs on {name} would find no GPU and stop", "a CUDA build of torch, or "
                             "container.image: an image built from containers/hpclora.def (hpclora-v100.def for V100s)"))
        else:
            verdicts.append((f"{build.describe()} has no kernels for {name} (sm_{capability.replace('.', '')}): jobs there would "
                             "stop at their first GPU kernel ('no kernel image is available')", kernels_fix(capability)))
    return verdicts
