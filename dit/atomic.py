"""Atomic files and directories: written beside their final name, renamed into place on success.

Readers (and a crash at any point) see the old file or directory or the new one, never a half-written
one. Every writer of results goes through these: checkpoints, exports, sample npz files and grids,
FID statistics.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["atomic_dir", "atomic_file"]


def atomic_file(path: str | Path, write, suffix: str = "") -> Path:
    """Create a file through write(tmp_path) in a temporary sibling, then rename it into place: readers
    see the old file or the new one, never a half-written one. suffix: what the writer appends."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


class atomic_dir:
    """Write a directory atomically: into a temporary sibling, renamed into place on success.

    An existing directory of the same name is replaced only after the new one is complete, so a
    crash at any point leaves either the old or the new directory, never a half-written one.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False
