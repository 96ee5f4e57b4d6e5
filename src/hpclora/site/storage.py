"""Where a directory really lives: its file system (shared between nodes or local to one), whether this
user may write there, free space, and the user's quota where `quota` or `lfs quota` answer."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..catalog.node import run

# File systems that every node of a cluster mounts; anything else is taken as node-local.
SHARED_TYPES = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cephfs", "ceph", "glusterfs", "fuse.glusterfs", "wekafs",
                "panfs", "cifs", "smb3", "fuse.sshfs", "fuse.ceph", "fuse.beegfs", "9p", "virtiofs", "hpfs")
NODE_LOCAL_PREFIXES = ("/tmp", "/var/tmp", "/dev/shm", "/run", "/scratch/local", "/local", "/localscratch")


@dataclass
class Place:
    path: Path
    exists: bool
    existing: Path  # the path, or its nearest existing parent (where it would be created)
    writable: bool
    fs_type: str
    mount: str
    free_gb: float
    total_gb: float

    @property
    def shared(self) -> bool:
        return self.fs_type in SHARED_TYPES or self.fs_type.startswith("fuse.") and "sshfs" not in self.fs_type

    @property
    def node_local_path(self) -> bool:
        return str(self.path).startswith(NODE_LOCAL_PREFIXES) or self.fs_type == "tmpfs"


def mount_of(path: Path, mounts_text: str | None = None) -> tuple[str, str]:
    """(mount point, file system type) of the longest mount point holding `path`, from /proc/mounts."""
    if mounts_text is None:
        try:
            mounts_text = Path("/proc/mounts").read_text()
        except OSError:
            return "/", "unknown"
    best = ("/", "unknown")
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, fields[2])
    return best


def can_write(directory: Path) -> bool:
    """Whether a file can really be created here (permissions, read-only mounts and full quotas included)."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".hpclora-doctor-"):
            return True
    except OSError:
        return False


def inspect(path: str | os.PathLike) -> Place:
    p = Path(path).expanduser().resolve()
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    mount, fs_type = mount_of(existing)
    usage = shutil.disk_usage(existing)
    return Place(p, p.exists(), existing, can_write(existing), fs_type, mount, usage.free / 1e9, usage.total / 1e9)


def quota(place: Place) -> tuple[float, float] | None:
    """(used GB, limit GB) of this user's quota on the place's file system, where the tools answer and a
    limit is set; None otherwise."""
    if place.fs_type == "lustre":
        done = run(["lfs", "quota", "-q", "-u", os.environ.get("USER", str(os.getuid())), place.mount])
    else:
        done = run(["quota", "-w", "-p", place.mount])  # -w: one line per file system
    if done is None or done.returncode not in (0, 1):  # quota exits 1 when a limit is exceeded
        return None
    return parse_quota(done.stdout)


def parse_quota(text: str) -> tuple[float, float] | None:
    """(used GB, limit GB) from `quota -w -p` or `lfs quota -q` lines: file system, blocks used, soft limit,
    hard limit (1 KiB blocks; a `*` marks an exceeded one), ...; the hard limit, else the soft one."""
    for line in text.splitlines():
        numbers = [f.rstrip("*") for f in line.split()[1:4]]
        if len(numbers) == 3 and all(n.isdigit() for n in numbers) and (limit := int(numbers[2]) or int(numbers[1])):
            return int(numbers[0]) * 1024 / 1e9, limit * 1024 / 1e9
    return None
