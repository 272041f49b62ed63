"""Durable file writes and checked reads, used by every layer (data, engine, stages).

A write goes to a temporary name beside its target, is fsynced, and is renamed over the target, and the rename is
made durable by an fsync of the directory: a reader (or a run restarted after a crash) sees the old file or the
new one, never a half-written one.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hsfm_train.errors import DataFormatError

_CHUNK = 1 << 20


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a directory fsync makes the renames inside it durable)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """Call ``write(temporary_path)``, fsync what it wrote, and rename it over ``path``."""
    path = Path(path)
    # Not tempfile.mkstemp: its 0600 mode would survive the rename and hide the file from group readers.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(temporary)
        fsync_path(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    text = json.dumps(payload, indent=1) + "\n"
    write_atomic(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def read_json(path: str | os.PathLike, what: str = "") -> Any:
    """Parsed JSON of ``path``; a missing file raises FileNotFoundError, an unreadable one DataFormatError naming
    it (and ``what`` it should have been)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as error:
        label = f" ({what})" if what else ""
        raise DataFormatError(f"{path}{label} is not readable JSON: {error}") from None


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def jsonable(value: Any) -> Any:
    """``value`` with numpy arrays and scalars (also inside dicts, lists and tuples) made plain Python for JSON."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
