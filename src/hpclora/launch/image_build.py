"""`hpclora container build|check`: an Apptainer/Singularity image from the project's own definition, and its %test.

`--from` builds the definition on a base the site has (a .sif, a sandbox directory, or another bootstrap such as
`docker-archive:` or `oras://`): only the header's Bootstrap and From change, every section runs as written. The
image is built beside its target name and put in place only once it was built and its %test passed, so that a
failed build or test never replaces a working image (apptainer itself deletes an image whose %test fails).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..catalog.node import find_runtime
from ..errors import UserError
from .container import require_runtime

# `--from` forms that name a bootstrap agent, as apptainer writes them on its command line.
BASE_AGENTS = {
    "docker://": "docker", "library://": "library", "oras://": "oras", "shub://": "shub",
    "docker-archive:": "docker-archive", "docker-daemon:": "docker-daemon", "oci-archive:": "oci-archive",
    "oci:": "oci", "localimage:": "localimage",
}
# Header keywords that belong to one bootstrap agent: dropped when the agent changes.
AGENT_KEYWORDS = {"bootstrap", "from", "osversion", "mirrorurl", "include", "registry", "namespace", "fingerprints",
                  "updateurl", "confurl", "product", "user", "regcode", "productpgp", "registerurl", "modules",
                  "otherurl0", "setopt", "library"}
HEADER_LINE = re.compile(r"^\s*([A-Za-z][A-Za-z0-9]*)\s*:")


def base_header(base: str) -> list[str]:
    """The Bootstrap and From lines for `--from BASE`."""
    for prefix, agent in BASE_AGENTS.items():
        if base.startswith(prefix):
            source = base[len(prefix):] if agent != "localimage" else str(Path(base[len(prefix):]).resolve())
            return [f"Bootstrap: {agent}", f"From: {source}"]
    path = Path(base).expanduser()
    if path.exists():
        return ["Bootstrap: localimage", f"From: {path.resolve()}"]
    raise UserError(f"--from {base}: no such image file or sandbox directory here, and not a bootstrap source "
                    f"({', '.join(f'{p}...' for p in BASE_AGENTS)})")


def with_base(definition: str, base: str) -> str:
    """`definition` with its header's bootstrap (Bootstrap, From and that agent's own keywords) set to `base`;
    its comments and every section as written."""
    lines = definition.splitlines()
    first_section = next((i for i, line in enumerate(lines) if line.startswith("%")), len(lines))
    header = lines[:first_section]
    agent = [bool((m := HEADER_LINE.match(line)) and m.group(1).lower() in AGENT_KEYWORDS) for line in header]
    at = next((i for i, line in enumerate(header) if (m := HEADER_LINE.match(line)) and m.group(1).lower() == "bootstrap"), None)
    if at is None:
        raise UserError("the definition has no `Bootstrap:` line in its header: is it an Apptainer definition file?")
    before = [line for line, drop in zip(header[:at], agent[:at]) if not drop]
    after = [line for line, drop in zip(header[at:], agent[at:]) if not drop]
    return "\n".join([*before, *base_header(base), *after, *lines[first_section:]]) + "\n"


@dataclass(frozen=True)
class BuildOptions:
    sandbox: bool = False  # a directory instead of a .sif: no squashfs step, runs the same
    notest: bool = False  # skip the image's %test
    binds: list[str] = field(default_factory=list)  # -B SRC[:DST] for %post (a CA bundle, a wheel folder)
    base: str | None = None  # --from


def build_command(runtime: str, definition: Path, image: Path, options: BuildOptions = BuildOptions()) -> list[str]:
    """`<runtime> build --fakeroot --notest [--sandbox] [-B ...] IMAGE DEF`: --fakeroot builds without root, as on
    shared clusters; the %test runs afterwards (check_command), so that a failing one keeps the image to look into."""
    binds = [word for bind in options.binds for word in ("-B", bind)]
    return [runtime, "build", "--fakeroot", "--notest", *(["--sandbox"] if options.sandbox else []), *binds,
            str(image), str(definition)]


def check_command(runtime: str, image: Path, gpu: bool) -> list[str]:
    """Run the image's %test section, with the host's NVIDIA driver when this machine has a GPU."""
    return [runtime, "test", *(["--nv"] if gpu else []), str(image)]


def has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def unfinished_path(out: Path, what: str) -> Path:
    """Where the image is built (`what` = "building") or kept when its %test failed ("test-failed")."""
    return out.with_name(f"{out.stem}.{what}{out.suffix}")


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def build(definition: str, out: str, options: BuildOptions, dry_run: bool) -> int:
    """Build `out` from `definition` (with its header from options.base), then run its %test unless options.notest.
    The image replaces `out` only when both succeeded."""
    runtime = find_runtime() or ("apptainer" if dry_run else require_runtime())
    definition_path = Path(definition).resolve()
    if not definition_path.is_file():
        raise UserError(f"{definition_path}: definition file not found (run from the repository root, or pass --def)")
    root = definition_path.parent.parent  # %files paths are relative to the project root
    out_path = Path(out).resolve()
    if not out_path.parent.is_dir():
        raise UserError(f"--out {out}: the folder {out_path.parent} does not exist")
    building = unfinished_path(out_path, "building")
    rendered = with_base(definition_path.read_text(encoding="utf-8"), options.base) if options.base else None
    with tempfile.TemporaryDirectory(prefix="hpclora-def-") as tmp:
        used = definition_path
        if rendered is not None:
            used = Path(tmp) / definition_path.name
            used.write_text(rendered, encoding="utf-8")
            print(f"# {definition_path} on {options.base}: its header is now " + " | ".join(base_header(options.base)))
        argv = build_command(runtime, used, building, options)
        test = check_command(runtime, out_path, has_gpu())
        print(f"(cd {shlex.quote(str(root))} && {shlex.join(argv)})")
        if not options.notest:
            print(shlex.join(test))
        if dry_run:
            return 0
        remove(building)
        done = subprocess.run(argv, cwd=root)
    if done.returncode != 0:
        remove(building)
        print(f"hpclora: the build failed (exit {done.returncode}); {out_path} is unchanged")
        return done.returncode
    if not options.notest:
        tested = subprocess.run(check_command(runtime, building, has_gpu()), cwd=root)
        if tested.returncode != 0:
            kept = unfinished_path(out_path, "test-failed")
            remove(kept)
            os.replace(building, kept)
            print(f"hpclora: the image's %test failed (exit {tested.returncode}): kept as {kept} to look into "
                  f"(`{runtime} shell {shlex.quote(str(kept))}`); {out_path} is unchanged")
            return tested.returncode
    if out_path.is_dir() and not out_path.is_symlink():  # a sandbox: a directory cannot be replaced in one rename
        old = unfinished_path(out_path, "old")
        remove(old)
        os.replace(out_path, old)
        os.replace(building, out_path)
        remove(old)
    else:
        os.replace(building, out_path)
    print(f"hpclora: built {out_path}" + ("" if options.notest else " and its %test passed"))
    return 0


def check(image: str | None, dry_run: bool) -> int:
    """Run the image's %test (with --nv where this machine has a GPU)."""
    if not image:
        raise UserError("container check: give the image to test, e.g. hpclora container check hpclora.sif")
    if not dry_run and not Path(image).exists():
        raise UserError(f"container check: {image}: no such image (build one with `hpclora container build`)")
    runtime = find_runtime() or ("apptainer" if dry_run else require_runtime())
    argv = check_command(runtime, Path(image).resolve(), has_gpu())
    print(shlex.join(argv))
    return 0 if dry_run else subprocess.run(argv).returncode
