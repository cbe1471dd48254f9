"""Atomic writes: a file either exists whole or not at all.

Everything is written to a temporary sibling and renamed into place, so an interrupted run never
leaves a half-written artifact that a later stage would mistake for a finished one.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import yaml


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_interrupted_writes(directory: str | os.PathLike) -> int:
    """Delete the temporary files (``.NAME.XXXX.tmp``) that writes cut short by a kill left anywhere
    under ``directory`` (:func:`atomic_path` removes its own otherwise); returns how many. Only safe
    while nothing writes there: a run calls it once, before its stages start."""
    removed = 0
    for stale in Path(directory).rglob(".*.tmp"):
        if stale.is_file():
            stale.unlink()
            removed += 1
    return removed


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_yaml(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, yaml.safe_dump(_plain(obj), sort_keys=False))


def _plain(obj: Any) -> Any:
    """Mappings (a common.config.Config among them) as dicts, tuples as lists, all the way down."""
    if isinstance(obj, Mapping):
        return {key: _plain(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(value) for value in obj]
    return obj


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array)


def read_json(path: str | os.PathLike) -> Any:
    from .errors import UserError

    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"missing file {path}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"corrupt JSON file {path} ({err.msg}); delete it and rerun") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):              # a config section (common.config.Config)
        return dict(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")
