"""Values that are credentials, whatever key holds them: refused in every config key (rules.secret_values) and never
repeated in a message about another problem of the value (value_types.shown)."""

from __future__ import annotations

import re

# Values that are credentials, whatever key holds them, also as a part of a path or of a shell line: the token
# formats of the hub, GitHub, GitLab, npm, OpenAI-style APIs, Slack and AWS key ids; runs of 32 or more hex digits
# (W&B keys are 40); and runs of 40 or more letters and digits of both cases (base62 and base64 keys).
SECRET_VALUE = re.compile(
    r"(?<![A-Za-z0-9])(?:hf_[A-Za-z0-9]{30,}|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_\w{30,}|glpat-[\w-]{20,}|npm_[A-Za-z0-9]{30,}"
    r"|sk-[\w-]{20,}|xox[abprs]-[\w-]{10,}|(?:AKIA|ASIA)[0-9A-Z]{16}"
    r"|(?=[A-Za-z0-9]*[0-9])(?=[A-Za-z0-9]*[a-z])(?=[A-Za-z0-9]*[A-Z])[A-Za-z0-9+/]{40,}={0,2})(?![A-Za-z0-9])")
SECRET_HEX = re.compile(r"(?<![0-9A-Za-z])[0-9a-fA-F]{32,}(?![0-9A-Za-z])")
# Where 40 hex digits are no secret: a commit (the whole of model.revision), and a snapshot of the Hugging Face cache
# in a path.
COMMIT_KEYS = ("model.revision",)
SNAPSHOT = re.compile(r"(?<=snapshots/)[0-9a-f]{40}(?=/|$)")


def looks_secret(key: str, value: str) -> bool:
    commit = key in COMMIT_KEYS and re.fullmatch(r"[0-9a-f]{7,40}", value)
    return bool(SECRET_VALUE.search(value)) or not commit and bool(SECRET_HEX.search(SNAPSHOT.sub("", value)))


def redact(text: str) -> str:
    """`text` with every run that looks like a credential replaced: what an error message may repeat of a value."""
    hidden = SECRET_VALUE.sub("<a token, not repeated>", text)
    return SECRET_HEX.sub(lambda m: m.group(0) if SNAPSHOT.fullmatch(m.group(0)) else "<a key, not repeated>", hidden)
