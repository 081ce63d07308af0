"""Atomic writes: a reader (or a crash) never sees half a file. Temp file in the same folder,
named by process id so concurrent workers never share one, then ``os.replace``. Every result,
cache entry and table is written through here."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (Parquet, PNG, NumPy,
    a model's folder); it replaces ``path`` when the block ends, and is removed if the block fails.
    The temp name keeps the suffix, since some writers pick the format by it (or append one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise
    if tmp.is_dir() and path.is_dir():
        shutil.rmtree(path)  # os.replace cannot replace a non-empty folder
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))
