"""Safe writing: atomic, durable files and directories; write failures said in one line; one writer per run.

Atomic: written beside their final name (a hidden `.<name>.tmp-*`), flushed to disk, renamed into place.
Readers (and a crash at any point) see the old file or directory or the new one, never a half-written
one. The contents are fsynced before the rename and the parent directory after it, so a power loss
cannot leave a "complete" file that is empty or partial on disk (POSIX rename alone does not promise
that). Every writer of results goes through these: checkpoints, exports, sample npz files and grids,
FID statistics, the domain classifier's cache. remove_stale_temporaries clears what a killed writer left.

Write failures (WriteFailed, `writing`): a full disk, a quota, the file-size limit or a read-only
filesystem become one line naming the cause ("no space left on device"), the path and the bytes needed
and free where known, whatever raised it (torch's zip writer says only "unexpected pos ...").

One writer per run directory (RunLock): an flock on run_dir/run.lock, held for the run's life, with its
holder (host, pid, start time, command) written in the file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import socket
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "RunDirBusy",
    "RunLock",
    "WriteFailed",
    "append_line",
    "atomic_dir",
    "atomic_file",
    "fsync_dir",
    "fsync_tree",
    "remove_stale_temporaries",
    "replace_dir",
    "writing",
]

# What the writers here name their temporaries: `.<name>.tmp-<random>[suffix]` (atomic_file, atomic_dir),
# `.<name>.tmp` (a checkpoint being assembled), `.<name>.old-<pid>` (a directory being replaced).
TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:tmp(?:-[A-Za-z0-9_]+)?(?:\.[A-Za-z0-9]+)?|old-(?P<pid>\d+))$")


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        with writing(path):
            write(tmp)
            fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def append_line(path: str | Path, line: str, kept: str = "") -> None:
    """Append one line to a log file whole or not at all: a write that fails (full disk) is cut back off, so no
    half line is left for readers; the failure leaves as WriteFailed."""
    data = (line + "\n").encode()
    with writing(path, len(data), kept):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            end = os.fstat(fd).st_size
            try:
                done = 0
                while done < len(data):
                    done += os.write(fd, data[done:])
            except OSError:
                os.ftruncate(fd, end)
                raise
        finally:
            os.close(fd)


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
        if exc_type is None:
            try:
                fsync_tree(self.tmp)
            except BaseException as e:
                exc = e
        if exc is not None:
            failure = write_failure(exc, self.path)  # (before the temporary's space is freed)
            shutil.rmtree(self.tmp, ignore_errors=True)
            if failure is not None:
                raise failure from exc
            if exc_type is None:
                raise exc
            return False
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


def remove_stale_temporaries(directory: str | Path, deep: bool = True, name: str | None = None) -> list[Path]:
    """Remove what writers killed mid-write left in directory (and its non-hidden subdirectories when deep):
    the temporaries named by TEMPORARY. A replaced directory's old copy (`.<name>.old-<pid>`) is removed only
    when <name> exists; a crash between a replacement's two renames left none, so the old copy is renamed back.
    name: only the temporaries of that name (a writer clearing its own leftovers in a folder others write to).
    Returns what was removed or restored. Call it only while no other writer can be at work there (RunLock)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    done = []
    folders = [directory] + (
        [d for d in sorted(directory.iterdir()) if d.is_dir() and not d.name.startswith(".")] if deep else []
    )
    for folder in folders:
        for entry in sorted(folder.iterdir()):
            match = TEMPORARY.match(entry.name)
            if match is None or name not in (None, match["name"]):
                continue
            final = entry.with_name(match["name"])
            if match["pid"] is not None and not final.exists():
                os.replace(entry, final)
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            done.append(entry)
        if done:
            fsync_dir(folder)
    return done


# --- write failures ---------------------------------------------------------------------------------

# errno -> what the user is told
CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
# Below this much free space, a writer's error that names no errno (torch's zip writer, safetensors) is a full disk.
NEARLY_FULL = 1 << 20


