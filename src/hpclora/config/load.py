"""Loading a config: dataclass defaults <- YAML <- `key=value` overrides, checked, as plain dataclasses.

OmegaConf does the parsing and type coercion; this module walks the user's values against the schema itself
so that *every* problem is collected and reported with its full key path, instead of stopping at the first one.
Only plain dataclasses leave it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import os
import re
import typing
from pathlib import Path
from typing import Any

from ..errors import ConfigError, UserError
from .rules import BIND_SEPARATORS, check_values
from .value_types import shown, type_problems
from .schema import ENTRIES, REQUIRED, SECTIONS, RunConfig
from ..data.sources import data_sources
from ..catalog.start_adapter import adapter_dir


def load_run_config(path: str | os.PathLike) -> RunConfig:
    """The resolved config.yaml of a run directory. Its data file may since have moved: not checked."""
    return load(path, check_files=False)


def load(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (), check_files: bool = True) -> RunConfig:
    """Read a YAML config, apply `key=value` overrides, check everything, and return plain dataclasses.

    Relative `data.path` values are looked up in the working directory, then next to the config file;
    paths are made absolute so that a job never depends on where it was started.
    Raises ConfigError listing every problem.
    """
    problems: list[tuple[str, str]] = []
    raw = _read_yaml(path) if path is not None else {}
    raw = _deep_merge(raw, _parse_overrides(overrides, problems))
    known = _drop_mistyped(_drop_unknown(raw, problems), problems)
    cfg, missing = _to_dataclasses(_literal(known))
    mixed = isinstance(raw.get("data"), dict) and bool(raw["data"].get("sources"))  # a mix, whatever its entries' problems
    problems.extend((key, "required, but not set") for key in missing if not (key == "data.path" and mixed))
    unusable = _path_problems(cfg)
    if unusable:  # paths that the file system cannot even look up: nothing further can be checked with them
        raise ConfigError(problems + unusable)
    _resolve_paths(cfg, Path(path).resolve().parent if path is not None else Path.cwd())
    reported = {key for key, _ in problems} | ({"data.path"} if mixed else set())  # a mix names its files in data.sources
    for key, message in check_values(cfg, check_files):  # one problem per key: the first is the one to fix
        if key not in reported:
            problems.append((key, message))
            reported.add(key)
    if problems:
        raise ConfigError(problems)
    return cfg


def _read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if p.is_dir():
        configs = sorted(f.name for f in p.glob("*.yaml"))[:5]
        hint = f" such as {p / configs[0]}" if configs else ""
        raise UserError(f"{p}: is a directory; give a config file{hint} (`hpclora status` and `report` take run directories)")
    if not p.is_file():
        raise UserError(f"{p}: config file not found")
    stat = p.stat()
    return copy.deepcopy(_parse_yaml(str(p.resolve()), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=8)
def _parse_yaml(path: str, mtime_ns: int, size: int) -> dict:
    """Parsed once per file version: a sweep loads the same YAML for every trial."""
    from omegaconf import OmegaConf

    p = Path(path)
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
        if isinstance(loaded, dict):
            _keep_text_as_written(_compose(p), loaded)
    except UnicodeDecodeError as exc:
        raise UserError(f"{p}: not UTF-8 text (byte {exc.object[exc.start]:#x} at offset {exc.start}): save it as UTF-8") from None
    except Exception as exc:  # yaml.YAMLError and OmegaConf's own errors: show the parser's message
        if "node expansion exceeds" in str(exc):  # OmegaConf reads at most 10,000 nodes (a guard against alias bombs)
            raise UserError(f"{p}: holds more than 10,000 YAML values, where a config has a few dozen keys: is it a data file? "
                            "Give a config (see configs/), and name the data in its data.path") from None
        first = str(exc).strip().splitlines()
        raise UserError(f"{p}: not valid YAML: {' '.join(s.strip() for s in first[:4])}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"{p}: a config must be a mapping of sections (run:, model:, data:, ...)")
    return loaded


def _compose(p: Path):
    """The YAML node tree, which keeps each scalar's text as written."""
    import yaml

    with open(p, encoding="utf-8") as fh:
        return yaml.compose(fh, Loader=yaml.SafeLoader)


