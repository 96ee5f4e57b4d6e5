"""Errors a user can fix. The CLI prints them as `error: ...` lines and exits 2, without a traceback."""

from __future__ import annotations

import errno
import re

USER_ERROR_EXIT = 2

# What a file system refuses for reasons of the user's paths, permissions or space, not for a fault of hpclora:
# said in one line (which path, why, what to do), never as a traceback.
FILE_SYSTEM_REFUSALS = {
    errno.ENAMETOOLONG: "a file name is longer than 255 bytes or the path longer than the file system allows: shorten it",
    errno.ENOSPC: "the file system is full: free space there (or point the run elsewhere) and run again",
    errno.EDQUOT: "your disk quota is used up: free space (`quota -s` shows it) or point the run elsewhere",
    errno.EFBIG: "the file is larger than allowed here (`ulimit -f`): raise the limit or write elsewhere",
    errno.EROFS: "the file system is read-only: write the run elsewhere",
    errno.EACCES: "permission denied: check the directory's owner and mode, or write elsewhere",
    errno.EPERM: "operation not permitted: check the directory's owner and mode, or write elsewhere",
}


def file_system_refusal(exc: OSError) -> str:
    """`PATH: reason: what to do` for an OSError of FILE_SYSTEM_REFUSALS."""
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{FILE_SYSTEM_REFUSALS[exc.errno]}"


# How libraries written in Rust or C++ (safetensors, tokenizers) carry the errno in their message text.
_ERRNO_IN_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")


def refusal_errno(exc: BaseException) -> int | None:
    """The errno of FILE_SYSTEM_REFUSALS behind `exc`: of an OSError in its chain of causes, or written in its text."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in FILE_SYSTEM_REFUSALS:
            return seen.errno
        found = _ERRNO_IN_TEXT.search(str(seen))
        if found and int(found.group(1) or found.group(2)) in FILE_SYSTEM_REFUSALS:
            return int(found.group(1) or found.group(2))
        seen = seen.__cause__ or seen.__context__
    return None


class UserError(Exception):
    """A mistake in the user's input (config, data, paths, missing model) rather than a bug."""

    def lines(self) -> list[str]:
        return [str(self)]


class ConfigError(UserError):
    """Every problem found in one config, so that all of them are reported together."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{key}: {msg}" for key, msg in problems))

    def lines(self) -> list[str]:
        return [f"{key}: {msg}" for key, msg in self.problems]


class DataError(UserError):
    """A problem in a data file, located by file and line (or row) number when there is one."""

    def __init__(self, path: str, message: str, row: int | None = None, unit: str = "line"):
        # path:line like a compiler for line-based files; (row N) for records of a JSON list or a table
        where = path if row is None else f"{path}:{row}" if unit == "line" else f"{path} ({unit} {row})"
        self.path, self.row = path, row
        super().__init__(f"{where}: {message}")


class NotSubmitted(UserError):
    """The scheduler answered, and took nothing (or a launcher refused before asking it): whatever was
    written for the job may go. Any other failure of a submission leaves its run directory in place."""


class ModelNotFoundError(UserError):
    """The base model cannot be loaded from disk or the cache, and the hub is not reachable."""
