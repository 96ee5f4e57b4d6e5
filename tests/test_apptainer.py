"""The container path for real: a real Apptainer (tests/apptainer/up.sh), the image built from containers/hpclora.def by
`hpclora container build --from` on a base of Debian packages and CPU torch (tests/apptainer/image.py), and jobs,
stops and interactive commands inside it, under the test Slurm (tests/slurm/up.sh).

The jobs' run directories, data and caches live under /srv ("shared storage" with a space in its name), which
apptainer does not bind by itself as it binds /tmp and the home directory: only the job's own -B list brings them in.
Without apptainer or the image these tests skip, saying why; with HPCLORA_REQUIRE_APPTAINER=1 (.ci/run) they fail.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, container_image, require_slurm, tiny_run_yaml
from hub_standin import staged_offline_job
from test_slurm import (PACING_SITE, env, hpclora, job_id_from, metrics_steps, paced, requeue_records,  # noqa: F401 (env)
                        same_weights, signal_after, trained_steps, wait_for)

IMAGE_PYTHON = "/usr/bin/python3"
IMAGE_PACKAGE = "/usr/local/lib/python3.11/dist-packages/hpclora"  # where the definition's pip puts hpclora


@pytest.fixture(scope="module")
def image() -> Path:
    return container_image()


@pytest.fixture
def shared(tmp_path) -> Path:
    """The cluster's shared storage: a folder under /srv (not bound by apptainer unless asked) with a space in it."""
    path = Path("/srv/hpclora-tests") / f"{tmp_path.name}-{os.getpid()}" / "shared storage"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path.parent, ignore_errors=True)


@pytest.fixture
def user_site(tmp_path) -> dict:
    """A user site (`pip install --user`, ~/.local) holding a `peft` that would shadow the image's: PYTHONUSERBASE
    points at it, as ~/.local is seen inside through the bound home directory."""
    site = tmp_path / "userbase" / "lib" / "python3.11" / "site-packages" / "peft"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("raise ImportError('the user site shadowed the image')\n")
    return {"PYTHONUSERBASE": str(tmp_path / "userbase")}


def runtime(*args, env=None, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*map(str, args)], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_the_image_checks_and_runs_hpclora_as_the_docs_show(image, tmp_path, user_site):
    """`hpclora container check` runs the image's %test; `singularity run IMAGE validate CONFIG` and `singularity exec
    IMAGE hpclora ...` run the image's hpclora on its own Python, whatever the user's ~/.local holds; compiled-kernel
    caches go to the node's /tmp, which is the host's, not a small tmpfs; `--nv` without a GPU runs without one."""
    check = runtime(sys.executable, "-m", "hpclora", "container", "check", image)
    assert check.returncode == 0, check.stdout + check.stderr
    for name in ("torch", "transformers", "peft", "bitsandbytes", "llama_cpp", "hpclora"):
        assert name in check.stdout
    assert "no GPU visible: CUDA and bitsandbytes not checked" in check.stdout

    validated = runtime("singularity", "run", image, "validate", "configs/demo-cpu.yaml", cwd=ROOT)
    assert validated.returncode == 0 and "configs/demo-cpu.yaml: valid" in validated.stderr, validated.stderr

    probe = ("import json, os, shutil, peft, hpclora; print(json.dumps({'peft': peft.__file__, 'hpclora': hpclora.__file__, "
             "'triton': os.environ.get('TRITON_CACHE_DIR'), 'inductor': os.environ.get('TORCHINDUCTOR_CACHE_DIR'), "
             "'tmp': shutil.disk_usage('/tmp').total}))")
    inside = runtime("singularity", "exec", image, "python3", "-c", probe, env={**os.environ, **user_site})
    assert inside.returncode == 0, inside.stderr
    seen = json.loads(inside.stdout.splitlines()[-1])
    assert seen["peft"].startswith("/usr/local/lib/python3.11/dist-packages/peft") and seen["hpclora"].startswith(IMAGE_PACKAGE)
    assert seen["triton"].startswith("/tmp/triton-") and seen["inductor"].startswith("/tmp/torchinductor-")
    assert seen["tmp"] == shutil.disk_usage("/tmp").total > 1 << 30  # the host's /tmp, not --contain's 64 MiB tmpfs

    nv = runtime("singularity", "exec", "--nv", image, "python3", "-c", "import torch; print(torch.cuda.is_available())")
    assert nv.returncode == 0 and nv.stdout.strip() == "False"  # docs/containers.md: --nv is silent without a driver


