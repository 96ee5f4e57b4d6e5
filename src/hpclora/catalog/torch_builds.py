"""Which GPUs a build of PyTorch has kernels for, judged without importing torch: from the version and CUDA
release its `torch/version.py` names (read as text) and PyTorch's published support matrix for its Linux x86
wheels. The login node (`doctor`) judges the torch jobs will run this way; a job, which has torch, judges by
`torch.cuda.get_arch_list()` through the same `has_kernels`.

A torch without kernels for the node's GPU still reports `torch.cuda.is_available()`; its first kernel fails with
"no kernel image is available for execution on the device". V100s (sm_70) are the case in practice: CUDA 13 builds
never had them, CUDA 12.8/12.9 builds only from torch 2.8 to 2.10; the CUDA 12.6 builds still do.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

# The CUDA 12.6 (and older) wheels: Maxwell to Hopper; 12.8/12.9: Turing to Blackwell (Volta too in 2.8-2.10);
# 13.x: Turing to Blackwell. From PyTorch's RELEASE.md ("PyTorch CUDA Support Matrix").
LEGACY_ARCHS = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
BLACKWELL_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
VOLTA_IN_CUDA_12_8 = ((2, 8), (2, 10))  # the torch releases whose CUDA 12.8/12.9 wheels kept sm_70
# The build that still runs on a V100, and the image built on it.
VOLTA_FIX = ("a CUDA 12.6 build of torch (`pip install torch --index-url https://download.pytorch.org/whl/cu126`), "
             "or the image containers/hpclora-v100.def builds")


@dataclass(frozen=True)
class TorchBuild:
    version: str  # as torch.__version__: 2.13.0, 2.13.0+cpu, 2.4.1+cu118
    cuda: str | None  # the CUDA release it was built with (torch.version.cuda); None: a CPU build

    def describe(self) -> str:
        return f"torch {self.version} ({f'CUDA {self.cuda}' if self.cuda else 'CPU only, no CUDA'})"


def build_from_version_file(text: str) -> TorchBuild | None:
    """The build a torch/version.py describes, or None where it does not look like one."""
    version = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
    cuda = re.search(r"^cuda(?::[^=]*)?=\s*(?:['\"]([^'\"]+)['\"]|None)", text, re.M)
    if not version or not cuda:
        return None
    return TorchBuild(version.group(1), cuda.group(1))


def torch_here() -> TorchBuild | None:
    """The torch this Python would import (not imported: found and its version.py read), or None without one."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.origin:
        return None
    try:
        return build_from_version_file((Path(spec.origin).parent / "version.py").read_text(encoding="utf-8"))
    except OSError:
        return None


# Run by a container's python3 to describe its torch the same way (stdout: version.py's text).
VERSION_FILE_SCRIPT = ("import importlib.util, pathlib, sys\n"
                       "s = importlib.util.find_spec('torch')\n"
                       "sys.exit(3) if s is None else print(pathlib.Path(s.origin).parent.joinpath('version.py').read_text())")


def _release(version: str) -> tuple[int, int]:
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found[1]), int(found[2])) if found else (0, 0)


def published_archs(build: TorchBuild) -> list[str]:
    """The GPU architectures PyTorch's Linux x86 wheels of this build carry ([] for a CPU build)."""
    if not build.cuda:
        return []
    cuda = _release(build.cuda)
    if cuda < (12, 8):
        return LEGACY_ARCHS
    if cuda < (13, 0) and VOLTA_IN_CUDA_12_8[0] <= _release(build.version) <= VOLTA_IN_CUDA_12_8[1]:
        return ["sm_70", *BLACKWELL_ARCHS]
    return BLACKWELL_ARCHS


def has_kernels(arch_list: list[str], major: int, minor: int) -> bool:
    """Whether a torch built for `arch_list` (torch.cuda.get_arch_list()) runs on a GPU of this capability: its
    own sm_XY, an sm_XZ of the same major version below it (binary compatible), or PTX (compute_XY) of an
    older one, which the driver compiles. A V100 (7.0) has none in builds for sm_75 and up only."""
    want = major * 10 + minor
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        if not number.rstrip("a").isdigit():
            continue
        version, specific = int(number.rstrip("a")), number.endswith("a")  # sm_90a: for 9.0 only
        if kind == "sm" and (version == want or not specific and version // 10 == major and version <= want):
            return True
        if kind == "compute" and version <= want:
            return True
    return False


def capability_tuple(capability: str) -> tuple[int, int]:
    major, minor = capability.split(".")
    return int(major), int(minor)


def kernels_missing(arch_list: list[str], capability: str, gpu: str) -> str | None:
    """What a torch with these architectures lacks for a GPU of `capability` ("7.0"), or None where it runs."""
    major, minor = capability_tuple(capability)
    if has_kernels(arch_list, major, minor):
        return None
    return (f"it has kernels for {' '.join(arch_list) or 'no GPU'}, none for {gpu} (sm_{major}{minor}): its first GPU kernel "
            "would fail with 'no kernel image is available'")


def kernels_fix(capability: str) -> str:
    """The torch to use on a GPU of `capability` that a build lacks."""
    if capability_tuple(capability) < (7, 5):
        return VOLTA_FIX
    return "a torch build whose CUDA release supports this GPU (PyTorch's install page lists them)"
