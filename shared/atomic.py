"""Atomic file writes: a crash never leaves a half-written file that a person or a resume would read.

Each write goes to ``<name>.tmp`` in the target's own folder (``os.replace`` is atomic
only within one file system) and replaces the target once complete. On an error the
temp file is removed and the target keeps its old content.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path to write (for writers that take a path); replace ``path`` on success."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically; ``fsync``: on disk before the rename (survives power loss)."""
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        fh.write(data)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())


def write_text_atomic(path: str | os.PathLike[str], text: str, *, encoding: str | None = None) -> None:
    """Write ``text`` to ``path`` atomically (``encoding`` as ``Path.write_text``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
