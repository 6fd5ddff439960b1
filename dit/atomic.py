"""Atomic, durable files and directories: written beside their final name, flushed to disk, renamed into place.

Readers (and a crash at any point) see the old file or directory or the new one, never a half-written
one. The contents are fsynced before the rename and the parent directory after it, so a power loss
cannot leave a "complete" file that is empty or partial on disk (POSIX rename alone does not promise
that). Every writer of results goes through these: checkpoints, exports, sample npz files and grids,
FID statistics, the domain classifier's cache.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["atomic_dir", "atomic_file", "fsync_dir", "fsync_tree", "replace_dir"]


def fsync_file(path: str | Path) -> None:
    """Flush one file's contents to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (names created, renamed or removed in it) to the disk."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # some platforms cannot open directories; nothing more can be done there
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. filesystems that do not support fsync on directories
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file under root, then every directory, deepest first (before renaming root into place)."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                fsync_file(path)
        fsync_dir(dirpath)


def atomic_file(path: str | Path, write, suffix: str = "") -> Path:
    """Create a file through write(tmp_path) in a temporary sibling, fsync it, rename it into place and fsync
    the directory: readers see the old file or the new one, never a half-written one. suffix: what the
    writer appends."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


class atomic_dir:
    """Write a directory atomically: into a temporary sibling, fsynced, renamed into place on success.

    An existing directory of the same name is replaced only after the new one is complete, so a
    crash at any point leaves either the old or the new directory, never a half-written one (a crash
    between the two renames of a replacement leaves the old one as a hidden `.<name>.old-<pid>`).
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
        try:
            fsync_tree(self.tmp)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        replace_dir(self.tmp, self.path)
        return False


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename the complete directory tmp to final (replacing an existing one) and fsync the parent."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
