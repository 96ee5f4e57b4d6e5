"""Shared fixtures: tiny random models built from configs (no downloads), the bundled real model,
and small data files written per test."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from hpclora.job.preempt import StopRequest  # no torch: signal handling only

ROOT = Path(__file__).resolve().parent.parent
# The xdist workers share the cores: one torch thread each in-process, and OpenMP threads that sleep rather than
# spin while they wait, so that the jobs and subprocesses the tests start (which count their own threads) do not
# oversubscribe the CPU several times over.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Test files whose tests share an expensive module or session fixture run on one xdist worker each, so that the
# fixture is made once: the real small model's trained runs (`real_run`, test_end_to_end's `trained`), the resume
# and distributed references. Every other test is handed to whichever worker is free.
SHARED_FIXTURE_GROUPS = {
    "test_eval_merge.py": "real-run", "test_chat.py": "real-run", "test_export.py": "real-run", "test_report.py": "real-run",
    "test_end_to_end.py": "end-to-end", "test_resume.py": "resume", "test_distributed.py": "distributed",
}


# The order xdist hands the work out in (setup.cfg's --no-loadscope-reorder keeps it; by default xdist orders by test
# count): the longest first, so that none starts near the end and leaves one worker running alone, and the Slurm
# tests that mostly wait for their jobs beside those that compute. From a full run's --durations: the real-run group
# 7 minutes, distributed 5, the two-node, template and stop-signal Slurm tests 2 to 3 each, end-to-end and resume 2.
HANDED_OUT_FIRST = (
    "test_chat.py",  # the first of the real-run group's files: the group goes out where its first test is
    "test_slurm.py::test_a_job_of_two_nodes",
    "test_distributed.py",
    "test_slurm.py::test_the_hand_written_template_runs_a_rank_per_gpu",
    "test_slurm.py::test_usr1_term_and_a_time_limit",
    "test_apptainer.py::test_usr1_term_and_cancel",
    "test_end_to_end.py", "test_resume.py", "test_api.py", "test_slurm.py", "test_apptainer.py",
)


def handed_out_rank(item) -> int:
    where = f"{item.path.name}::{item.name}"
    return next((rank for rank, prefix in enumerate(HANDED_OUT_FIRST) if where.startswith(prefix)), len(HANDED_OUT_FIRST))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(items):
    for item in items:
        group = SHARED_FIXTURE_GROUPS.get(item.path.name)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=handed_out_rank)  # stable: the order within stays


# 64 wide: the bitsandbytes CPU 4-bit kernel needs widths that are multiples of its 64-element blocks.
TINY_DIMS = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2)


def tiny_config(model_type: str, vocab_size: int = 1000):
    """A 2-layer, 64-wide config of each architecture hpclora knows."""
    from transformers import AutoConfig

    extra = {
        "llama": dict(intermediate_size=128, num_key_value_heads=2),
        "mistral": dict(intermediate_size=128, num_key_value_heads=2),
        "qwen2": dict(intermediate_size=128, num_key_value_heads=2),
        "gpt_neox": dict(intermediate_size=128),
        "bloom": dict(n_layer=2, n_head=4),
        "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
        # Gemma 3: heads wider than hidden / heads, one local (sliding) and one global layer, as the bundled 270M.
        "gemma3_text": dict(intermediate_size=128, num_key_value_heads=1, head_dim=32, sliding_window=8,
                            layer_types=["sliding_attention", "full_attention"]),
    }[model_type]
    dims = {} if model_type in ("bloom", "gpt2") else dict(TINY_DIMS)
    if model_type == "bloom":
        dims["hidden_size"] = 64
    specials = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, **dims, **extra, **specials)


def tiny_model(model_type: str, vocab_size: int = 1000, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, vocab_size)
    config.attn_implementation = "sdpa" if model_type != "bloom" else "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    """The real SmolLM2-135M-Instruct as an HF directory (converted once into the user cache)."""
    from hpclora.job.bundled import bundled_model_dir

    return bundled_model_dir()


@pytest.fixture(scope="session")
def tokenizer(bundled_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, bundled_dir) -> Path:
    """A 2-layer random llama that uses the real SmolLM2 tokenizer: fast to train, real text pipeline."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundled_dir)
    out = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama", vocab_size=len(tok))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


class StopAt(StopRequest):
    """Sends this process a real `sig` at the boundary of step `step`: training reads `requested` once per step end,
    so the n-th read is step n's. (step = steps + 1 lands just after the last step, a moment no outside sender can hit.)"""

    def __init__(self, step: int, sig=signal.SIGUSR1):
        super().__init__()
        self.step, self.sig, self.reads = step, sig, 0

    @property
    def requested(self):
        self.reads += 1
        if self.reads == self.step:
            os.kill(os.getpid(), self.sig)
        return self.signal_name is not None