def _keep_text_as_written(node, loaded: dict, prefix: str = "") -> None:
    """Numbers YAML made of what was meant as text are put back as the text written. YAML 1.1 reads `1:30:00` as the
    base-60 number 5400 and `30:00` as 1800: a Slurm time (`slurm.time: 1:30:00`, 90 minutes) would become 5400
    minutes, so any plain scalar with a colon (a key that holds a number then says that `1:30` is not one). And a text
    key keeps its text: `model.revision: 1.10` is not 1.1, `slurm.account: 0777` not 511."""
    import yaml

    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if key not in loaded:
            continue
        if isinstance(value_node, yaml.ScalarNode) and value_node.style is None and _is_number(loaded[key]):
            if ":" in value_node.value or _holds_text(f"{prefix}{key}"):
                loaded[key] = value_node.value
        elif isinstance(value_node, yaml.MappingNode) and isinstance(loaded[key], dict):
            _keep_text_as_written(value_node, loaded[key], f"{prefix}{key}.")


def _holds_text(key: str) -> bool:
    """Whether the schema field at `section.name` holds text (str, or str or null)."""
    section, _, name = key.partition(".")
    return section in SECTIONS and _field_types(section).get(name) in (str, typing.Optional[str])


KEY_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def _parse_overrides(overrides, problems: list[tuple[str, str]]) -> dict:
    """`section.key=value` items as one nested mapping; each item that cannot be read is a problem of its own."""
    from omegaconf import OmegaConf

    parsed: dict = {}
    for item in overrides:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            problems.append((item, "an override must look like section.key=value"))
        elif "\n" in item or "\r" in item:
            problems.append((key, "an override is one line, but this one holds a line break: give each value on one line"))
        elif not KEY_PATH.match(key):
            problems.append((key, "not a key path such as lora.r (names of letters, digits and _, joined by dots)"))
        else:
            try:
                value_read = OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
                if _is_number(_leaf(value_read, key)) and (":" in value or _holds_text(key)):  # see _keep_text_as_written
                    value_read = functools.reduce(lambda inner, part: {part: inner}, reversed(key.split(".")), value.strip())
                parsed = _deep_merge(parsed, value_read)
            except Exception as exc:
                quoted = f"{key}='{value}'" if len(value) <= 80 else "the value in quotes"
                problems.append((key, f"cannot read the value {shown(value)} ({_parser_reason(exc)}); put it in quotes: {quoted}"))
    return parsed


