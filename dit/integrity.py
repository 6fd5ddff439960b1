"""Reading files that may be damaged (truncated by a crash or a full disk, overwritten, empty).

Every reader of our files goes through these, so a damaged file ends in one line that names it and
says what is wrong (DamagedFileError, a ValueError: the entry points print it and exit 1) instead of
a library's traceback. The checks read headers and sizes, not every byte: a truncated, empty or
foreign file is caught; flipped bits inside tensor data are not (no format here has checksums,
except zip members, whose CRC is checked when they are read). Weights read into a model are loaded strictly, with
an error naming the file and every mismatched key or shape (load_state_dict_checked).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

__all__ = [
    "ZIP_SUFFIXES",
    "DamagedFileError",
    "header_problem",
    "load_state_dict_checked",
    "load_npz",
    "load_safetensors",
    "npz_keys",
    "read_json",
    "safetensors_problem",
    "zip_problem",
]


class DamagedFileError(ValueError):
    """A file exists but cannot be read: `path` names it, `problem` says what is wrong."""

    def __init__(self, path: str | Path, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path} is damaged: {problem}")


def _size_problem(path: Path) -> str | None:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing")
    return "empty file (0 bytes)" if path.stat().st_size == 0 else None


def read_json(path: str | Path):
    """The parsed contents of a JSON file."""
    path = Path(path)
    if problem := _size_problem(path):
        raise DamagedFileError(path, problem)
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedFileError(path, f"not valid JSON ({e})") from None


def safetensors_problem(path: str | Path) -> str | None:
    """What is wrong with a safetensors file, from its header and size alone (None: it looks whole): safe_open reads
    the header and checks that its tensors cover the file exactly; its reason is said here in our words."""
    path = Path(path)
    if problem := _size_problem(path):
        return problem
    try:
        with safe_open(str(path), "pt"):
            return None
    except SafetensorError as e:  # its text says what it found
        reason = str(e).removeprefix("Error while deserializing header: ")
    size = path.stat().st_size
    if "header too small" in reason:
        return f"truncated ({size} bytes, less than the 8-byte header length)"
    if "invalid header length" in reason:
        return f"truncated or not a safetensors file ({size} bytes, fewer than its header's length says)"
    if "not fully covered" in reason:
        return f"truncated, or longer than its header describes ({size} bytes; safetensors: {reason})"
    return f"not a safetensors file (unreadable header; safetensors: {reason})"


def load_safetensors(path: str | Path) -> dict:
    """All tensors of a safetensors file, on the CPU."""
    from safetensors.torch import load_file

    path = Path(path)
    if problem := safetensors_problem(path):
        raise DamagedFileError(path, problem)
    try:
        return load_file(path)
    except Exception as e:  # SafetensorError and friends: the header looked whole but the contents do not load
        raise DamagedFileError(path, f"unreadable safetensors ({type(e).__name__}: {e})") from None


def zip_problem(path: str | Path) -> str | None:
    """What is wrong with a zip archive (torch.save files are zips), from its directory (None: it looks whole)."""
    path = Path(path)
    if problem := _size_problem(path):
        return problem
    try:
        with zipfile.ZipFile(path) as z:
            z.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"not a complete zip archive ({e})"
    return None


_NPZ_ERRORS = (zipfile.BadZipFile, EOFError, ValueError, OSError, zlib.error, KeyError)


def npz_keys(path: str | Path) -> list[str]:
    """The array names in an npz archive (reads only its directory)."""
    path = Path(path)
    if problem := _size_problem(path):
        raise DamagedFileError(path, problem)
    try:
        with np.load(path, allow_pickle=False) as f:
            if not isinstance(f, np.lib.npyio.NpzFile):
                raise DamagedFileError(path, "not an npz archive (a single .npy array)")
            return list(f.files)
    except TypeError:  # np.load returned a plain array, which is no context manager
        raise DamagedFileError(path, "not an npz archive (a single .npy array)") from None
    except _NPZ_ERRORS as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DamagedFileError(path, f"not a readable npz archive ({type(e).__name__}: {e})") from None


def load_npz(path: str | Path, keys: list[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an npz archive (all, or those of `keys` it holds), read completely (zip CRCs checked)."""
    path = Path(path)
    present = npz_keys(path)
    wanted = present if keys is None else [k for k in keys if k in present]
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in wanted}
    except _NPZ_ERRORS as e:
        raise DamagedFileError(path, f"not a readable npz archive ({type(e).__name__}: {e})") from None


def sha256_of(path: str | Path) -> str:
    """The file's SHA-256, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shipped_weights(path: str | Path | None, shipped: Path, sha256: str, what: str) -> tuple[Path, str, dict]:
    """A weights file shipped with the code (path None: ``shipped``, whose SHA-256 must be ``sha256``) or another
    one, taken as it is: (its path, its SHA-256, its safetensors metadata). A missing file, or a changed shipped
    one, is one clear error naming it (``what``: "domain classifier", "teacher"...)."""
    path = shipped if path is None else Path(path)
    is_shipped = path == shipped
    restore = f"restore it with `git checkout -- {shipped.parent.relative_to(shipped.parents[3])}`"
    if not path.is_file():
        hint = f" (the shipped {what}: {restore})" if is_shipped else ""
        raise FileNotFoundError(f"{what} weights not found: {path}{hint}")
    digest = sha256_of(path)
    if is_shipped and digest != sha256:
        raise DamagedFileError(
            path,
            f"SHA-256 {digest}, expected {sha256}: the shipped {what} was changed "
            f"({restore}; a new {what} is a new file, passed explicitly)",
        )
    if problem := safetensors_problem(path):
        raise DamagedFileError(path, problem)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    return path, digest, metadata


ZIP_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")  # torch.save files (zip archives)


def header_problem(path: str | Path) -> str | None:
    """What is wrong with a file of ours, by its kind (JSON, safetensors, a torch zip archive; others are not read),
    from its header and size alone (None: it looks whole)."""
    path = Path(path)
    if path.suffix == ".json":
        read_json(path)  # raises DamagedFileError
    elif path.suffix == ".safetensors":
        return safetensors_problem(path)
    elif path.suffix in ZIP_SUFFIXES:
        return zip_problem(path)
    return None


def load_state_dict_checked(model: torch.nn.Module, state_dict: dict, source: str | Path) -> None:
    """load_state_dict(strict=True), with an error that names the file and every mismatched key/shape."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:

        def show(items):
            return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")

        lines = [f"checkpoint {source} does not fit the model config:"]
        if shapes:
            lines.append(f"  shape mismatches: {show(shapes)}")
        if missing:
            lines.append(f"  missing keys: {show(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {show(unexpected)}")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)
