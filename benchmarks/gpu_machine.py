"""What the lent GPU machine is, once, for the scripts that prepare, run and rehearse the GPU check
(gpu_carry.py, gpu_check.py, the Makefile's gpu-* targets and tests/test_gpu_check.py).

It has one H100 or H200, Python 3.12 with a stock CUDA torch and its company, no internet, a 600-second limit per
command, about 15 minutes in all, about 64 MiB carried per command (the working tree included) and at most 8 files
back, each from a folder no more than 2 levels down. What it lacks travels as wheels (CARRIED), pinned to the versions
the suite runs here, built for its Python and platform.
"""

from __future__ import annotations

from pathlib import Path

from packaging.utils import canonicalize_name as normalized  # a distribution's name as pip compares them (PEP 503)

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / ".gpu-carry"  # ignored by git; `make gpu-carry` fills it
PYTHON = "3.12"
# pip's platform tags for a manylinux x86_64 machine (pip matches each one exactly; bitsandbytes is manylinux_2_24)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
SHARE_LIMIT_MIB = 60  # a call's carried share: the working tree and what is carried, below the 64 MiB it takes

# The image's packages that hpclora, its carried wheels and the check use, at the versions seen there (2026-11; None:
# present, version not seen). The check's header records the versions it finds, so that this can follow the image.
STOCK = {
    "transformers": "5.17.0", "huggingface_hub": "1.33.0", "accelerate": "1.15.0", "tokenizers": "0.23.2",
    "safetensors": "0.8.0", "sentencepiece": "0.2.2", "numpy": None, "pyyaml": None, "jinja2": None, "pandas": None,
    "pyarrow": None, "xxhash": None, "fsspec": None, "requests": None, "tqdm": None, "filelock": None, "psutil": None,
    "packaging": None, "regex": None, "matplotlib": None, "tensorboard": None, "charset-normalizer": None,
    "cloudpickle": None, "typing-extensions": None, "httpx": None, "aiohttp": None,
}
STOCK_TORCH = "2.11.0"  # a CUDA 13.0 build there; the rehearsal runs this machine's CPU build instead
# Every distribution the image holds (as last read, 2026-11-17): the rehearsal's environment may hold nothing else.
STOCK_NAMES = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
# What the newest releases of stock packages need that the image's older ones did not (typer: pydantic; python-dateutil:
# tzdata). pip brings them into the rehearsal's environment; nothing of hpclora's imports them.
NEWER_NEEDS = {"pydantic", "pydantic-core", "annotated-types", "typing-inspection", "tzdata"}

# What it lacks, pinned to what the suite runs here. peft is there too, at a version nobody has seen: the carried one
# goes first on the path, so that the check runs the peft the suite tested.
CARRIED = {
    "bitsandbytes": "0.50.2", "peft": "0.22.0", "datasets": "5.2.0", "dill": "0.4.1", "multiprocess": "0.70.19",
    "omegaconf": "2.4.0", "submitit": "1.5.4", "gguf": "0.19.0", "trl": "1.16.0",
}
LIGER = {"liger-kernel": "0.8.5"}  # apart, on its own path entry, so that the check trains with and without it

# The stand-in models: the published configs (the planner's table, benchmarks/shaped_model.py) and SmolLM2-135M's own,
# with their tokenizers; weights are made on the machine (random: peak memory and speed do not depend on their values).
SMOLLM2 = "smollm2-135m"
SHAPED = {"open-calm-1b": "cyberagent/open-calm-1b", "Llama-2-7b-hf": "meta-llama/Llama-2-7b-hf"}



def requirements() -> list[str]:
    """The stock packages as pip requirements, at the image's versions where they were seen."""
    return [f"{name}=={version}" if version else name for name, version in STOCK.items()]


def foreign() -> list[str]:
    """What this Python's environment holds that the GPU machine's image does not (the rehearsal's must be empty)."""
    import importlib.metadata

    names = {normalized(d.metadata["Name"]) for d in importlib.metadata.distributions()}
    return sorted(names - {normalized(n) for n in STOCK_NAMES | NEWER_NEEDS})


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["requirements"]:
        print(" ".join(requirements()))
    elif sys.argv[1:] == ["verify"]:
        extra = foreign()
        if extra:
            raise SystemExit(f"this environment holds what the GPU machine lacks, so a missing wheel would pass here: {', '.join(extra)}")
        print("the rehearsal's environment holds only packages the GPU machine's image holds")
    else:
        raise SystemExit("usage: gpu_machine.py requirements|verify")