def _leaf(nested: dict, key: str):
    for part in key.split("."):
        nested = nested.get(part) if isinstance(nested, dict) else None
    return nested


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parser_reason(exc: Exception) -> str:
    """The YAML scanner's own reason (`found character '`' that cannot start any token`), without its context."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = [line for line in lines if line.startswith("found ") or line.startswith("expected ")]
    return (reasons or lines or [type(exc).__name__])[0]


def _literal(value: Any) -> Any:
    """Escape OmegaConf's `${...}` interpolation: values are literal text, so that shell lines such as
    `slurm.setup: ['export X=${SLURM_CPUS_PER_TASK}']` and paths reach the job exactly as written."""
    if isinstance(value, str):
        # OmegaConf reads `\${` as a literal `${`, and backslashes right before it as escapes of each other.
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    if isinstance(value, dict):
        return {k: _literal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_literal(v) for v in value]
    return value


def _deep_merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _all_key_paths() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _suggest(key: str, candidates: list[str], prefix: str = "") -> str:
    """` (did you mean 'lora.r'?)` for the nearest known key, or nothing when none is close."""
    # A key put in the wrong section: `train.max_length` -> `data.max_length`.
    elsewhere = [p for p in _all_key_paths() if p.split(".")[1] == key]
    if elsewhere and prefix:
        return f" (did you mean '{elsewhere[0]}'?)"
    near = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not near:
        # Short keys score low with difflib (`rnak` vs `r`): fall back to a shared first letter.
        near = [c for c in candidates if len(c) <= 2 and key.startswith(c)]
    return f" (did you mean '{prefix}{near[0]}'?)" if near else ""


def _drop_unknown(raw: dict, problems: list[tuple[str, str]]) -> dict:
    """Keep the known sections and keys; record each unknown one with its full path and a suggestion."""
    known: dict = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            problems.append((str(section), "unknown section" + _suggest(str(section), list(SECTIONS))))
            continue
        if values is None:
            continue
        if not isinstance(values, dict):
            problems.append((section, f"expected a mapping of keys, got {type(values).__name__} {values!r}"))
            continue
        names = [f.name for f in dataclasses.fields(SECTIONS[section])]
        known[section] = {}
        for key, value in values.items():
            if key in names:
                known[section][key] = value
            else:
                problems.append((f"{section}.{key}", "unknown key" + _suggest(str(key), names, prefix=f"{section}.")))
    return known


@functools.lru_cache(maxsize=None)
def _field_types(section: str) -> dict[str, Any]:
    return typing.get_type_hints(SECTIONS[section])


def _entries(key: str, value: Any, cls: type, problems: list[tuple[str, str]]) -> list[dict] | None:
    """The entries of a list key such as data.sources, each against its own schema `cls`: unknown keys, types and
    required keys are named by their place (data.sources[1].weight); the entries' values that fit are kept."""
    if not isinstance(value, list):
        problems.append((key, f"expected a list of entries such as [{{path: a.jsonl}}], got {shown(value)}"))
        return None
    fields = dataclasses.fields(cls)
    names, types = [f.name for f in fields], typing.get_type_hints(cls)
    kept = []
    for i, entry in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(entry, dict):
            problems.append((where, f"expected a mapping such as {{path: a.jsonl, weight: 1}}, got {shown(entry)}"))
            continue
        clean = {}
        for name, v in entry.items():
            if name not in names:
                problems.append((f"{where}.{name}", "unknown key" + _suggest(str(name), names, prefix=f"{where}.")))
            elif found := type_problems(f"{where}.{name}", v, types[name]):
                problems.extend(found)
            else:
                clean[name] = v
        problems.extend((f"{where}.{f.name}", "required, but not set") for f in fields if f.default == REQUIRED and f.name not in entry)
        kept.append(clean)
    return kept


def _drop_mistyped(known: dict, problems: list[tuple[str, str]]) -> dict:
    """Keep the values their fields can hold; record each other one with its key path."""
    kept: dict = {}
    for section, values in known.items():
        kept[section] = {}
        for key, value in values.items():
            if (cls := ENTRIES.get(f"{section}.{key}")) is not None:
                if (entries := _entries(f"{section}.{key}", value, cls, problems)) is not None:
                    kept[section][key] = entries
                continue
            found = type_problems(f"{section}.{key}", value, _field_types(section)[key])
            if found:
                problems.extend(found)
            else:
                kept[section][key] = value
    return kept


@functools.lru_cache(maxsize=None)
def _schema():
    """The OmegaConf schema of RunConfig, built once."""
    from omegaconf import OmegaConf

    return OmegaConf.structured(RunConfig)


