"""The package's shape, read from its own imports: the stages import only the stages below them, nothing on the
login-node side imports torch (or its company) at module level, modules do not import each other in a circle, and
no module outgrows one job. A change that breaks one of these rules fails here, naming the import."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "hpclora"
BASICS = {"errors", "stops", "internals"}
# What each stage may import of hpclora, beside itself and the basics (errors, stops, internals): the flow
# config -> plan -> launch -> job -> results (which submits its own jobs: export), with catalog and data below all of
# them and site beside launch.
MAY_IMPORT = {
    "catalog": set(),
    "data": {"catalog"},
    "config": {"catalog", "data"},
    "rundir": {"config"},
    "plan": {"config", "catalog", "data", "rundir"},
    "launch": {"config", "catalog", "data", "plan", "rundir"},
    "site": {"config", "catalog", "data", "plan", "launch", "rundir"},
    "job": {"config", "catalog", "data", "plan", "rundir"},
    "results": {"config", "catalog", "data", "plan", "launch", "site", "rundir", "job"},
}
LOGIN_SIDE = {"catalog", "data", "config", "rundir", "plan", "launch", "site", *BASICS}
HEAVY = {"torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "safetensors"}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import of a module, relative ones resolved; `known`: the
    package's modules, so that `from . import plan` counts as importing the module hpclora.plan."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.append((full if full in known else target, node.lineno, id(node) in top))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top) for alias in node.names]
    return found


def stage(name: str) -> str | None:
    """The stage of an hpclora module: hpclora.plan.make -> plan; None for the faces (cli, api, __init__)."""
    parts = name.split(".")
    if len(parts) < 2:
        return None
    return parts[1] if parts[1] in MAY_IMPORT or parts[1] in BASICS else None


def layer_problems(found: dict[str, Path], root: Path = SRC.parent) -> list[str]:
    problems = []
    for name, path in found.items():
        here = stage(name)
        if here is None:
            continue
        for target, line, at_top in imports(name, path, found):
            there = target.split(".")[1] if target.startswith("hpclora.") else None
            if there and there != here and there not in BASICS and here not in BASICS and there not in MAY_IMPORT[here]:
                problems.append(f"{path.relative_to(root)}:{line}: {here} imports {target}")
            if here in BASICS and there and there not in BASICS:
                problems.append(f"{path.relative_to(root)}:{line}: {here} is a basic module and imports {target}")
            if at_top and here in LOGIN_SIDE and target.split(".")[0] in HEAVY:
                problems.append(f"{path.relative_to(root)}:{line}: login-node module imports {target} at module level")
    return problems


def circles(found: dict[str, Path]) -> list[list[str]]:
    """Cycles among hpclora's modules through module-level imports (the ones Python runs when a module loads)."""
    graph = {name: {t for t, _, top in imports(name, path, found) if top and t in found and t != name} for name, path in found.items()}
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return [c for c in cycles if not (len(c) == 2 and c[1].startswith(c[0] + "."))]  # a package importing its own module


def test_every_stage_imports_only_the_stages_below_it():
    assert layer_problems(modules()) == []


def test_a_broken_rule_is_named_by_its_import(tmp_path):
    """The check itself: a planner module that imported the launcher, or torch at module level, is reported."""
    broken = tmp_path / "hpclora" / "plan"
    broken.mkdir(parents=True)
    (broken / "bad.py").write_text("import torch\nfrom ..launch import render\n\n\ndef f():\n    from ..job import train\n")
    found = {"hpclora.plan.bad": broken / "bad.py", "hpclora.launch.render": SRC / "launch" / "render.py"}
    problems = layer_problems(found, root=tmp_path)
    assert problems == ["hpclora/plan/bad.py:1: login-node module imports torch at module level",
                        "hpclora/plan/bad.py:2: plan imports hpclora.launch.render",
                        "hpclora/plan/bad.py:6: plan imports hpclora.job"]


def test_no_modules_import_each_other_in_a_circle():
    assert circles(modules()) == []


def test_no_module_outgrows_one_job():
    sizes = {name: path.read_text(encoding="utf-8").count("\n") for name, path in modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}, f"split these by job (at most {MAX_LINES} lines)"
