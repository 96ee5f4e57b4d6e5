"""A job that asked for a GPU and has none it can use stops in its first seconds, saying what it asked, what it
found and the fix, instead of training on the CPU for the whole time limit under a `device cpu` line.

What it may find instead of a usable GPU: a torch built without CUDA, a container started without `--nv` (the node's
driver is there, the image does not see it), no driver or no visible device, or a torch without kernels for the
GPU's architecture (a V100 under a torch whose CUDA release dropped sm_70).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..catalog.torch_builds import TorchBuild, kernels_fix, kernels_missing
from ..errors import UserError

# What Slurm sets in a job that was given GPUs (gres or --gpus).
SLURM_GPU_VARIABLES = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE")
CONTAINER_VARIABLES = ("APPTAINER_CONTAINER", "SINGULARITY_CONTAINER")  # set inside an image by either runtime
HOST_DRIVER = Path("/proc/driver/nvidia/version")  # the node's kernel driver: seen from inside an image too
# Train on the CPU all the same: for trying a GPU job's layout (packed trials, ranks per GPU) on a node whose GPUs
# this torch cannot use, as the tests do on the test cluster's fake GPUs.
TRAIN_ON_CPU_VAR = "HPCLORA_TRAIN_ON_CPU"


class NoUsableGpu(UserError):
    def __init__(self, asked: str, found: str, fix: str, cpu_on_purpose: str = "slurm.gpus=0"):
        self.parts, self.cpu_on_purpose = (asked, found, fix), cpu_on_purpose
        super().__init__(f"this job asked for a GPU and has none it can use: asked {asked}; found {found}; fix: {fix}")

    def lines(self) -> list[str]:
        asked, found, fix = self.parts
        return ["this job asked for a GPU and has none it can use; it stops rather than train on the CPU, many times slower:",
                f"  asked: {asked}", f"  found: {found}", f"  fix:   {fix}",
                f"  (to train on the CPU on purpose: {self.cpu_on_purpose})"]


def gpu_asked(slurm_gpus: int, env=os.environ) -> str | None:
    """What asked this process for a GPU, in words, or None: the Slurm job it runs in was given GPUs, or its config
    asks for them (slurm.gpus) and it runs as a Slurm job. Outside Slurm a run started by hand may use the CPU."""
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    given = [f"{name}={env[name]}" for name in SLURM_GPU_VARIABLES
             if env.get(name) and not (name == "SLURM_GPUS_ON_NODE" and env[name] == "0")]  # the others list GPU indices
    if slurm_gpus > 0 or given:
        return f"slurm.gpus={slurm_gpus} in Slurm job {job}" + (f", which Slurm gave GPUs ({', '.join(given)})" if given else "")
    return None


def torch_facts() -> dict:
    """What this process's torch sees: its build, whether CUDA answers, the first GPU and the kernels it has. Imports torch."""
    import torch

    facts = {"build": TorchBuild(torch.__version__, torch.version.cuda), "cuda_available": torch.cuda.is_available(),
             "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "host_driver": HOST_DRIVER.is_file(),
             "image": next((os.environ[v] for v in CONTAINER_VARIABLES if os.environ.get(v)), None)}
    if facts["cuda_available"]:
        major, minor = torch.cuda.get_device_capability(0)
        facts.update(gpu=torch.cuda.get_device_name(0), capability=f"{major}.{minor}", arch_list=torch.cuda.get_arch_list())
    return facts


def why_unusable(facts: dict) -> tuple[str, str] | None:
    """(what was found, the fix) where these facts leave no usable GPU; None where the GPU can train."""
    build: TorchBuild = facts["build"]
    inside = f" inside the image {facts['image']}" if facts["image"] else ""
    if not build.cuda:
        fix = ("build the image from containers/hpclora.def (or hpclora-v100.def for V100s): its torch has CUDA" if facts["image"]
               else "install a CUDA build of torch in the environment jobs use, or run jobs in the image (container.image)")
        return f"{build.describe()}{inside}", fix
    if not facts["cuda_available"]:
        if facts["image"] and facts["host_driver"]:
            return (f"{build.describe()}{inside}, which does not see the node's NVIDIA driver: the image was started without --nv",
                    "container.nv: null or true (on with slurm.gpus > 0); in a hand-written job script: `apptainer exec --nv`")
        if facts["visible"] is not None and facts["visible"].strip() in ("", "-1", "none", "NoDevFiles"):
            return (f"{build.describe()}, but CUDA_VISIBLE_DEVICES={facts['visible']!r} hides every GPU",
                    "leave CUDA_VISIBLE_DEVICES to Slurm (do not set it in slurm.setup or the job script)")
        if not facts["host_driver"]:
            return (f"{build.describe()}, but this node has no NVIDIA driver ({HOST_DRIVER} is missing)",
                    "a partition with GPUs (slurm.partition; `hpclora doctor CONFIG --probe` checks its nodes)")
        return (f"{build.describe()}{inside}: the NVIDIA driver is there, but CUDA does not start (often a driver older "
                f"than CUDA {build.cuda} needs)", f"a torch (or image) built for an older CUDA release; `nvidia-smi` shows the driver's")
    problem = kernels_missing(facts["arch_list"], facts["capability"], facts["gpu"])
    return (f"{build.describe()}{inside}: {problem}", kernels_fix(facts["capability"])) if problem else None


def require_usable_gpu(slurm_gpus: int) -> str | None:
    """Stop (NoUsableGpu, exit 2) where this job asked for a GPU and cannot train on one; with TRAIN_ON_CPU_VAR=1 in
    its environment, the warning to log instead."""
    asked = gpu_asked(slurm_gpus)
    reason = why_unusable(torch_facts()) if asked else None
    if reason and os.environ.get(TRAIN_ON_CPU_VAR) == "1":
        return f"warning: this job asked for a GPU ({asked}) and found {reason[0]}: training on the CPU, as {TRAIN_ON_CPU_VAR}=1 says"
    if reason:  # a config of slurm.gpus: 0 was given GPUs by the job script's own request (jobs/train.sbatch's --gres)
        raise NoUsableGpu(asked, *reason, "slurm.gpus=0" if slurm_gpus else "ask Slurm for none: `sbatch --gres=gpu:0 ...`")
    return None