@contextmanager
def file_size_limit(max_bytes: int):
    """`ulimit -f` for this process, as a quota or a full disk refuses a write: a file may not grow past `max_bytes`
    (Python ignores SIGXFSZ, so the write fails with EFBIG). The hard limit stays, so the old limit comes back."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


def alpaca_rows(n: int) -> list[dict]:
    return [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"The sum is {2 * i + 1}."} for i in range(n)]


def tiny_run_yaml(tmp_path: Path, model_dir: Path, **sections: dict) -> Path:
    """A short training run of a tiny model on 24 alpaca rows, as a config file; `sections` update it,
    e.g. train={"max_steps": 40}. CPU-only Slurm resources small enough for the test cluster."""
    data = write_jsonl(tmp_path / "data.jsonl", alpaca_rows(24))
    keys = {
        "run": {"name": "tiny", "output_root": str(tmp_path / "runs")},
        "model": {"name": str(model_dir)},
        "data": {"path": str(data), "val_size": 4, "max_length": 64, "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": 3, "micro_batch_size": 4, "log_every": 1, "eval_every": 0, "save_every": 0},
        "slurm": {"gpus": 0, "cpus_per_task": 1, "mem": "2G", "time": "10:00", "log_dir": str(tmp_path / "logs")},
    }
    for section, values in sections.items():
        keys.setdefault(section, {}).update(values)
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(keys))  # JSON is YAML
    return path


@pytest.fixture(scope="session")
def real_run(tmp_path_factory, bundled_dir) -> Path:
    """A finished run of the real small model: three steps at a high learning rate (an adapter that really
    moves the logits), evaluated at step 2 and at the end. Shared by the eval, merge and report tests."""
    tmp = tmp_path_factory.mktemp("real-run")
    config = tiny_run_yaml(tmp, bundled_dir, train={"max_steps": 3, "lr": 2e-3, "micro_batch_size": 4, "eval_every": 2})
    from hpclora import config as config_module
    from hpclora.job.train import train

    run = train(config_module.load(config), run_dir=str(tmp / "run"))  # in this process: the real model loads once
    assert run.finished
    return run.run_dir


def slurm_missing() -> str | None:
    """Why no Slurm can be used here, or None."""
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    if "UP" not in ping.stdout:
        return "slurmctld does not answer `scontrol ping`"
    nodes = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout.split()
    if not any(state in ("idle", "mix", "alloc") for state in nodes):
        return f"no usable node (sinfo states: {nodes})"
    return None


def require_slurm() -> None:
    """Skip (or, with HPCLORA_REQUIRE_SLURM=1 as .ci/run sets, fail) where no Slurm answers."""
    reason = slurm_missing()
    if reason:
        skip_or_fail("HPCLORA_REQUIRE_SLURM", f"no Slurm reachable: {reason} (`bash tests/slurm/up.sh` starts one)")


def skip_or_fail(required_by: str, reason: str) -> None:
    """Skip with `reason`, or fail where the variable `required_by` is 1 (as .ci/run sets them)."""
    if os.environ.get(required_by) == "1":
        pytest.fail(f"{required_by}=1 but {reason}")
    pytest.skip(reason)


def container_image() -> Path:
    """The container tests' image (tests/apptainer/image.py), with a real apptainer to run it; skips (or, with
    HPCLORA_REQUIRE_APPTAINER=1 as .ci/run sets, fails) where there is none."""
    import sys

    sys.path.insert(0, str(ROOT / "tests" / "apptainer"))
    from image import cached_image

    if shutil.which("apptainer") is None:
        skip_or_fail("HPCLORA_REQUIRE_APPTAINER", "no apptainer on PATH (`make apptainer` installs a real one, as root)")
    image = cached_image()
    if image is None or not image.exists():
        skip_or_fail("HPCLORA_REQUIRE_APPTAINER", "the container tests' image is not built (`make test-image`)")
    return image


@pytest.fixture
def cli(capsys):
    """`hpclora ARGS` in this process, through the command line's own entry point (`hpclora.cli.main`): no
    interpreter to start and no libraries to import again. Returns a CompletedProcess with its exit code and
    what it printed; an exception a user should never see fails the test instead of printing a traceback."""
    from hpclora.cli import main

    def run(*argv) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["hpclora", *map(str, argv)], code, out, err)

    return run
