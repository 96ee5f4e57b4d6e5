"""Facts about the node this runs on, without torch: its NVIDIA driver and GPUs (nvidia-smi), the container
runtime, and whether it reaches the Hugging Face hub. `python -m hpclora.catalog.node` prints them as JSON: what
`hpclora doctor --probe` runs on a compute node through srun."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.request

RUNTIMES = ("apptainer", "singularity")


def find_runtime(preferred: str = "auto") -> str | None:
    """The runtime on this machine's PATH: apptainer first (its newer name), then singularity."""
    for name in RUNTIMES if preferred == "auto" else (preferred,):
        if shutil.which(name):
            return name
    return None


def run(argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess | None:
    """A command's result, or None where it is not installed or does not answer in time."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (subprocess.TimeoutExpired, OSError):
        return None


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = 5.0) -> tuple[bool, str]:
    """Whether an HTTPS request to the hub gets any answer (an HTTP error status is an answer), and what happened."""
    url = hub_endpoint() + "/api/models?limit=1"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as reply:
            return True, f"{hub_endpoint()} answered ({reply.status})"
    except urllib.error.HTTPError as exc:
        return True, f"{hub_endpoint()} answered ({exc.code})"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"{hub_endpoint()} not reached ({reason})"


def nvidia_gpus() -> tuple[str | None, list[str]]:
    """(driver version, GPU names) from nvidia-smi; (None, []) where there is no NVIDIA driver."""
    done = run(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"])
    if done is None or done.returncode != 0:
        return None, []
    rows = [line.split(",", 1) for line in done.stdout.strip().splitlines() if "," in line]
    return (rows[0][0].strip() if rows else None), [name.strip() for _, name in rows]


def runtime_version(runtime: str | None) -> str | None:
    done = run([runtime, "--version"]) if runtime else None
    return done.stdout.strip() if done and done.returncode == 0 else None


def facts(network: bool = True) -> dict:
    driver, gpus = nvidia_gpus()
    runtime = find_runtime()
    found = {"host": socket.gethostname(), "nvidia_driver": driver, "gpus": gpus,
             "container_runtime": runtime, "container_runtime_version": runtime_version(runtime)}
    if network:
        found["hub_reachable"], found["hub"] = hub_reachable()
    return found


if __name__ == "__main__":
    print(json.dumps(facts()))
