"""Answers side by side in a terminal, aware of wide (CJK) characters: Japanese takes two columns a character and
has no spaces to break at."""

from __future__ import annotations

import unicodedata


def display_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def wrap(text: str, width: int) -> list[str]:
    lines = []
    for paragraph in text.splitlines() or [""]:
        line, used = "", 0
        for word in _breakable(paragraph):
            w = display_width(word)
            if used + w > width and line:
                lines.append(line.rstrip())
                line, used = word.lstrip(), display_width(word.lstrip())
            else:
                line, used = line + word, used + w
            while used > width:  # a single word wider than the column
                cut, acc = 0, 0
                while cut < len(line) and acc + display_width(line[cut]) <= width:
                    acc += display_width(line[cut])
                    cut += 1
                lines.append(line[:cut])
                line = line[cut:]
                used = display_width(line)
        lines.append(line.rstrip())
    return lines


def _breakable(paragraph: str) -> list[str]:
    """Words with their leading space; each wide character is its own unit (CJK has no spaces)."""
    units, current = [], ""
    for ch in paragraph:
        if unicodedata.east_asian_width(ch) in "WF":
            if current:
                units.append(current)
            units.append(ch)
            current = ""
        elif ch == " " and current.strip():
            units.append(current)
            current = ch
        else:
            current += ch
    if current:
        units.append(current)
    return units


def side_by_side(left_title: str, left: str, right_title: str, right: str, total_width: int = 100) -> str:
    col = max(20, (total_width - 3) // 2)
    a, b = wrap(left, col), wrap(right, col)
    rows = [_pad(left_title, col) + " | " + right_title, "-" * col + "-+-" + "-" * col]
    for i in range(max(len(a), len(b))):
        rows.append(_pad(a[i] if i < len(a) else "", col) + " | " + (b[i] if i < len(b) else ""))
    return "\n".join(r.rstrip() for r in rows)


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - display_width(text))
