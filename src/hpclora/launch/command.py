"""The job itself, decided once for every launcher: its environment, the command that trains, and how the
submitit and local launchers run it.

The sbatch script writes these out as shell lines (render.py). The submitit and local launchers run the very
same script, rendered for a job step (`run_job`), so that the shared Hugging Face cache, the offline switches,
the container image, the threads and the stop-and-requeue protocol (protocol.py) apply whichever launcher
started the job, and the model's staging is checked by the job's own `hpclora train`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from ..catalog.hub import OFFLINE_VARS
from ..config import RunConfig, load_run_config, ranks_per_node
from ..rundir import CONFIG_FILE
from ..stops import STOP_SIGNALS
from . import container
from .protocol import IGNORING_STOPS


def job_environment(cfg: RunConfig) -> dict[str, str]:
    """Variables every job sets, in a fixed order: the shared cache, and no hub network (`hpclora stage` fetched
    everything) when cache.offline_jobs."""
    env = {}
    if cfg.cache.hf_home:
        env["HF_HOME"] = cfg.cache.hf_home
    if cfg.cache.offline_jobs:
        env.update(dict.fromkeys(OFFLINE_VARS, "1"))
    return env


def in_image(cfg: RunConfig, runtime: str) -> list[str]:
    """The words that run a command inside the job's image, its stop signals ignored until it listens
    (protocol.IGNORING_STOPS), as outside an image."""
    return [*container.exec_argv(cfg, runtime), "/bin/sh", "-c", IGNORING_STOPS, "hpclora-job"]


def hpclora_argv(cfg: RunConfig, python: str, runtime: str) -> list[str]:
    """The words that start hpclora: `python -m hpclora` on the host, or `hpclora` inside the image run by
    `runtime` (the sbatch script passes a shell variable it resolves on the node)."""
    if not cfg.container.image:
        return [python, "-m", "hpclora"]
    return [*in_image(cfg, runtime), "hpclora"]


def torchrun_argv(cfg: RunConfig, python: str, runtime: str, rendezvous: list[str]) -> list[str]:
    """The words that start ranks_per_node ranks of hpclora on this node through torchrun (the interpreter's
    own `torch.distributed.run`), inside the image when there is one; `rendezvous` tells them how to meet."""
    # python3: images of Debian and Ubuntu (and their Python) have no `python`.
    start = [*in_image(cfg, runtime), "python3"] if cfg.container.image else [python]
    return [*start, "-m", "torch.distributed.run", f"--nnodes={cfg.slurm.nodes}", f"--nproc-per-node={ranks_per_node(cfg)}",
            *rendezvous, "-m", "hpclora"]


def train_argv(run_dir: str, config: str | None = None) -> list[str]:
    """`train <run dir>/config.yaml --run-dir <run dir>`: the job never reads the user's own YAML. (`config`:
    that path as the caller writes it, where the run directory is a shell variable.)"""
    return ["train", config or f"{run_dir}/{CONFIG_FILE}", "--run-dir", run_dir]


def run_job(run_dir: str) -> int:
    """Run the job of `run_dir` here, as its sbatch script would, and return its exit code (75: checkpointed, not
    requeued; 0 also where the job requeued itself, which then ends this attempt). The submitit and local
    launchers call this: it runs the run's own script, rendered for a job step (render.render_script), so the
    threads, environment, container and stop protocol are the sbatch script's.

    Stop signals sent to this process reach the script, which passes them on to training: Slurm sends them to
    every process of the job step anyway, but a user's `kill` (or Ctrl-C, which stops a local run at a
    checkpoint) reaches only this process. The script runs in a session of its own, so Ctrl-C reaches it here."""
    import threading

    from .render import Payload, render_script

    cfg = load_run_config(Path(run_dir) / CONFIG_FILE)
    script = render_script(cfg, Payload(python=sys.executable, run_dir=str(run_dir)), in_step=True)
    argv = ["bash", "-c", script, "hpclora-job"]
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        return subprocess.call(argv)
    stops = tuple(signal.Signals[f"SIG{name}"] for name in STOP_SIGNALS)
    child = subprocess.Popen(argv, start_new_session=True)
    passed: list[int] = []

    def pass_on(signum, frame):
        if not passed:  # the script repeats a stop by itself until training has ended
            passed.append(signum)
            child.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)
        elif signum == signal.SIGINT:  # Ctrl-C again: training stops at once (the script itself ignores it)
            os.killpg(child.pid, signal.SIGINT)

    previous = {sig: signal.signal(sig, pass_on) for sig in (*stops, signal.SIGINT)}
    try:
        while True:
            try:
                return child.wait()
            except InterruptedError:
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
