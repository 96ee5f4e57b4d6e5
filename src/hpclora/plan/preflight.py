"""What the login node checks beyond the config's own values, before anything reaches the queue.

- Every row of a local data file is read and normalised exactly as training will read it, so that a bad
  row 3 fails here with the same `file:line` error, not in the job. Rows are streamed (a large file is
  never held in memory) and no torch is imported; a file is checked once per version, so a sweep of many
  trials on the same data reads it once.
- data.max_length must fit the model's context (max_position_embeddings), known from its config.json on
  disk or in the cache, or from the built-in table; an unknown model is not checked here.

Hub datasets are read in the job (or by `hpclora stage`), so they are not checked here.
"""

from __future__ import annotations

from ..catalog.dims import find_dims
from ..catalog.hub import local_data_path
from ..config import RunConfig
from ..data import check_rows
from ..errors import ConfigError, UserError

_checked: dict[tuple, dict] = {}  # data file version and reading settings -> what check_rows found


def check(cfg: RunConfig, data: bool = True) -> dict | None:
    """Check the model's context and (with `data`) every data row; returns the row count and format of a
    local data file, or None. Raises ConfigError or DataError."""
    check_context(cfg)
    return check_data(cfg) if data else None


def check_context(cfg: RunConfig) -> None:
    try:
        dims, source = find_dims(cfg)
    except UserError:  # dimensions unknown on this node: `plan` says so; the job checks when it loads the model
        return
    if dims.context and cfg.data.max_length > dims.context:
        raise ConfigError([("data.max_length", (
            f"{cfg.data.max_length} tokens do not fit the context of {cfg.model.name}, {dims.context} tokens "
            f"(max_position_embeddings, from {source}): use at most {dims.context}"))])


def check_data(cfg: RunConfig) -> dict | None:
    path = local_data_path(cfg.data.path)
    if path is None or not path.is_file():  # a hub id, or a missing file (which the config check reports)
        return None
    d, stat = cfg.data, path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size, d.split, d.format, d.template, tuple(sorted(d.columns.items())), d.max_rows)
    if key not in _checked:
        _checked[key] = check_rows(d)
    return _checked[key]