def test_a_build_whose_test_fails_keeps_the_working_image_and_the_new_one_beside_it(tmp_path, image):
    """`container build --from` a local sandbox: a definition whose %test passes becomes the image; a later one whose
    %test fails leaves that image in place and keeps its own as <name>.test-failed (apptainer deletes it), exit 3."""
    from image import CACHE

    (base,) = sorted(CACHE.glob("base-*/os"))[-1:]  # the test image's Debian base, a sandbox directory
    (tmp_path / "defs").mkdir()
    out = tmp_path / "img"
    for version, test in (("one", "exit 0"), ("two", "echo this image fails its test; exit 3")):
        definition = tmp_path / "defs" / f"{version}.def"
        definition.write_text(f"Bootstrap: docker\nFrom: debian:unreachable\n\n%post\n    echo {version} > /version\n\n"
                              f"%test\n    cat /version\n    {test}\n")
        done = runtime(sys.executable, "-m", "hpclora", "container", "build", "--def", definition, "--from", base,
                       "--sandbox", "--out", out, cwd=tmp_path)
        assert done.returncode == (0 if version == "one" else 3), done.stdout + done.stderr
    assert (out / "version").read_text() == "one\n"
    assert (tmp_path / "img.test-failed" / "version").read_text() == "two\n"
    assert "this image fails its test" in done.stdout + done.stderr and f"{out} is unchanged" in done.stdout
    assert not (tmp_path / "img.building").exists()


@pytest.mark.parametrize("launcher", ["sbatch", "submitit"])
def test_a_job_runs_inside_the_image_offline_from_shared_storage(tmp_path, tiny_llama_dir, image, shared, user_site, env, launcher):
    """`container.image` set: the job's hpclora is the image's (its log and env.json say so), it asks nothing of the hub
    (the model and data come from the staged cache), and its run directory, HF cache and logs are on shared storage
    at paths with a space, which only the job's binds bring into the container. The user's ~/.local does not shadow
    the image's packages; a job that asks for --nv on a node without a driver says so in its log."""
    require_slurm()
    with staged_offline_job(tmp_path, tiny_llama_dir, image, shared, container={"nv": True}) as (cfg, hub, staged_env):
        submitted = hpclora("submit", cfg, "--launcher", launcher, env={**env, **staged_env, **user_site}, cwd=tmp_path)
        job_id = job_id_from(submitted.stdout)
        assert wait_for(job_id) == {job_id: ("COMPLETED", "0:0")}, hpclora("logs", job_id, env=env, cwd=tmp_path).stdout
    assert hub.requests == []
    (run_dir,) = (shared / "runs").iterdir()
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    recorded = json.loads((run_dir / "env.json").read_text())
    assert recorded["container"]["APPTAINER_CONTAINER"] == str(image)
    assert recorded["executable"] == IMAGE_PYTHON and recorded["hpclora"] == IMAGE_PACKAGE
    log = hpclora("logs", job_id, env=env, cwd=tmp_path).stdout
    assert f"container {image}" in log and "adapter saved to" in log and "shadowed" not in log
    assert "--nv, but" in log and "has no NVIDIA driver (no nvidia-smi): the image sees no GPU" in log


def test_a_gpu_job_inside_an_image_without_a_usable_gpu_stops_and_doctor_said_so_before(tmp_path, tiny_llama_dir, image, env):
    """The job gets one of the test node's GPUs (device files Slurm hands out) and runs in the image, whose torch is a
    CPU build: it stops at once naming the image. `doctor` had said so on the login node, from the image's own torch."""
    require_slurm()
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir, slurm={"gpus": 1, "gpu_type": "v100", "partition": "debug"},
                        container={"image": str(image)})
    doctor = hpclora("doctor", cfg, "--json", env=env, cwd=tmp_path, check=False)
    (torch_check,) = [c for c in json.loads(doctor.stdout)["checks"] if c["name"] == "torch.kernels"]
    assert torch_check["status"] == "fail" and torch_check["message"].endswith(f"jobs on v100-16gb would find no GPU and stop (in the image {image})")
    job_id = job_id_from(hpclora("submit", cfg, env=env, cwd=tmp_path).stdout)
    assert wait_for(job_id) == {job_id: ("FAILED", "2:0")}
    log = (tmp_path / "logs" / f"tiny-{job_id}.out").read_text()
    assert f"found: torch 2.13.0+cpu (CPU only, no CUDA) inside the image {image}" in log and "Traceback" not in log


