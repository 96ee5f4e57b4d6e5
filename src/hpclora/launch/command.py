"""The job itself, decided once for every launcher: its environment and the command that trains.

The sbatch script writes these out as shell lines (render.py); the submitit and local launchers run the
same command as a child process with the same environment (`run_job`). So the shared Hugging Face
cache, the offline switches and the container image apply whichever launcher started the job, and the
model's staging is checked by the job's own `hpclora train`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import container
from ..config import RunConfig
from ..errors import UserError
from ..catalog.hub import OFFLINE_VARS
from ..job.preempt import CHECKPOINTED_EXIT, STOP_SIGNALS
from ..rundir import STOPPED_MARKER

# How often a stop signal is passed on again until training has ended: one that arrives while the
# child is still starting (its handlers not yet installed, the signal ignored) would otherwise be lost.
RESEND_STOP_S = 5
# The rendezvous port of a multi-node job: from its id, below Linux's ephemeral ports (32768+), so that
# jobs sharing a node do not pick the same one. The sbatch script computes the same in shell.
RDZV_PORT_BASE, RDZV_PORT_SPAN = 20000, 10000


def job_environment(cfg: RunConfig) -> dict[str, str]:
    """Variables every job sets, in a fixed order: unbuffered output for `tail -f`, the shared cache, and
    no hub network (`hpclora stage` fetched everything) when cache.offline_jobs."""
    env = {"PYTHONUNBUFFERED": "1"}
    if cfg.cache.hf_home:
        env["HF_HOME"] = cfg.cache.hf_home
    if cfg.cache.offline_jobs:
        env.update(dict.fromkeys(OFFLINE_VARS, "1"))
    return env


def hpclora_argv(cfg: RunConfig, python: str, runtime: str) -> list[str]:
    """The words that start hpclora: `python -m hpclora` on the host, or `hpclora` inside the image run by
    `runtime` (the sbatch script passes a shell variable it resolves on the node)."""
    if not cfg.container.image:
        return [python, "-m", "hpclora"]
    return [*container.exec_argv(cfg, runtime), "hpclora"]


def ranks_per_node(cfg: RunConfig) -> int:
    return cfg.slurm.gpus or cfg.train.cpu_ranks


def world_size(cfg: RunConfig) -> int:
    """Training processes of the job: slurm.gpus (or train.cpu_ranks on CPU jobs) on each of slurm.nodes."""
    return cfg.slurm.nodes * ranks_per_node(cfg)


def torchrun_argv(cfg: RunConfig, python: str, runtime: str, rendezvous: list[str]) -> list[str]:
    """The words that start ranks_per_node ranks of hpclora on this node through torchrun (the interpreter's
    own `torch.distributed.run`), inside the image when there is one; `rendezvous` tells them how to meet."""
    start = [*container.exec_argv(cfg, runtime), "python"] if cfg.container.image else [python]
    return [*start, "-m", "torch.distributed.run", f"--nnodes={cfg.slurm.nodes}", f"--nproc-per-node={ranks_per_node(cfg)}",
            *rendezvous, "-m", "hpclora"]


def slurm_rendezvous() -> list[str]:
    """torchrun's c10d rendezvous at the first node of this Slurm job, on the job's port."""
    nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], capture_output=True, text=True, check=True)
    job_id = os.environ["SLURM_JOB_ID"]
    port = RDZV_PORT_BASE + int(job_id) % RDZV_PORT_SPAN
    return ["--rdzv-backend=c10d", f"--rdzv-endpoint={nodes.stdout.split()[0]}:{port}", f"--rdzv-id={job_id}"]


def train_argv(run_dir: str, config: str | None = None) -> list[str]:
    """`train <run dir>/config.yaml --run-dir <run dir>`: the job never reads the user's own YAML. (`config`:
    that path as the caller writes it, where the run directory is a shell variable.)"""
    return ["train", config or f"{run_dir}/config.yaml", "--run-dir", run_dir]


def run_job(run_dir: str) -> int:
    """Run the job's training command on this node as a child process and return its exit code (75:
    checkpointed, not finished). Used by the submitit and local launchers.

    Stop signals sent to this process are passed on to training (Slurm sends them to the job step, but a
    user's `kill` or a launcher may reach only this process), like the sbatch script does."""
    from .. import config

    cfg = config.load(Path(run_dir) / "config.yaml")
    runtime = container.require_runtime(cfg.container.runtime) if cfg.container.image else ""
    env = {**os.environ, **job_environment(cfg)}
    if "SLURM_CPUS_PER_TASK" in os.environ:  # in an allocation: torch threads follow it, as in the sbatch script
        env["OMP_NUM_THREADS"] = os.environ["SLURM_CPUS_PER_TASK"]
    if world_size(cfg) == 1:
        start = hpclora_argv(cfg, sys.executable, runtime)
    elif cfg.slurm.nodes == 1:  # several ranks on this machine
        start = torchrun_argv(cfg, sys.executable, runtime, ["--standalone"])
    elif "SLURM_JOB_NODELIST" in os.environ:  # one task per node of a Slurm job (submitit): meet at its first node
        start = torchrun_argv(cfg, sys.executable, runtime, slurm_rendezvous())
    else:
        raise UserError(f"slurm.nodes: {cfg.slurm.nodes} nodes need a Slurm job: submit with --launcher sbatch or submitit")
    (Path(run_dir) / STOPPED_MARKER).unlink(missing_ok=True)
    code = _run_forwarding_stops([*start, *train_argv(run_dir)], env, ranks=world_size(cfg) > 1)
    return CHECKPOINTED_EXIT if (Path(run_dir) / STOPPED_MARKER).exists() else code


def _run_forwarding_stops(argv: list[str], env: dict[str, str], ranks: bool = False) -> int:
    """Run `argv`, passing stop signals on. With several `ranks` the child is torchrun, in a process group
    of its own (so that Ctrl-C reaches only this process), and a stop reaches each of its ranks as USR1;
    Ctrl-C then checkpoints too."""
    import threading

    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        return subprocess.call(argv, env=env)
    stop: list[int] = []
    forwarded = (*STOP_SIGNALS, signal.SIGINT) if ranks else STOP_SIGNALS
    # The child starts with the stop signals ignored (inherited through exec) until training installs its
    # own handlers, so that an early one cannot kill it; meanwhile they are resent every RESEND_STOP_S.
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in forwarded}
    try:
        child = subprocess.Popen(argv, env=env, process_group=0 if ranks else None)

        def pass_on(signum):
            if not ranks:
                child.send_signal(signum)
                return
            for pid in _children(child.pid):  # torchrun starts each rank in a session of its own
                try:
                    os.kill(pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass

        def forward(signum, frame):
            stop.append(signum)
            pass_on(signum)

        for sig in forwarded:
            signal.signal(sig, forward)
        resent = 0.0
        while True:
            try:
                return child.wait(timeout=1)
            except subprocess.TimeoutExpired:
                if stop and time.monotonic() - resent >= RESEND_STOP_S:
                    pass_on(stop[0])
                    resent = time.monotonic()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found
