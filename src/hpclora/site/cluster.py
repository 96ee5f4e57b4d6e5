"""What a Slurm cluster offers, as `sinfo` tells it: partitions, their GPU types and counts, time limits,
and which of the planner's GPU names each `sinfo` type means. No torch: `hpclora doctor` runs on login nodes.
"""

from __future__ import annotations

import math
import re
import socket
from dataclasses import dataclass, field

from ..catalog.node import run
from ..config.slurm_syntax import slurm_mem_mib, slurm_seconds

# Planner GPU families by how sinfo types usually spell them (`v100`, `tesla_v100-sxm2-32gb`, `a100_80g`, `nvidia_h100_80gb_hbm3`).
FAMILIES = ("v100", "a100", "h100", "t4", "l4", "rtx3060")


@dataclass
class Gres:
    """One generic resource of a node, e.g. `gpu:v100:4(S:0-1)` -> name gpu, type v100, count 4."""

    name: str
    type: str | None
    count: int


@dataclass
class Partition:
    name: str
    default: bool
    available: bool
    time_limit: str  # sinfo's spelling: `infinite`, `2-00:00:00`, `30:00`
    nodes: int
    cpus: int  # per node (the largest where nodes differ: what a job may ask at most)
    memory_mb: int  # per node (the largest)
    gpus: list[Gres] = field(default_factory=list)  # per node

    @property
    def time_limit_s(self) -> int | None:
        """The limit in seconds; None for no limit."""
        if self.time_limit in ("infinite", "UNLIMITED", "n/a", ""):
            return None
        return slurm_seconds(self.time_limit)


def parse_gres(text: str) -> list[Gres]:
    """sinfo's %G: `gpu:v100:4(S:0-1),gpu:a100:2`, `gpu:4`, `(null)`. Socket affinities are dropped."""
    found = []
    for item in re.sub(r"\([^)]*\)", "", text).split(","):
        parts = item.strip().split(":")
        if len(parts) < 2 or parts[0] in ("", "(null)"):
            continue
        count = parts[-1]
        if not count.isdigit():  # `gpu:v100` with no count means one
            parts, count = [*parts, "1"], "1"
        found.append(Gres(parts[0], parts[1] if len(parts) > 2 else None, int(count)))
    return found


def parse_sinfo(text: str) -> list[Partition]:
    """Lines of `sinfo -h -o '%P|%a|%l|%D|%c|%m|%G'` (one per partition and node group) merged per partition."""
    partitions: dict[str, Partition] = {}
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 7:
            continue
        name, avail, limit, nodes, cpus, memory, gres = fields
        default = name.endswith("*")
        name = name.rstrip("*")
        memory_mb = int(re.sub(r"\D", "", memory) or 0)
        cpus_n = int(re.sub(r"\D", "", cpus) or 0)
        p = partitions.get(name)
        if p is None:
            partitions[name] = Partition(name, default, avail == "up", limit, int(nodes), cpus_n, memory_mb, parse_gres(gres))
            continue
        p.nodes += int(nodes)
        p.cpus, p.memory_mb = max(p.cpus, cpus_n), max(p.memory_mb, memory_mb)
        known = {(g.name, g.type) for g in p.gpus}
        p.gpus += [g for g in parse_gres(gres) if (g.name, g.type) not in known]
    for p in partitions.values():
        p.gpus = [g for g in p.gpus if g.name == "gpu"]
    return list(partitions.values())


def planner_names(gres_type: str | None, devices: dict, aliases: dict[str, str] | None = None) -> list[str]:
    """The planner's device names a sinfo GPU type may mean: the user's own name for it (`aliases`, from
    gpus.json); one when the type says the memory (`32gb`, `80g`) or the family has one size; all sizes of
    the family otherwise; none when unknown."""
    if not gres_type:
        return []
    spelled = gres_type.lower()
    if aliases and spelled in aliases:
        return [aliases[spelled]]
    family = next((f for f in FAMILIES if f in spelled.replace("-", "").replace("_", "")), None)
    if family is None:
        return []
    sizes = sorted((n for n in devices if n.split("-")[0] == family), key=lambda n: devices[n].memory_gb)
    memory = re.search(r"(\d+)\s*g", spelled.replace(family, ""))
    if memory:
        exact = [n for n in sizes if n.endswith(f"-{memory.group(1)}gb")]
        if exact:
            return exact
    return sizes


def version() -> str | None:
    done = run(["sinfo", "--version"])
    return done.stdout.strip() if done and done.returncode == 0 else None


def partitions() -> list[Partition] | None:
    """Every partition this user may see; None when sinfo does not answer."""
    done = run(["sinfo", "-h", "-o", "%P|%a|%l|%D|%c|%m|%G"])
    if done is None or done.returncode != 0:
        return None
    return parse_sinfo(done.stdout)