FINITE_RUN = {"max_steps": 16, "eval_every": 0, "log_every": 1, "save_every": 1, "keep_checkpoints": 1000}


@pytest.mark.parametrize("ranks", [1, 2])
def test_usr1_term_and_cancel_checkpoint_inside_the_image_and_the_resumed_adapter_is_an_uninterrupted_runs(
        tmp_path, tiny_llama_dir, image, shared, env, ranks):
    """One rank, and two through torchrun inside the image: USR1 to the batch shell (the time limit's signal) and then
    TERM (preemption) each make training checkpoint and the job requeue; `hpclora cancel` then checkpoints and the job
    cancels itself instead; submitted again by hand (`sbatch job.sbatch`), it resumes and finishes with the adapter of
    the same run uninterrupted in the same image (the local launcher, with the job's threads). The job script passes
    each stop on every few seconds until training has ended, and a Python that ends slowly (as freeing a GPU's context
    takes) gets one after it stopped listening: that once killed the job inside the image (FAILED, not requeued)."""
    require_slurm()
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir, train={**FINITE_RUN, "cpu_ranks": ranks}, lora={"dropout": 0.1 if ranks == 1 else 0.0},
                        run={"output_root": str(shared / "runs")},
                        slurm={"cpus_per_task": ranks, "mem": f"{2 * ranks}G", "log_dir": str(shared / "logs")},
                        container={"image": str(image), "binds": [str(PACING_SITE)]})
    job_env = paced(env, 1, HPCLORA_TEST_SLOW_EXIT="7")  # each Python ends 7 s after its work: one resend falls after
    job_id = job_id_from(hpclora("submit", cfg, env=job_env, cwd=tmp_path).stdout)
    (run_dir,) = (shared / "runs").iterdir()
    signal_after(job_id, run_dir, 0, 3, ["--signal=USR1", "--batch"])
    signal_after(job_id, run_dir, 1, 3, ["--signal=TERM", "--batch"])
    trained_steps(run_dir, 2, 3)
    assert f"cancelled {job_id}: stopped by `hpclora cancel` at step " in hpclora("cancel", job_id, env=env, cwd=tmp_path).stdout
    assert wait_for(job_id)[job_id][0] == "CANCELLED"
    assert requeue_records(job_id) == ["REQUEUED", "REQUEUED", "CANCELLED"]
    kept = max(metrics_steps(run_dir))
    assert (run_dir / "checkpoints" / f"checkpoint-{kept}" / "COMPLETE").exists() and not (run_dir / "adapter").exists()
    log = (shared / "logs" / f"tiny-{job_id}.out").read_text()
    # Ranks under torchrun are asked with USR1 whatever the batch shell got (protocol.send_stop).
    assert "USR1 received" in log and ("TERM received" in log or ranks > 1) and log.count("checkpoint saved; requeueing job") == 2
    assert log.count(f"container {image}") == 3 and "Traceback" not in log

    again = subprocess.run(["sbatch", "--parsable", str(run_dir / "job.sbatch")], env=job_env, cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    second = again.stdout.strip()
    assert wait_for(second) == {second: ("COMPLETED", "0:0")}
    log = (shared / "logs" / f"tiny-{second}.out").read_text()
    assert f"resumed from step {kept}" in log and f"container {image}" in log and "Traceback" not in log
    assert metrics_steps(run_dir) == list(range(1, FINITE_RUN["max_steps"] + 1))

    # The same run, uninterrupted, with the job's threads (Slurm's cores shared by the ranks) so that sums round alike.
    hpclora("submit", cfg, "run.name=reference", "--launcher", "local", env={**env, "SLURM_CPUS_PER_TASK": str(ranks)}, cwd=tmp_path)
    (reference,) = (shared / "runs").glob("reference-*")
    same_weights(run_dir / "adapter" / "adapter_model.safetensors", reference / "adapter" / "adapter_model.safetensors",
                 0.0 if ranks == 1 else 1e-6)


def test_a_job_of_two_nodes_trains_inside_the_image_on_both(tmp_path, tiny_llama_dir, image, shared, env):
    """slurm.nodes=2 on the partition whose nodes live in network namespaces of their own: one srun task per node runs
    torchrun inside the image, and the ranks meet across the bridge."""
    require_slurm()
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir, train={"max_steps": 2, "cpu_ranks": 1},
                        run={"output_root": str(shared / "runs")},
                        slurm={"partition": "two", "nodes": 2, "mem": "2G", "log_dir": str(shared / "logs")},
                        container={"image": str(image)})
    job_id = job_id_from(hpclora("submit", cfg, env=env, cwd=tmp_path).stdout)
    assert wait_for(job_id) == {job_id: ("COMPLETED", "0:0")}
    nodes = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "NodeList"], capture_output=True, text=True).stdout
    assert nodes.split() == ["node[1-2]"]
    (run_dir,) = (shared / "runs").iterdir()
    log = (shared / "logs" / f"tiny-{job_id}.out").read_text()
    assert "world 2 ranks (gloo)" in log and f"container {image}" in log and "adapter saved to" in log
    assert json.loads((run_dir / "env.json").read_text())["executable"] == IMAGE_PYTHON


