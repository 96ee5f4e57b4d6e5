"""What Slurm accepts, checked on the login node: time and memory units, names, and the #SBATCH options
a config may add. Pure functions, no Slurm commands: the config checks, the planner and the job-script
renderer share them.
"""

from __future__ import annotations

import math
import re

# Slurm's time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
SLURM_TIME = re.compile(r"^(\d+-\d{1,2}(:\d{1,2}){0,2}|\d+(:\d{1,2}){0,2})$")
SLURM_MEM = re.compile(r"^\d+[KMGT]?$")
# `--signal=B:USR1@N`: Slurm keeps N in 16 bits.
MAX_SIGNAL_LEAD_S = 65535
# "the signal may be sent up to 60 seconds earlier than specified" (sbatch(1), --signal).
SIGNAL_EARLY_S = 60
# Training an allocation must get before the signal at the least: below that a job only starts and stops.
MIN_TRAIN_S = 30

# What each Slurm value may hold: names, node lists and feature expressions, but nothing a shell or
# an #SBATCH line could read as something else.
SLURM_WORDS = {
    "partition": re.compile(r"^[\w.-]+(,[\w.-]+)*$"),
    "account": re.compile(r"^[\w.-]+$"),
    "qos": re.compile(r"^[\w.-]+$"),
    "gpu_type": re.compile(r"^[\w.-]+$"),
    "constraint": re.compile(r"^[\w.\-&|,*\[\]()!:]+$"),
    "exclude": re.compile(r"^[\w.\-,\[\]]+$"),
}
UNSAFE_IN_SBATCH_LINES = ('"', "\\", "\n", "\r")

# One option per #SBATCH line, long form, no spaces: sbatch splits #SBATCH lines at white space, and
# hpclora keeps quotes out of them.
SBATCH_OPTION = re.compile(r"^--(?P<name>[A-Za-z][A-Za-z0-9-]*)(=(?P<value>[^\s\"'\\]+))?$")
# Options the job script sets from the config itself, and the key that sets each.
OWNED_OPTIONS = {
    "job-name": "run.name", "output": "slurm.log_dir", "error": "slurm.log_dir", "signal": "train.preempt_grace_s",
    "requeue": "slurm.max_requeues", "no-requeue": "slurm.max_requeues", "array": "`hpclora sweep`",
    "nodes": "slurm.nodes", "ntasks": "slurm.nodes", "ntasks-per-node": "slurm.nodes", "cpus-per-task": "slurm.cpus_per_task",
    "mem": "slurm.mem", "mem-per-cpu": "slurm.mem", "mem-per-gpu": "slurm.mem", "time": "slurm.time",
    "partition": "slurm.partition", "account": "slurm.account", "qos": "slurm.qos", "gres": "slurm.gpus and slurm.gpu_type",
    "gpus": "slurm.gpus and slurm.gpu_type", "gpus-per-node": "slurm.gpus", "gpus-per-task": "slurm.gpus",
    "constraint": "slurm.constraint", "exclude": "slurm.exclude",
}
# Options that would break an hpclora job, and why.
REFUSED_OPTIONS = {
    "wrap": "sbatch runs hpclora's job script, which --wrap would replace",
    "open-mode": "a requeued job must append to its log (the script sets --open-mode=append)",
    "parsable": "hpclora reads sbatch's answer itself",
    "test-only": "it queues no job; `hpclora submit --dry-run` writes the script, and `sbatch --test-only` on it estimates the start",
}


def slurm_time_problem(time: str) -> str | None:
    """Why `time` is no Slurm time, or None. Beyond the form, minutes and seconds after an hour count stay below 60 and
    hours after a day count below 24 (`00:99:99` is a typo, not 100 minutes)."""
    if not SLURM_TIME.match(time):
        return f"not a Slurm time (MM, HH:MM:SS or D-HH:MM:SS): {time!r}"
    days, _, clock = time.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    limits = [24, 60, 60] if days else {1: [None], 2: [None, 60], 3: [None, 60, 60]}[len(parts)]
    if any(limit is not None and part >= limit for part, limit in zip(parts, limits)):
        return f"not a Slurm time: {time!r} counts {'hours past 23 or ' if days else ''}minutes or seconds past 59"
    if not int(days or 0) and not any(parts) and time.strip() != "0":  # sbatch reads zero as no limit: `0` says so on purpose
        return (f"{time!r} is zero, which Slurm reads as no limit (the partition's maximum): give the time the run needs, "
                "auto, or 0 for no limit on purpose")
    return None