class WriteFailed(OSError):
    """A write that failed, as one line: the cause, the path, the bytes needed and free where known."""

    def __init__(self, code: int, message: str):
        super().__init__(code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def free_bytes(path: str | Path) -> int | None:
    """Free space (for an unprivileged writer) on the filesystem of path or its nearest existing ancestor."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _file_size_limit() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def _cause(error: BaseException, free: int | None, needed: int | None) -> tuple[int, str] | None:
    """(errno, what to tell) for an error raised while writing; None when it is not a write failure we can name."""
    code = getattr(error, "errno", None) if isinstance(error, OSError) else None
    if code == errno.EFBIG or (code is None and _file_size_limit() is not None and "File too large" in str(error)):
        limit = _file_size_limit()
        return errno.EFBIG, "file too large" + (
            f" (the file-size limit, ulimit -f, is {human_bytes(limit)})" if limit else ""
        )
    if code in CAUSES:
        return code, CAUSES[code]
    if code is not None:
        return code, (error.strerror or str(error)).lower()
    text = str(error)
    if "No space left" in text or "StorageFull" in text or (free is not None and free < max(needed or 0, NEARLY_FULL)):
        return errno.ENOSPC, CAUSES[errno.ENOSPC]
    if _file_size_limit() is not None and ("write" in text.lower() or "unexpected pos" in text):
        return errno.EFBIG, f"file too large (the file-size limit, ulimit -f, is {human_bytes(_file_size_limit())})"
    return None


def write_failure(
    error: BaseException, path: str | Path, needed: int | None = None, kept: str = ""
) -> WriteFailed | None:
    """The one-line WriteFailed for an error raised while writing path (None: not a failure of the write itself,
    e.g. a bug, which should propagate as it is). needed: bytes the write needs, where known; kept: what is safe."""
    if isinstance(error, WriteFailed):
        return error
    if not isinstance(error, (OSError, RuntimeError)) and "Safetensor" not in type(error).__name__:
        return None
    free = free_bytes(path)
    cause = _cause(error, free, needed)
    if cause is None:
        return None
    code, what = cause
    sizes = [f"{human_bytes(needed)} needed" if needed else "", f"{human_bytes(free)} free" if free is not None else ""]
    sizes = ", ".join(s for s in sizes if s)
    message = f"{what}: cannot write {path}" + (f" ({sizes})" if sizes else "") + (f"; {kept}" if kept else "")
    return WriteFailed(code, message)


@contextmanager
def writing(path: str | Path, needed: int | None = None, kept: str = ""):
    """Around a write of path: a failure of the write (full disk, quota, file-size limit, read-only) leaves as one
    WriteFailed line; any other error passes unchanged."""
    try:
        yield
    except Exception as e:
        failure = write_failure(e, path, needed, kept)
        if failure is None or failure is e:
            raise
        raise failure from e


# --- one writer per run directory -------------------------------------------------------------------

LOCK_FILE = "run.lock"


class RunDirBusy(ValueError):
    """Another live process holds the run directory's lock."""


def _describe(holder: dict) -> str:
    started = holder.get("started")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {since} ({holder.get('command', '?')})"


class RunLock:
    """One writer per run directory: an exclusive, non-blocking flock on run_dir/run.lock for the run's life, its
    holder (host, pid, start time, command) written in the file and cleared on release.

    - busy (another process holds it): RunDirBusy at once, naming the holder and the ways out;
    - stale (the file names a holder but nobody holds the lock: it died, e.g. SIGKILL): taken over, with a warning;
    - a filesystem without locking (some NFS mounts: ENOLCK, EOPNOTSUPP): a warning, and the run goes on unlocked.
    enabled=False (a process other than the main one of a multi-process run) does nothing."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, way_out: str = "choose another run directory"):
        self.path = Path(run_dir) / LOCK_FILE
        self.enabled, self.way_out, self.fd, self.tried = enabled, way_out, None, False

    @classmethod
    def enclosing(cls, path: str | Path, way_out: str = "write elsewhere") -> RunLock:
        """The lock of the run directory path lies in (its nearest ancestor with a run.lock): a tool writing into a
        run directory follows the same rule as training. Disabled when path is in no run directory."""
        for parent in Path(path).absolute().parents:
            if (parent / LOCK_FILE).is_file():
                return cls(parent, way_out=way_out)
        return cls(Path(path).absolute().parent, enabled=False)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

    def acquire(self) -> RunLock:
        """Take the lock (once: again is a no-op); RunDirBusy when a live process holds it."""
        if not self.enabled or self.tried:
            return self
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self._read(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirBusy(
                    f"{self.path.parent} is in use by {_describe(holder)}: wait for it to finish, or {self.way_out}"
                ) from None
            warnings.warn(
                f"cannot lock {self.path} ({e.strerror or e}: a filesystem without locking?); going on without the "
                "one-writer check: do not start this run twice",
                stacklevel=2,
            )
            self.tried = True
            return self
        self.fd, self.tried = fd, True
        stale = self._read(fd)
        if stale:
            warnings.warn(
                f"{self.path}: taking over the lock of {_describe(stale)}, which no longer holds it (the process "
                "died without releasing it)",
                stacklevel=2,
            )
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        return self

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            return json.loads(text) if text else {}
        except (OSError, ValueError):
            return {"command": "unreadable holder record"}

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)  # released cleanly: no holder (the file stays: unlinking races with openers)
            except OSError:
                pass
            os.close(self.fd)  # closing releases the flock
            self.fd = None
        self.tried = False

    def holder(self) -> dict:
        """The recorded holder of the lock file (empty: none)."""
        try:
            text = self.path.read_text().strip()
            return json.loads(text) if text else {}
        except (OSError, ValueError):
            return {}
