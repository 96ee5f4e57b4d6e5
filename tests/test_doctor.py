"""`hpclora doctor`: the parsers of what sinfo, /proc/mounts and quota print, and the whole command against
the real test Slurm (tests/slurm/up.sh: partitions `debug`, no time limit, and `short`, 30 minutes; two
fake v100 GPUs, which are empty device files: no NVIDIA driver answers for them)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hpclora.catalog.devices import DEVICES, gpu_aliases, known_devices
from hpclora.site import cluster, storage
from hpclora import plan

from conftest import require_slurm, tiny_run_yaml


def test_gres_strings_as_sinfo_prints_them():
    parse = lambda text: [(g.name, g.type, g.count) for g in cluster.parse_gres(text)]  # noqa: E731
    assert parse("gpu:v100:4(S:0-1)") == [("gpu", "v100", 4)]
    assert parse("gpu:a100:8(S:0-1),gpu:a100_3g.20gb:2") == [("gpu", "a100", 8), ("gpu", "a100_3g.20gb", 2)]
    assert parse("gpu:2") == [("gpu", None, 2)]
    assert parse("gpu:tesla_v100-sxm2-32gb:4(S:0),mps:400") == [("gpu", "tesla_v100-sxm2-32gb", 4), ("mps", None, 400)]
    assert parse("(null)") == []


def test_sinfo_lines_merge_per_partition_and_keep_only_gpus():
    text = "gpu*|up|2-00:00:00|4|40|384000|gpu:v100:4(S:0-1)\ngpu*|up|2-00:00:00|2|64|512000|gpu:a100:8,mps:100\ncpu|down|infinite|10|128|256000|(null)\n"
    gpu, cpu = cluster.parse_sinfo(text)
    assert (gpu.name, gpu.default, gpu.nodes, gpu.cpus, gpu.memory_mb, gpu.time_limit_s) == ("gpu", True, 6, 64, 512000, 2 * 86400)  # the largest node
    assert [(g.type, g.count) for g in gpu.gpus] == [("v100", 4), ("a100", 8)]
    assert (cpu.default, cpu.available, cpu.gpus, cpu.time_limit_s) == (False, False, [], None)


@pytest.mark.parametrize("spelled, names", [
    ("v100", ["v100-16gb", "v100-32gb"]),
    ("tesla_v100-sxm2-32gb", ["v100-32gb"]),
    ("a100_80g", ["a100-80gb"]),
    ("nvidia_h100_80gb_hbm3", ["h100-80gb"]),
    ("T4", ["t4-16gb"]),
    ("rtx_a6000", []),
    (None, []),
])
def test_sinfo_gpu_types_map_to_the_planners_names(spelled, names):
    assert cluster.planner_names(spelled, DEVICES) == names


def test_the_file_system_of_a_path_is_its_longest_mount():
    mounts = ("/dev/sda1 / ext4 rw 0 0\nserver:/export/home /home nfs4 rw 0 0\n"
              "10.0.0.1@tcp:/lfs /lustre lustre rw 0 0\ntmpfs /tmp tmpfs rw 0 0\n")
    assert storage.mount_of(storage.Path("/home/alice/.cache"), mounts) == ("/home", "nfs4")
    assert storage.mount_of(storage.Path("/lustre/proj/x"), mounts) == ("/lustre", "lustre")
    assert storage.mount_of(storage.Path("/homework"), mounts) == ("/", "ext4")
    assert storage.mount_of(storage.Path("/tmp/runs"), mounts) == ("/tmp", "tmpfs")


def test_quota_lines_of_quota_and_lfs():
    quota = "Disk quotas for user alice (uid 1000):\n     Filesystem  blocks   quota   limit   grace   files   quota   limit   grace\n" \
            "server:/export/home 9500000* 9000000 10000000 0 1234 0 0 0\n"
    assert storage.parse_quota(quota) == pytest.approx((9.728, 10.24))
    assert storage.parse_quota("/lustre 1024 0 2048 - 5 0 0 -\n") == pytest.approx((1024 * 1024 / 1e9, 2048 * 1024 / 1e9))
    assert storage.parse_quota("/lustre 1024 0 0 - 5 0 0 -\n") is None  # no limit set


def doctor(*args, env=None) -> tuple[int, list[dict], str]:
    """Run `hpclora doctor --json`; (exit code, checks, stderr), with the heavy modules it imported on stderr."""
    code = ("import sys; from hpclora.cli import main; rc = main(sys.argv[1:]); "
            "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules), file=sys.stderr); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, "doctor", "--json", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)
    return done.returncode, json.loads(done.stdout)["checks"], done.stderr


def named(checks: list[dict], name: str) -> list[dict]:
    return [c for c in checks if c["name"] == name]


@pytest.fixture
def slurm():
    require_slurm()


def test_doctor_reports_the_test_clusters_partitions_and_passes_a_good_config(tmp_path, tiny_llama_dir, slurm):
    hf_home = Path.home() / ".cache" / "hpclora-doctor-test-hf"  # not created; outside /tmp, which counts as node-local
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir, cache={"hf_home": str(hf_home)})
    rc, checks, stderr = doctor(cfg)
    assert rc == 0, checks
    assert "HEAVY []" in stderr  # login-node speed: no torch, transformers or peft
    partitions = {c["message"].split(":")[0]: c for c in named(checks, "slurm.partition")}
    assert "2 x gpu:v100 (planner: v100-16gb or v100-32gb)" in partitions["debug (default)"]["message"]
    assert "time limit 30:00" in partitions["short"]["message"]
    assert named(checks, "slurm.accounting")[0]["status"] == "ok"
    assert named(checks, "config.plan")[0]["message"].startswith("on cpu (partition debug): peak")
    assert named(checks, "config.data")[0]["message"].endswith("24 rows of alpaca data read")
    assert named(checks, "cache.hf_home")[0]["status"] == "ok"
    assert "does not exist yet" in named(checks, "cache.hf_home")[0]["message"]
    # Under /tmp: a warning where the partition's jobs run on this machine (debug: this host alone), a failure else.
    for key in ("run.output_root", "slurm.log_dir"):
        assert (named(checks, key)[0]["status"], named(checks, key)[0]["message"][-12:]) == ("warn", ": node-local"), named(checks, key)
    assert not [c for c in checks if c["status"] == "fail"]
    _, elsewhere, _ = doctor(cfg, "--partition", "two")  # node1 and node2: other machines, whose /tmp is not this one's
    assert named(elsewhere, "run.output_root")[0]["status"] == "fail"


def test_doctor_fails_what_would_stop_the_run_and_names_the_fix(tmp_path, tiny_llama_dir, slurm):
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir)
    rc, checks, _ = doctor(cfg, "--partition", "short", "slurm.time=01:00:00", "slurm.gpus=1", "slurm.gpu_type=a100",
                           "slurm.cpus_per_task=64", "slurm.mem=16G")
    assert rc == 1
    fails = {c["name"]: c for c in checks if c["status"] == "fail"}
    assert "longer than partition short's limit 30:00" in fails["slurm.time"]["message"]
    assert fails["slurm.time"]["fix"].startswith("slurm.time=00:30:00")
    assert "short has v100" in fails["slurm.gpus"]["message"] and fails["slurm.gpus"]["fix"] == "slurm.gpu_type to one of: v100"
    assert fails["slurm.cpus_per_task"]["fix"] == f"slurm.cpus_per_task={os.cpu_count()}"
    _, unusable, _ = doctor(cfg, "run.output_root=/proc/hpclora-runs")  # where no run directory can be: the config says so
    assert {"status": "fail", "name": "config", "fix": "", "message": "run.output_root: is under /proc, which holds the kernel's or "
            "the devices' files, not directories: give a directory on a file system"} in unusable
    # Slurm's units are binary: 16G is 16384M, more than the node's RealMemory of 16000M, which Slurm would refuse.
    assert fails["slurm.mem"]["fix"] == "slurm.mem=16000M" and "16G asked" in fails["slurm.mem"]["message"]


def test_doctor_fails_a_gpu_run_whose_torch_has_no_kernels_for_the_partitions_gpus(tmp_path, tiny_llama_dir, slurm):
    import torch

    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir)
    rc, checks, stderr = doctor(cfg, "--partition", "debug", "slurm.gpus=1", "slurm.gpu_type=v100")
    assert rc == 1 and "HEAVY []" in stderr  # read, not imported
    (check,) = named(checks, "torch.kernels")
    assert check["status"] == "fail"
    assert check["message"] == (f"torch {torch.__version__} (CPU only, no CUDA): jobs on v100-16gb would find no GPU and stop "
                                "(in this Python's environment)")
    assert "containers/hpclora.def" in check["fix"]
    # slurm.mem (2G): the plan's verdict, word for word, as a warning with the plan's recommendation.
    planned = json.loads(subprocess.run([sys.executable, "-m", "hpclora", "plan", cfg, "--json", "slurm.gpus=1", "slurm.gpu_type=v100"],
                                        capture_output=True, text=True, check=True).stdout)
    (mem,) = named(checks, "slurm.mem")
    assert mem == {"status": "warn", "name": "slurm.mem", "message": planned["memory_note"], "fix": f"slurm.mem={planned['recommended']['mem']}"}
    assert planned["memory_note"].startswith("slurm.mem=2G is less than the recommended mem=") and planned["fits"]
    _, cpu_run, _ = doctor(cfg, "--partition", "debug")
    assert named(cpu_run, "torch.kernels") == []  # slurm.gpus: 0


def test_doctor_names_a_partition_that_does_not_exist_and_a_bad_config_key(tmp_path, tiny_llama_dir, slurm):
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir)
    rc, checks, _ = doctor(cfg, "--partition", "gpu-long", "lora.rr=4")
    assert rc == 1
    assert named(checks, "config") == [{"status": "fail", "name": "config", "message": "lora.rr: unknown key (did you mean 'lora.r'?)", "fix": ""}]
    assert named(checks, "slurm.partition")[-1] == {"status": "fail", "name": "slurm.partition", "message": "no partition 'gpu-long' here",
                                                     "fix": "one of debug, short, two"}


def test_doctor_probe_asks_a_compute_node_through_srun(tmp_path, tiny_llama_dir, slurm):
    cfg = tiny_run_yaml(tmp_path, tiny_llama_dir)
    rc, checks, _ = doctor(cfg, "--probe")
    host = subprocess.run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%N"], capture_output=True, text=True).stdout.split()[0]
    network = named(checks, "network.compute")[0]
    assert network["message"].startswith(f"{host}: ")
    here = named(checks, "network.here")[0]
    assert network["status"] == here["status"]  # one machine: the compute node reaches the hub exactly when this one does
    assert named(checks, "gpu.compute") == []  # a CPU run does not ask for a GPU
    assert named(checks, "container.compute")[0]["message"].startswith(f"{host}: ")
    assert socket.gethostname().startswith(host) or host.startswith(socket.gethostname().split(".")[0])
    assert rc == (1 if any(c["status"] == "fail" for c in checks) else 0)


def test_a_gpu_type_the_planner_lacks_is_described_by_the_user_and_then_known(tmp_path, monkeypatch):
    from hpclora import config
    from hpclora.errors import UserError

    monkeypatch.setenv("HPCLORA_STATE_DIR", str(tmp_path))
    cfg = config.load(None, ["data.path=owner/dataset", "model.name=meta-llama/Llama-2-7b-hf", "quant.bits=4",
                             "slurm.gpu_type=rtx_a6000"], check_files=False)
    assert cluster.planner_names("rtx_a6000", known_devices(), gpu_aliases()) == []
    with pytest.raises(UserError, match="gpus.json"):
        plan.make_plan(cfg)
    (tmp_path / "gpus.json").write_text(json.dumps({"a6000-48gb": {"sinfo_types": ["RTX_A6000"], "memory_gb": 48, "bf16": True, "tflops": 155}}))
    assert cluster.planner_names("rtx_a6000", known_devices(), gpu_aliases()) == ["a6000-48gb"]
    p = plan.make_plan(cfg)  # slurm.gpu_type, as sinfo spells it
    assert (p.device, p.capacity_gb, p.precision) == ("a6000-48gb", 48.0, "bf16")
    assert plan.make_plan(cfg, "a6000-48gb").peak_gb == p.peak_gb  # --gpu NAME
    for entry, message in (({"memory_gb": 48}, "needs memory_gb, bf16 and tflops"),
                           ({"memory_gb": 48, "bf16": True, "tflops": 0}, "tflops must be a number above 0, got 0"),
                           ({"memory_gb": 48, "bf16": "yes", "tflops": 155}, "bf16 must be true or false"),
                           ({"memory_gb": 48, "bf16": True, "tflops": 155, "sinfo_types": "rtx"}, "sinfo_types must be a list")):
        (tmp_path / "gpus.json").write_text(json.dumps({"a6000-48gb": entry}))
        with pytest.raises(UserError, match=f"entry 'a6000-48gb': {message}"):
            plan.make_plan(cfg)
    (tmp_path / "gpus.json").write_text("[1]")
    with pytest.raises(UserError, match="expected an object of GPU types by name, got a JSON list"):
        plan.make_plan(cfg)