def slurm_seconds(time: str) -> int:
    """Seconds in a Slurm time string: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    days, _, clock = time.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:  # after a day count the clock reads HH[:MM[:SS]]
        h, m, s = parts + [0] * (3 - len(parts))
    else:
        h, m, s = {1: [0, parts[0], 0], 2: [0, *parts], 3: parts}[len(parts)]
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + s


def slurm_time(seconds: float) -> str:
    """Seconds, rounded up, as HH:MM:SS (D-HH:MM:SS past a day): a Slurm time, and how logs show durations."""
    seconds = max(0, math.ceil(seconds))
    days, rest = divmod(seconds, 86400)
    clock = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{clock}" if days else clock


# Slurm's memory units are binary: 1G = 1024M, and a plain number is M (MiB), as sinfo's RealMemory is.
MEM_UNITS_MIB = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 ** 2}


def slurm_mem_mib(mem: str) -> int:
    """MiB in a Slurm memory size (`--mem`, SLURM_MEM_PER_NODE): 32G = 32768, 64000M = 64000, 512 = 512."""
    factor = MEM_UNITS_MIB.get(mem[-1].upper(), None)
    return int(float(mem[:-1]) * factor) if factor is not None else int(mem)


def slurm_mem_gb(mem: str) -> float:
    """GB (10^9 bytes, the planner's unit) in a Slurm memory size: 32G is 34.4 GB."""
    return slurm_mem_mib(mem) * 2 ** 20 / 1e9


def sbatch_option_problem(option: str) -> str | None:
    """Why `option` cannot be one more #SBATCH line of an hpclora job, or None when it can."""
    match = SBATCH_OPTION.match(option)
    if not match:
        return (f"expected one sbatch option as --name or --name=value, without spaces, quotes or backslashes, "
                f"got {option!r}")
    name, value = match.group("name"), match.group("value")
    # sbatch takes any unambiguous start of a long option for the whole (`--outp` is --output): judge the whole.
    checked = [*OWNED_OPTIONS, *REFUSED_OPTIONS, "export"]
    if name not in checked and (meant := sorted(o for o in checked if o.startswith(name))):
        return f"sbatch reads --{name} as {' or '.join('--' + o for o in meant)} (it takes abbreviations): write options whole"
    if name == "export" and value and not value.startswith("ALL"):
        return "jobs need your environment (tokens, PATH, modules): only --export=ALL[,NAME=value...] is allowed"
    if name in OWNED_OPTIONS:
        return f"--{name} is set by hpclora from {OWNED_OPTIONS[name]}: set that instead"
    if name in REFUSED_OPTIONS:
        return f"--{name} cannot be used: {REFUSED_OPTIONS[name]}"
    return None


def preempt_grace_problem(grace_s: int, time: str) -> str | None:
    """Why `train.preempt_grace_s` does not fit a job of `slurm.time`, or None.

    Slurm signals the job grace_s (and up to SIGNAL_EARLY_S more) seconds before the limit: when that is
    at or before the start, the job is told to stop at once and requeues until it runs out of requeues.
    """
    limit = slurm_seconds(time)
    if limit == 0:  # --time=0: no limit, no signal
        return None
    latest = limit - SIGNAL_EARLY_S - MIN_TRAIN_S
    if grace_s <= latest:
        return None
    if latest < 10:
        return (f"slurm.time={time} is too short to train and still checkpoint before the limit "
                f"(Slurm may signal up to {SIGNAL_EARLY_S} s early): ask for at least {slurm_time(SIGNAL_EARLY_S + MIN_TRAIN_S + 10)}")
    return (f"{grace_s} s before the limit of slurm.time={time} ({limit} s) leaves no time to train "
            f"(Slurm may signal up to {SIGNAL_EARLY_S} s early): use at most {latest}, or more slurm.time")
