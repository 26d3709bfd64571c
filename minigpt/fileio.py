"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

Each writer goes through a temp file of its own in the target's folder, then renames it into
place, so concurrent writers (DDP ranks) never share a temp file.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

PathLike = str | os.PathLike

__all__ = ["atomic_write", "atomic_write_json", "atomic_write_text"]


def atomic_write(path: PathLike, writer: Callable[[str], object]) -> None:
    """Write `path` through `writer(tmp_path)` into a temp file next to it, then rename it into place.

    On any failure (an exception, Ctrl-C) the temp file is removed and `path` is left untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """Atomically write `text` to `path` as UTF-8."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: PathLike, obj) -> None:
    """Atomically write `obj` as JSON (indent=1, trailing newline, UTF-8)."""
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def read_json_object(path: PathLike, error: type[Exception], label: str | None = None) -> dict:
    """The JSON object in `path`; an unreadable file, broken JSON or another JSON value raises
    `error` in one line, naming the file as `label` (default: its path)."""
    label = label or str(path)
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise error(f"{label}: unreadable JSON ({e})") from e
    if not isinstance(obj, dict):
        raise error(f"{label}: expected a JSON object, got {type(obj).__name__}")
    return obj
