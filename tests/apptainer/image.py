"""The container tests' image: containers/hpclora.def built by `hpclora container build --from` on a base made here.

Docker Hub cannot be reached from the test machines, so the base that stands in for the Hugging Face GPU image is made
from Debian packages (base-os.def, debootstrap as root) plus the machine's CPU build of torch (base-torch.def, with
--fakeroot). Each image is cached under HPCLORA_TEST_IMAGES (default /var/tmp/hpclora-test-images), keyed by a hash of
its definition and what it is made of: the bases by their definitions and the torch wheel, the hpclora image by the
base, containers/hpclora.def and every file its %files copies. The suite then keeps its time after the first build.

    python tests/apptainer/image.py          # build what is missing; prints the image's path (`make test-image`)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DEFINITION = ROOT / "containers" / "hpclora.def"
CACHE = Path(os.environ.get("HPCLORA_TEST_IMAGES", "/var/tmp/hpclora-test-images"))
# Where outbound TLS is re-signed by a local CA, pip in %post needs the bundle that trusts it (tests/apptainer/up.sh
# puts the host's CAs into the runtime's root, whose bundle is bound here); nothing of it stays in the image.
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def sha256(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little") + part)
    return digest.hexdigest()[:16]


def torch_wheel() -> Path:
    """The CPU torch wheel of this machine (the one `make setup` installed): pip's find-links folders."""
    import torch

    version = torch.__version__
    folders = [*os.environ.get("PIP_FIND_LINKS", "").split(), "/opt/wheels"]
    for folder in folders:
        found = sorted(Path(folder).glob(f"torch-{version}-*.whl")) if Path(folder).is_dir() else []
        if found:
            return found[0]
    raise SystemExit(f"no wheel of torch {version} in {folders}: the test image's base takes torch from there")


def files_copied(definition: Path) -> list[Path]:
    """The host paths a definition's %files section copies (relative to the project root)."""
    section, paths = None, []
    for line in definition.read_text(encoding="utf-8").splitlines():
        if line.startswith("%"):
            section = line.split()[0]
        elif section == "%files" and line.strip() and not line.lstrip().startswith("#"):
            paths.append(ROOT / line.split()[0])
    return paths


def generated(path: Path) -> bool:
    """Files that setup and tests write into the checkout (bytecode, the editable install's metadata): the image's
    own pip writes its own."""
    return any(part == "__pycache__" or part.endswith(".egg-info") for part in path.parts)


def tree_bytes(paths: list[Path]) -> list[bytes]:
    parts = []
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not generated(p))
        for f in files:
            parts += [str(f.relative_to(ROOT)).encode(), f.read_bytes()]
    return parts


def run(argv: list[str], **kwargs) -> None:
    print("+", " ".join(map(str, argv)), flush=True)
    subprocess.run(list(map(str, argv)), check=True, **kwargs)


def base_image() -> Path:
    """base-os then base-torch, as sandbox directories (a base is only read by the next build)."""
    wheel = torch_wheel()
    key = sha256((HERE / "base-os.def").read_bytes(), (HERE / "base-torch.def").read_bytes(), wheel.name.encode())
    base = CACHE / f"base-{key}"
    if (base / "torch" / ".done").exists():
        return base / "torch"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    run(["apptainer", "build", "--sandbox", base / "os", HERE / "base-os.def"])  # debootstrap: as real root
    # Device nodes debootstrap made cannot be unpacked again in the user namespace of the next (--fakeroot) build.
    for node in (base / "os" / "dev").iterdir():
        node.unlink() if not node.is_dir() or node.is_symlink() else shutil.rmtree(node)
    run([sys.executable, "-m", "hpclora", "container", "build", "--def", HERE / "base-torch.def", "--from", base / "os",
         "--sandbox", "--notest", "-B", f"{wheel.parent}:/mnt", "-B", CA_BUNDLE, "--out", base / "torch"], cwd=ROOT)
    (base / "torch" / ".done").write_text(wheel.name)
    return base / "torch"


def image_path(base: Path) -> Path:
    key = sha256(str(base).encode(), DEFINITION.read_bytes(), *tree_bytes(files_copied(DEFINITION)))
    return CACHE / f"hpclora-{key}.sif"


def cached_image() -> Path | None:
    """The test image of this checkout, where it was built already; None where not (`make test-image` builds it).
    HPCLORA_TEST_IMAGE names another image instead (an older build, while changing the tests)."""
    if os.environ.get("HPCLORA_TEST_IMAGE"):
        return Path(os.environ["HPCLORA_TEST_IMAGE"])
    bases = sorted(CACHE.glob("base-*/torch/.done"))
    for done in bases:
        image = image_path(done.parent)
        if image.exists():
            return image
    return None


def build() -> Path:
    base = base_image()
    image = image_path(base)
    if not image.exists():
        for old in CACHE.glob("hpclora-*.sif"):  # images of older checkouts: a GB each
            old.unlink()
        run([sys.executable, "-m", "hpclora", "container", "build", "--from", base, "-B", CA_BUNDLE, "--out", image], cwd=ROOT)
    return image


if __name__ == "__main__":
    print(build())