def _to_dataclasses(cleaned: dict) -> tuple[RunConfig, list[str]]:
    """The merged config, and the required keys nobody set (filled with "" so checks can go on)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(_schema(), cleaned)
        missing = []
        for section, cls in SECTIONS.items():
            for f in dataclasses.fields(cls):
                if OmegaConf.is_missing(merged[section], f.name):
                    if not (section, f.name) == ("data", "path") or not merged.data.sources:  # a mix has no data.path
                        missing.append(f"{section}.{f.name}")
                    merged[section][f.name] = ""
        return OmegaConf.to_object(merged), missing
    except OmegaConfBaseException as exc:  # a value _drop_mistyped let through: still the user's to fix
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError([(key, f"cannot be read: {str(exc).splitlines()[0]}")]) from None


# Directories and files a config names; an empty one would resolve to wherever hpclora happens to run.
PATH_KEYS = ("run.output_root", "slurm.log_dir", "data.cache_dir", "cache.hf_home", "container.image")
NAME_MAX, PATH_MAX = 255, 4096  # bytes in one file name and in a whole path (Linux)
DIRECTORY_KEYS = ("run.output_root", "slurm.log_dir", "data.cache_dir", "cache.hf_home")  # directories hpclora writes
SYSTEM_TREES = ("/proc", "/sys", "/dev")
# The paths a job in container.image binds (launch.container.job_binds), besides container.binds.
BOUND_KEYS = ("run.output_root", "data.cache_dir", "cache.hf_home", "data.path", "model.name", "model.adapter")


def _path_problems(cfg: RunConfig) -> list[tuple[str, str]]:
    """Paths no file system can hold: empty, with a NUL byte, or a name or path longer than Linux allows."""
    found = []
    named = [(key, getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])) for key in (*PATH_KEYS, "data.path", "model.name", "model.adapter")]
    named += [(f"container.binds[{i}]", bind.split(":")[0]) for i, bind in enumerate(cfg.container.binds)]
    if cfg.data.sources:
        named += [(f"{source.key}.path", source.data.path) for source in data_sources(cfg.data)]
    for key, value in named:
        if value is None:
            continue
        section, _, name = key.partition(".")
        if key in PATH_KEYS and not value.strip():
            nullable = typing.get_origin(_field_types(section)[name]) is typing.Union
            found.append((key, "is empty: give a path" + (", or null" if nullable else "")))
        elif "\0" in value:
            found.append((key, "holds a NUL byte, which no file name can: write the path without it"))
        elif len(os.fsencode(value)) > PATH_MAX or any(len(os.fsencode(part)) > NAME_MAX for part in value.split("/")):
            found.append((key, f"too long for a file system: at most {NAME_MAX} bytes per name and {PATH_MAX} per path"))
        elif key in DIRECTORY_KEYS and (problem := _directory_problem(value)):
            found.append((key, problem))
        elif cfg.container.image and key in BOUND_KEYS and (seen := sorted(set(value) & set(BIND_SEPARATORS))):
            found.append((key, f"holds {' '.join(map(repr, seen))}, which apptainer's -B reads as a separator: the job cannot "
                               "bind this path into container.image; rename or move it"))
    return found


def _directory_problem(value: str) -> str | None:
    """Why a directory hpclora writes into (and makes where missing) cannot be there: in the kernel's or the devices'
    trees, or below something that is not a directory."""
    path = Path(os.path.abspath(os.path.expanduser(value)))
    in_tree = lambda tree: path == Path(tree) or Path(tree) in path.parents  # noqa: E731
    if (tree := next((t for t in SYSTEM_TREES if in_tree(t)), None)) and not in_tree("/dev/shm"):  # shm: a RAM disk
        return f"is under {tree}, which holds the kernel's or the devices' files, not directories: give a directory on a file system"
    existing = next((p for p in (path, *path.parents) if os.path.lexists(p)), None)
    if existing is not None and not existing.is_dir():
        return f"{existing} is {'a file' if existing.is_file() else 'no directory'}: give a directory (it is made where missing)"
    return None


def _resolve_paths(cfg: RunConfig, config_dir: Path) -> None:
    cfg.run.output_root = str(Path(cfg.run.output_root).expanduser().resolve())
    if cfg.data.cache_dir:
        cfg.data.cache_dir = str(Path(cfg.data.cache_dir).expanduser().resolve())
    cfg.slurm.log_dir = str(Path(cfg.slurm.log_dir).expanduser().resolve())
    if cfg.container.image:
        cfg.container.image = str(Path(cfg.container.image).expanduser().resolve())
    if cfg.cache.hf_home:
        cfg.cache.hf_home = str(Path(cfg.cache.hf_home).expanduser().resolve())
        if not cfg.data.cache_dir:  # tokenized data goes to the shared cache too, where `stage` puts it
            cfg.data.cache_dir = str(Path(cfg.cache.hf_home) / "hpclora" / "tokenized")
    cfg.data.path = _found(cfg.data.path, config_dir)
    if cfg.model.adapter and (adapter := adapter_dir(cfg.model.adapter)) is not None:
        cfg.model.adapter = str(adapter)  # the adapter directory itself, wherever the job runs
    for entry in cfg.data.sources:
        entry["path"] = _found(entry["path"], config_dir)


def _found(data_path: str, config_dir: Path) -> str:
    """A data file's absolute path, looked up in the working directory, then next to the config; else as written."""
    data = Path(data_path).expanduser()
    for candidate in (data, config_dir / data):
        if data_path and candidate.exists():
            return str(candidate.resolve())
    return data_path


def to_yaml(cfg: RunConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg), sort_keys=False)