def read_until(fd: int, wanted: str, seen: list[str], after: str = "", timeout: float = 240) -> str:
    """What the terminal shows until `wanted` appears (past the last `after`); the screen so far is kept in `seen`."""
    deadline = time.time() + timeout
    def past_after() -> str:
        text = "".join(seen)
        if not after:
            return text
        return text[text.rfind(after) + len(after):] if after in text else ""

    while wanted not in past_after():
        assert time.time() < deadline, f"no {wanted!r} on the terminal:\n{''.join(seen)[-3000:]}"
        if select.select([fd], [], [], 1)[0]:
            try:
                seen.append(os.read(fd, 4096).decode(errors="replace"))
            except OSError:  # the terminal closed
                break
    return "".join(seen)


def test_generate_and_chat_inside_the_image_as_the_docs_show(tmp_path, tiny_llama_dir, image):
    """`singularity exec IMAGE hpclora generate RUN --compare --prompt ...`, and `chat` in a pseudo-terminal: a prompt,
    an answer, /compare, and /exit, all inside the image."""
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir, train={"max_steps": 1})
    trained = runtime("singularity", "exec", image, "hpclora", "train", cfg, "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    compared = runtime("singularity", "exec", image, "hpclora", "generate", tmp_path / "run", "--compare",
                       "--prompt", "Add 2 and 3.", "--max-new-tokens", "8", cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr
    assert "base model" in compared.stdout and "with adapter" in compared.stdout and ">>> Add 2 and 3." in compared.stdout

    pid, fd = pty.fork()
    if pid == 0:  # the child: the command, on the pseudo-terminal
        os.chdir(tmp_path)
        os.execvp("singularity", ["singularity", "exec", str(image), "hpclora", "chat", str(tmp_path / "run"), "--max-new-tokens", "8"])
    seen: list[str] = []
    try:
        read_until(fd, "Ctrl-D: leave", seen)  # the help line, once the model is loaded
        os.write(fd, "Add 2 and 3.\n".encode())
        os.write(fd, b"/compare\n")
        read_until(fd, "(base model answering ...)", seen)
        read_until(fd, "you> ", seen, after="(base model answering ...)")  # the table, then the next prompt
        os.write(fd, b"/exit\n")
        _, status = os.waitpid(pid, 0)
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, "".join(seen)[-3000:]
    assert "Traceback" not in "".join(seen)


def test_user_text_reaches_every_job_script_as_text_never_as_commands(tmp_path, tiny_llama_dir, image, env):
    """Every config value that reaches a job script holds `$(touch ...)` and backquotes, for one and two ranks,
    with and without the image (itself at such a path), through sbatch and submitit. No canary file appears, each job
    trains to the end with those paths, and the process inside the image gets container.env's value as written and
    sees container.binds' folder."""
    require_slurm()
    canary = tmp_path / "canary"
    canary.mkdir()
    hostile = lambda key: f"{key} $(touch {canary}/{key}) `touch {canary}/{key}-bq` $HOME"  # noqa: E731
    quoted = lambda key: f"{hostile(key)} 'q\""  # noqa: E731  (container values may hold quotes too)
    model = shutil.copytree(tiny_llama_dir, tmp_path / hostile("model"))
    data_dir = tmp_path / hostile("data")
    data_dir.mkdir(parents=True)
    bind = tmp_path / quoted("bind")
    bind.mkdir(parents=True)
    hostile_image = tmp_path / quoted("image") / "hpclora.sif"
    hostile_image.parent.mkdir(parents=True)
    os.link(image, hostile_image)  # not a symbolic link: the config resolves those
    record = tmp_path / "record.jsonl"
    job_env = {**env, "PYTHONPATH": str(PACING_SITE), "HPCLORA_TEST_RECORD": str(record),
               "HPCLORA_TEST_RECORD_VAR": "HOSTILE", "HPCLORA_TEST_SEES": str(bind)}

    jobs = []
    # Every pair of choices meets in one of four jobs (ranks x image, ranks x launcher, image x launcher): the script's
    # quoting differs by ranks and image, its writer by launcher.
    for ranks, in_image, launcher in ((1, False, "sbatch"), (1, True, "submitit"), (2, False, "submitit"), (2, True, "sbatch")):
        name = f"r{ranks}-{'image' if in_image else 'host'}-{launcher}"
        cfg = tiny_run_yaml(
            tmp_path, model, run={"name": f"{name} $(touch {canary}/name)", "output_root": str(tmp_path / hostile("runs") / name)},
            data={"path": str(data_dir / "data.jsonl"), "cache_dir": str(tmp_path / hostile("cache"))},
            train={"max_steps": 1, "cpu_ranks": ranks},
            slurm={"cpus_per_task": ranks, "mem": f"{2 * ranks}G", "log_dir": str(tmp_path / hostile("logs"))},
            cache={"hf_home": str(tmp_path / hostile("hf")), "offline_jobs": True},
            container={"image": str(hostile_image) if in_image else None, "binds": [str(bind), str(PACING_SITE)],
                       "env": {"HOSTILE": quoted("env") + " \\c"}},
        )
        shutil.move(tmp_path / "data.jsonl", data_dir / "data.jsonl")  # tiny_run_yaml writes it beside the config
        out = hpclora("submit", cfg, "--launcher", launcher, env=job_env, cwd=tmp_path).stdout
        jobs.append((name, in_image, job_id_from(out)))

    for name, in_image, job_id in jobs:
        assert wait_for(job_id) == {job_id: ("COMPLETED", "0:0")}, (name, hpclora("logs", job_id, env=env, cwd=tmp_path).stdout)
        (run_dir,) = (tmp_path / hostile("runs") / name).iterdir()
        assert (run_dir / "adapter" / "adapter_model.safetensors").exists(), name
        recorded = json.loads((run_dir / "env.json").read_text())
        assert (recorded["executable"] == IMAGE_PYTHON) == in_image, name
        # Torch threads: the task's cores (slurm.cpus_per_task, one per rank here) shared by its ranks, whichever
        # launcher ran it (submitit once gave each rank all of them).
        assert recorded["torch_threads"] == 1, name
        if name == "r2-host-submitit":  # submitit starts one task per node, which runs torchrun for its two ranks
            job = json.loads((run_dir / "job.json").read_text())
            assert job["launcher"] == "submitit" and Path(job["log"]).parent == run_dir / "submitit"
            assert "SRUN_CPUS_PER_TASK" in next((run_dir / "submitit").glob("*_submission.sh")).read_text()
            log = hpclora("logs", job_id, env=env, cwd=tmp_path).stdout
            assert log.count("world 2 ranks (gloo)") == 1 and log.count("adapter saved to") == 1
            assert "COMPLETED" in hpclora("status", job_id, env=env, cwd=tmp_path).stdout
    inside = [line for line in map(json.loads, record.read_text().splitlines()) if line["value"] is not None]
    assert {line["job"] for line in inside} == {job_id for _, in_image, job_id in jobs if in_image}
    expected = {"value": quoted("env") + " \\c", "sees": {str(bind): True}}
    assert all({k: line[k] for k in expected} == expected for line in inside), inside
    assert sorted(p.name for p in canary.iterdir()) == []
