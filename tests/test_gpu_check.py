"""The GPU check (benchmarks/gpu_check.py) before it meets a GPU: what a call carries stays under the limit, and its
code runs on CPU in an environment of the GPU machine's own packages plus the carried wheels (the rehearsal), so
that a missing wheel, a library the machine holds at another version, or a check that cannot record fails here.
`make gpu-carry` and `make gpu-rehearsal-env` (both part of `make test`) prepare them; the full rehearsal is
`make gpu-check-rehearsal`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, skip_or_fail

sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_carry  # noqa: E402
import gpu_machine as machine  # noqa: E402

REHEARSAL_PYTHON = ROOT / ".venv-gpu-rehearsal" / "bin" / "python"
HERE = f"{sys.version_info[0]}.{sys.version_info[1]}"


def prepared(path: Path) -> Path:
    if not path.exists():
        skip_or_fail("HPCLORA_REQUIRE_GPU_REHEARSAL", f"{path.relative_to(ROOT)} is not prepared (`make gpu-rehearsal-env`)")
    return path


def wheel_tags(wheel: Path) -> tuple[str, str]:
    """(name, Python tag) as the wheel's own WHEEL file and file name say."""
    with zipfile.ZipFile(wheel) as archive:
        assert any(name.endswith(".dist-info/WHEEL") for name in archive.namelist()), f"{wheel.name} is no wheel"
    name, _version, python = wheel.name[:-4].split("-")[:3]
    return machine.normalized(name), python


def test_a_call_carries_every_missing_wheel_for_python_3_12_under_the_limit():
    carried = prepared(machine.CARRY / f"py{machine.PYTHON}")
    wheels = {wheel_tags(w)[0]: wheel_tags(w)[1] for w in (carried / "wheels").glob("*.whl")}
    assert set(wheels) == {machine.normalized(n) for n in machine.CARRIED}
    assert all(tag in ("py3", "py2.py3", "cp312", "py312") or tag.startswith("cp3") and "abi3" in tag for tag in wheels.values()), wheels
    assert wheels["multiprocess"] == "py312", "multiprocess ships one wheel per Python: the machine's is 3.12"
    for name in (machine.SMOLLM2, *machine.SHAPED):
        model = machine.CARRY / "models" / name
        assert (model / "config.json").is_file() and (model / "tokenizer.json").is_file(), name
        assert not [f for f in model.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf")], f"{name}: weights travel as none"
    share = gpu_carry.working_tree_size() + gpu_carry.size(carried) + gpu_carry.size(machine.CARRY / "models")
    assert share < machine.SHARE_LIMIT_MIB * gpu_carry.MIB, f"{share / gpu_carry.MIB:.1f} MiB"


def test_the_rehearsal_environment_holds_only_what_the_gpu_machine_holds():
    python = prepared(REHEARSAL_PYTHON)
    done = subprocess.run([str(python), str(ROOT / "benchmarks" / "gpu_machine.py"), "verify"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    found = subprocess.run([str(python), "-c", "import transformers; print(transformers.__version__); import peft"], capture_output=True, text=True)
    assert found.stdout.strip() == machine.STOCK["transformers"], "the machine's transformers, not this one's"
    assert "No module named 'peft'" in found.stderr, "peft must come from the carried wheels alone"


def rehearse(work: Path, out: Path, *only: str, groups: tuple[str, ...]) -> subprocess.Popen:
    return subprocess.Popen([str(prepared(REHEARSAL_PYTHON)), str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu",
                             "--carried", str(prepared(machine.CARRY / f"py{HERE}")), "--work", str(work), "--out", str(out),
                             "--group", *groups, "--only", *only], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def results(out: Path) -> dict[str, str]:
    """Each check's status (the stand-in models' lines apart: the first call of a machine makes them)."""
    lines = (out / "gpu_check.txt").read_text().splitlines()
    return {line.split()[1]: line.split()[0] for line in lines if not line.startswith(("#", "PASS stand-in-"))}


@pytest.mark.slow
def test_the_rehearsal_trains_qlora_fp16_merges_it_and_runs_again_on_the_same_machine(tmp_path):
    """The V100 QLoRA path and its merge against the fp32 reference, twice in one work directory: the second call
    reuses the stand-in model, trains afresh and merges over the first merge."""
    wanted = ("train-smollm2-qlora-fp16", "infer-qlora-fp16-merge")
    for call in ("first", "second"):
        proc = rehearse(tmp_path / "work", tmp_path / call, *wanted, groups=("train", "infer"))
        output = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, output
        assert results(tmp_path / call) == {name: "PASS" for name in wanted}, output
    log = (tmp_path / "second" / "gpu_check.log").read_text()
    assert "==== weights" not in log and "==== train-smollm2-qlora-fp16" in log, "the second call reuses the stand-in"
    summaries = json.loads((tmp_path / "second" / "gpu_check-summaries.json").read_text())
    assert summaries["train-smollm2-qlora-fp16"]["precision"] == "fp16"


def test_a_call_ended_by_its_time_limit_returns_what_it_recorded(tmp_path):
    """TERM (what the device's time limit sends) during the second check: the first check's line, its log and the
    call's closing line are in OUT; the interrupted check says it was stopped."""
    out = tmp_path / "out"
    proc = rehearse(tmp_path / "work", out, "dist-share", "dist-term", groups=("dist",))
    while "dist-share" not in (out / "gpu_check.txt").read_text() if (out / "gpu_check.txt").exists() else True:
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    lines = [line for line in (out / "gpu_check.txt").read_text().splitlines() if not line.startswith("PASS stand-in-")]
    assert lines[1].startswith("PASS dist-share"), output
    assert lines[2].startswith("FAIL dist-term") and "stopped" in lines[2], lines
    assert lines[-1].startswith("# dist: ") and "1 FAIL" in lines[-1], lines
    assert "backend gloo, world 1" in (out / "gpu_check.log").read_text()
    assert proc.returncode == 1
