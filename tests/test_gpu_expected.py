"""A job that asked for a GPU and has none it can use stops at once with what it asked, found and the fix; the
login node judges which torch builds have kernels for a GPU without importing torch.

The job's refusal runs for real on this machine's torch (a CPU build: the case "torch without CUDA"), as a Slurm job
sees itself through the variables Slurm sets. The other cases (a CUDA torch without `--nv`, without a driver, or
without kernels for a V100) need a GPU node: for them the judgement is tested on the facts such a node reports
(dictionaries written here, as torch.cuda would describe a V100 and an H100)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpclora.catalog.torch_builds import TorchBuild, build_from_version_file, has_kernels, published_archs, torch_here
from hpclora.job.gpu_expected import gpu_asked, why_unusable

from conftest import tiny_run_yaml

CUDA_13 = TorchBuild("2.13.0", "13.0")
H100 = {"gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0"}
V100 = {"gpu": "Tesla V100-SXM2-16GB", "capability": "7.0"}


def facts(build=CUDA_13, cuda_available=True, image=None, host_driver=True, visible=None, gpu=H100):
    found = {"build": build, "cuda_available": cuda_available, "image": image, "host_driver": host_driver, "visible": visible}
    if cuda_available:
        found.update(gpu, arch_list=published_archs(build))
    return found


@pytest.mark.parametrize("build, sm70", [
    (TorchBuild("2.13.0", "13.0"), False),  # the default `torch==2.13.0` wheel
    (TorchBuild("2.13.0+cu128", "12.8"), False),  # Volta left the CUDA 12.8 builds in 2.11
    (TorchBuild("2.9.1+cu128", "12.8"), True),
    (TorchBuild("2.13.0+cu126", "12.6"), True),
    (TorchBuild("2.4.1", "11.8"), True),  # containers/hpclora-v100.def's base
    (TorchBuild("2.13.0+cpu", None), False),
])
def test_which_builds_run_on_a_v100(build, sm70):
    assert has_kernels(published_archs(build), 7, 0) is sm70
    assert has_kernels(published_archs(build), 8, 0) is (build.cuda is not None)


def test_the_torch_here_is_read_without_importing_it():
    found = subprocess.run([sys.executable, "-c", "import sys\nfrom hpclora.catalog.torch_builds import torch_here\n"
                            "b = torch_here(); print(b.version, b.cuda, 'torch' in sys.modules)"], capture_output=True, text=True, check=True)
    import torch

    assert found.stdout.split() == [torch.__version__, str(torch.version.cuda), "False"]
    assert build_from_version_file("__version__ = '2.4.1'\ncuda: Optional[str] = '11.8'\n") == TorchBuild("2.4.1", "11.8")
    assert build_from_version_file("not a version file") is None
    assert torch_here() == TorchBuild(torch.__version__, torch.version.cuda)


def test_what_asked_for_a_gpu():
    assert gpu_asked(1, {}) is None  # by hand, outside Slurm: the CPU may train
    assert gpu_asked(0, {"SLURM_JOB_ID": "7"}) is None  # a CPU job
    assert gpu_asked(1, {"SLURM_JOB_ID": "7"}) == "slurm.gpus=1 in Slurm job 7"
    assert gpu_asked(0, {"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "0,1"}) == "slurm.gpus=0 in Slurm job 7, which Slurm gave GPUs (SLURM_JOB_GPUS=0,1)"


def test_each_way_of_having_no_usable_gpu_is_named_with_its_fix():
    assert why_unusable(facts()) is None
    found, fix = why_unusable(facts(TorchBuild("2.13.0+cpu", None), cuda_available=False))
    assert "torch 2.13.0+cpu (CPU only, no CUDA)" in found and "CUDA build of torch" in fix
    found, fix = why_unusable(facts(TorchBuild("2.13.0+cpu", None), cuda_available=False, image="/srv/img.sif"))
    assert "inside the image /srv/img.sif" in found and "containers/hpclora.def" in fix
    found, fix = why_unusable(facts(cuda_available=False, image="/srv/img.sif"))
    assert "started without --nv" in found and "container.nv" in fix
    found, fix = why_unusable(facts(cuda_available=False, host_driver=False))
    assert "no NVIDIA driver" in found and "partition with GPUs" in fix
    found, fix = why_unusable(facts(cuda_available=False, visible=""))
    assert "CUDA_VISIBLE_DEVICES=''" in found
    found, fix = why_unusable(facts(gpu=V100))
    assert "none for Tesla V100-SXM2-16GB (sm_70)" in found and "no kernel image is available" in found
    assert "cu126" in fix and "hpclora-v100.def" in fix
    assert why_unusable(facts(TorchBuild("2.4.1", "11.8"), gpu=V100)) is None


def hpclora_train(config: Path, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpclora", "train", str(config), "--run-dir", str(tmp_path / "run")],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def test_a_gpu_job_on_a_torch_without_cuda_stops_before_training(tmp_path, tiny_llama_dir):
    config = tiny_run_yaml(tmp_path, tiny_llama_dir, slurm={"gpus": 1})
    done = hpclora_train(config, tmp_path, SLURM_JOB_ID="4242", SLURM_JOB_GPUS="0", SLURM_GPUS_ON_NODE="1")
    import torch

    assert done.returncode == 2, done.stderr
    assert "asked for a GPU and has none it can use" in done.stderr
    assert "asked: slurm.gpus=1 in Slurm job 4242, which Slurm gave GPUs (SLURM_JOB_GPUS=0, SLURM_GPUS_ON_NODE=1)" in done.stderr
    assert f"found: torch {torch.__version__} (CPU only, no CUDA)" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained


def test_a_run_started_by_hand_trains_on_the_cpu_and_says_the_config_asks_jobs_for_a_gpu(tmp_path, tiny_llama_dir):
    config = tiny_run_yaml(tmp_path, tiny_llama_dir, slurm={"gpus": 1}, train={"max_steps": 1})
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run([sys.executable, "-m", "hpclora", "train", str(config), "--run-dir", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "slurm.gpus=1 asks jobs for a GPU; run here, outside a Slurm job, this process has none and trains on the CPU" in done.stdout


def test_doctor_judges_the_torch_jobs_import_for_the_partitions_gpus():
    from hpclora.site.job_torch import kernel_verdicts

    gpus = {"v100-16gb": "7.0", "a100-40gb": "8.0"}
    (v100, fix), (a100, none) = kernel_verdicts(TorchBuild("2.13.0", "13.0"), gpus)  # the default `torch==2.13.0`
    assert "torch 2.13.0 (CUDA 13.0) has no kernels for v100-16gb (sm_70)" in v100 and "cu126" in fix
    assert a100 == "torch 2.13.0 (CUDA 13.0) has kernels for a100-40gb (sm_80)" and none is None
    assert [fix for _, fix in kernel_verdicts(TorchBuild("2.4.1", "11.8"), gpus)] == [None, None]
    (cpu, fix), _ = kernel_verdicts(TorchBuild("2.13.0+cpu", None), gpus)
    assert "jobs on v100-16gb would find no GPU and stop" in cpu and "containers/hpclora.def" in fix
