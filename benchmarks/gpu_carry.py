"""What the GPU check carries to the GPU machine, made here once (`make gpu-carry`):

    .gpu-carry/py3.12/wheels/   the wheels the machine lacks (gpu_machine.CARRIED), for its Python and platform
    .gpu-carry/py3.12/liger/    liger-kernel, apart (the check trains with and without it)
    .gpu-carry/models/          SmolLM2-135M's config and tokenizer, and the shaped models' (open-calm-1b,
                                Llama-2-7b-hf): no weights, the check makes random ones there

    python benchmarks/gpu_carry.py [--python 3.12]     # --python 3.11: the same pins for the CPU rehearsal here

A call carries `.gpu-carry/py3.12` and `.gpu-carry/models` beside the working tree; it prints each share and fails
when one call's would pass gpu_machine.SHARE_LIMIT_MIB. Downloads are kept: a second run fetches nothing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_machine as machine  # noqa: E402

MIB = 1 << 20


def download(specs: dict[str, str], python: str, into: Path) -> None:
    """The pinned wheels for `python` on the machine's platform, one version of each (older ones removed)."""
    into.mkdir(parents=True, exist_ok=True)
    wanted = {machine.normalized(name): version for name, version in specs.items()}
    for wheel in into.glob("*.whl"):
        name, version = wheel.name.split("-")[:2]
        if wanted.get(machine.normalized(name)) != version:
            wheel.unlink()
    have = {machine.normalized(w.name.split("-")[0]) for w in into.glob("*.whl")}
    missing = [f"{name}=={version}" for name, version in specs.items() if machine.normalized(name) not in have]
    if not missing:
        return
    platforms = [word for p in machine.PLATFORMS for word in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", python,
                    "--implementation", "cp", *platforms, "--dest", str(into), *missing], check=True)


def stand_in_configs(into: Path) -> None:
    """Config and tokenizer of each stand-in model, without weights (made where the check runs)."""
    sys.path.insert(0, str(machine.ROOT / "src"))
    from hpclora.job.bundled import bundled_model_dir

    import shaped_model

    smollm2 = into / machine.SMOLLM2
    if not (smollm2 / "config.json").exists():
        smollm2.mkdir(parents=True, exist_ok=True)
        for file in bundled_model_dir().iterdir():
            if file.is_file() and not file.name.startswith(".") and file.suffix not in {".safetensors", ".bin", ".gguf"}:  # no cache marker
                shutil.copy2(file, smollm2 / file.name)
    for directory, published in machine.SHAPED.items():
        if not (into / directory / "tokenizer_config.json").exists():
            shaped_model.write_config(published, into / directory)


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def working_tree_size() -> int:
    """What every call sends anyway: the tracked files and the untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=machine.ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((machine.ROOT / name.decode()).stat().st_size for name in listed if name and (machine.ROOT / name.decode()).is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=machine.PYTHON, help="the Python the wheels are for (3.12 on the GPU machine)")
    args = parser.parse_args()
    wheels = machine.CARRY / f"py{args.python}"
    download(machine.CARRIED, args.python, wheels / "wheels")
    download(machine.LIGER, args.python, wheels / "liger")
    stand_in_configs(machine.CARRY / "models")
    tree, carried, models = working_tree_size(), size(wheels), size(machine.CARRY / "models")
    share = (tree + carried + models) / MIB
    print(f"one call carries {share:.1f} MiB: working tree {tree / MIB:.1f}, {wheels.relative_to(machine.ROOT)} {carried / MIB:.1f}, "
          f"{(machine.CARRY / 'models').relative_to(machine.ROOT)} {models / MIB:.1f} (limit {machine.SHARE_LIMIT_MIB} MiB)")
    if share >= machine.SHARE_LIMIT_MIB:
        raise SystemExit(f"too much for one call: {share:.1f} MiB")


if __name__ == "__main__":
    main()