def accounting_answers() -> bool:
    done = run(["sacct", "-n", "-X", "-S", "now-1hours", "-o", "JobID"])
    return bool(done and done.returncode == 0)


def node_names(partition: str | None = None) -> set[str] | None:
    """The nodes of the cluster, or of one partition (a node in several partitions counts once); None without sinfo."""
    done = run(["sinfo", "-h", "-N", "-o", "%N", *(["-p", partition] if partition else [])])
    return set(done.stdout.split()) if done and done.returncode == 0 else None


def runs_here(partition: str | None) -> bool:
    """Whether the jobs of `partition` (or of the whole cluster) run on this very machine: a one-node cluster, as a
    department server with Slurm is, or a partition of this host alone. Its local paths are then theirs too."""
    names = node_names(partition)
    return bool(names) and names == {socket.gethostname().split(".")[0]}


def request_problems(slurm, part: Partition, parts: list[Partition] | None) -> list[tuple[str, str, str]]:
    """(key, what is wrong, the fix) for each thing `slurm` asks per node that no node of `part` has: such a job
    pends forever (or sbatch refuses it). `doctor` reports them; `submit` refuses them."""
    found = []
    name = f"partition {part.name}"
    if slurm.gpus > 0:
        wanted = (slurm.gpu_type or "").lower()
        offered = [g for g in part.gpus if not wanted or (g.type or "").lower() == wanted]
        if not offered:
            types = ", ".join(sorted({g.type or "untyped" for g in part.gpus})) or "no GPUs"
            elsewhere = [q.name for q in parts or [] if any((g.type or "").lower() == wanted for g in q.gpus)]
            found.append(("slurm.gpus", f"{slurm.gpus} x gpu{':' + slurm.gpu_type if slurm.gpu_type else ''} asked; {name} has {types}",
                          f"slurm.partition={elsewhere[0]}" if elsewhere else f"slurm.gpu_type to one of: {types}"))
        elif (most := max(g.count for g in offered)) < slurm.gpus:
            found.append(("slurm.gpus", f"{slurm.gpus} GPUs per node asked; {name}'s nodes have {most}",
                          f"slurm.gpus={most} with slurm.nodes={math.ceil(slurm.gpus / most)}"))
    if part.cpus and slurm.cpus_per_task > part.cpus:
        found.append(("slurm.cpus_per_task", f"{slurm.cpus_per_task} asked; {name}'s nodes have {part.cpus}", f"slurm.cpus_per_task={part.cpus}"))
    if part.memory_mb and slurm_mem_mib(slurm.mem) > part.memory_mb:  # both in Slurm's MiB; 0 asks for all of a node's
        found.append(("slurm.mem", f"{slurm.mem} asked; {name}'s nodes have {part.memory_mb}M ({part.memory_mb / 1024:.1f}G)",
                      f"slurm.mem={part.memory_mb}M"))
    if part.nodes and slurm.nodes > part.nodes:
        found.append(("slurm.nodes", f"{slurm.nodes} asked; {name} has {part.nodes}", f"slurm.nodes={part.nodes}"))
    return found


def target_partition(slurm, parts: list[Partition]) -> Partition | None:
    """The partition a job of `slurm` goes to: the first of slurm.partition, else the cluster's default."""
    wanted = slurm.partition.split(",")[0] if slurm.partition else None
    return next((p for p in parts if (p.name == wanted if wanted else p.default)), None)


def whole_node_memory_gb(slurm) -> float | None:
    """GB of the largest node of the target partition, which `slurm.mem: 0` (all of a node's memory) gets; None where
    no Slurm answers."""
    parts = partitions()
    part = target_partition(slurm, parts) if parts else None
    return part.memory_mb * 2 ** 20 / 1e9 if part and part.memory_mb else None


def job_whole_node_gb(slurm) -> float | None:
    """For a CPU job of slurm.mem=0 (all of a node's memory): the memory of the partition's largest node, which the
    planner takes as the job's (None where Slurm does not answer, or for other jobs)."""
    return whole_node_memory_gb(slurm) if slurm.gpus == 0 and slurm_mem_mib(slurm.mem) == 0 else None


def what_no_node_has(slurm) -> list[tuple[str, str]]:
    """(key, what no node of the target partition has and the fix) for a job of `slurm`, where Slurm answers `sinfo`:
    such a job pends forever, or is refused after the wait. `submit` refuses it; `--dry-run` warns."""
    parts = partitions()
    part = target_partition(slurm, parts) if parts else None
    problems = request_problems(slurm, part, parts) if part is not None else []
    return [(key, f"{problem} (`hpclora doctor` shows the partitions): set {fix}") for key, problem, fix in problems]
