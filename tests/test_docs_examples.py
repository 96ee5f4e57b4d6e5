"""The outputs the README and the docs show for login-node commands (`hpclora validate`, `hpclora plan`) are what
those commands print today: each such example is run here, on the shipped configs, and compared line by line, so
that a planner change cannot leave the documentation describing another program. A line `…` (or `...`) in an
example stands for lines left out, and `…` inside a line for text left out. Outputs of jobs and training runs,
which the suite cannot repeat, are marked `<!-- from a real run: ... -->` above their block and not run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import ROOT

CHECKED = ("validate", "plan")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def examples() -> list[tuple[str, int, list[str], list[str]]]:
    """(page, line, argv, shown output) of every checked command in a fenced block not marked as from a real run."""
    found = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        inside, real_run = False, False
        for number, line in enumerate(lines, start=1):
            if line.startswith("```"):
                inside = not inside
                if not inside:
                    real_run = False
                continue
            if not inside:
                real_run = real_run or line.startswith("<!-- from a real run")
                continue
            words = shlex.split(line[2:], comments=True) if line.startswith("$ ") else []
            if real_run or len(words) < 2 or Path(words[0]).name != "hpclora" or words[1] not in CHECKED:
                continue
            shown = []
            for following in lines[number:]:
                if following.startswith(("```", "$ ")):
                    break
                shown.append(following)
            while shown and not shown[-1].strip():  # the blank line before the block's next command
                shown.pop()
            found.append((page.relative_to(ROOT).as_posix(), number, words[1:], shown))
    return found


def matches(shown: list[str], printed: list[str]) -> bool:
    """Whether the example's lines are the printed ones, `…` standing for left-out lines or text."""
    pattern = "".join("(?:[^\n]*\n)*?" if line.strip() in ("…", "...") else
                      "[^\n]*?".join(map(re.escape, re.split(r"…|\.\.\.", line))) + "\n" for line in shown)
    return re.fullmatch(pattern, "".join(f"{line}\n" for line in printed)) is not None


def test_the_docs_show_login_node_commands_the_way_they_print():
    assert len(examples()) >= 3  # the README's validate and the docs' plans at least


@pytest.mark.parametrize("page, line, argv, shown", examples(), ids=lambda v: v if isinstance(v, (str, int)) else None)
def test_an_example_output_is_what_the_command_prints(page, line, argv, shown, cli, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HPCLORA_STATE_DIR", str(tmp_path / "state"))  # no calibration of this machine's probes
    done = cli(*argv)
    printed = (done.stdout + done.stderr).rstrip("\n").splitlines()
    assert matches(shown, printed), f"{page}:{line}: the example no longer matches; today it prints:\n" + "\n".join(printed)
