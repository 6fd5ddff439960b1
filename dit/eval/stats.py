"""Image sources (PNG folders, ADM npz, our datasets), feature statistics, and their npz files."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from PIL import Image
from tqdm import tqdm

from dit.atomic import atomic_file
from dit.data.fashion_mnist import FILES, ROOT, read_idx
from dit.eval.frechet import frechet_distance
from dit.integrity import DamagedFileError, load_npz, npz_keys

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


class ImageSource:
    """N images as uint8 (n, 3, H, W) batches (grey repeated to RGB), with labels when known."""

    def __init__(self, spec: str):
        self.spec, self.labels, self.files, self.array = spec, None, None, None
        path = Path(spec)
        name, _, split = spec.partition(":")
        if name == "fashion_mnist" and not path.exists():
            root = Path(ROOT)
            images_file, labels_file = (root / f for f in FILES[split or "train"])
            self.array = read_idx(images_file)[..., None]  # (N, 28, 28, 1)
            self.labels = read_idx(labels_file).astype(np.int64)
        elif path.suffix == ".npz":
            if not path.exists():
                raise FileNotFoundError(f"no such npz: {path}")
            keys = npz_keys(path)
            if "arr_0" not in keys:
                raise ValueError(f"{path}: no images (arr_0); keys: {', '.join(keys)}")
            found = load_npz(path, ["arr_0", "arr_1"])
            arr, self.labels = found["arr_0"], found.get("arr_1")
            if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
                raise ValueError(f"{path}: arr_0 must be uint8 (N, H, W, 1 or 3) images, got {arr.dtype} {arr.shape}")
            self.array = arr
        elif path.is_dir():
            self.files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not self.files:
                raise ValueError(f"{path}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        else:
            raise FileNotFoundError(f"not an image folder, npz or dataset name: {spec}")

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else len(self.array)

    def batch(self, start: int, stop: int) -> torch.Tensor:
        if self.files is not None:
            arr = np.stack([_read_image(f) for f in self.files[start:stop]])
        else:
            arr = self.array[start:stop]
        x = torch.from_numpy(np.array(arr, copy=True)).permute(0, 3, 1, 2)  # a writable copy
        return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


@dataclass
class Stats:
    mu: np.ndarray
    sigma: np.ndarray
    count: int
    extractor: str

    def save(self, path: str | Path) -> None:
        atomic_file(
            path,
            lambda tmp: np.savez(tmp, mu=self.mu, sigma=self.sigma, count=self.count, extractor=self.extractor),
            suffix=".npz",
        )

    @staticmethod
    def load(path: str | Path, default_extractor: str) -> Stats:
        """Our files carry their extractor; ADM reference files (mu, sigma only) are Inception pool3."""
        f = load_npz(path)
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path}: no mu/sigma statistics")
        mu, sigma = f["mu"], f["sigma"]
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise DamagedFileError(
                path, f"mu {mu.shape} and sigma {sigma.shape} are not a (D,) mean and (D, D) covariance"
            )
        extractor = str(f["extractor"]) if "extractor" in f else default_extractor
        count = int(f["count"]) if "count" in f else -1
        return Stats(mu.astype(np.float64), sigma.astype(np.float64), count, extractor)


def is_stats_file(spec: str) -> bool:
    """A statistics npz (mu, sigma) rather than images; a damaged npz raises DamagedFileError."""
    if not str(spec).endswith(".npz") or not Path(spec).exists():
        return False
    keys = npz_keys(spec)
    return "mu" in keys and "sigma" in keys


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:  # PIL: truncated or not an image
        raise DamagedFileError(path, f"unreadable image ({type(e).__name__}: {e})") from None


def extract_features(source: ImageSource, extractor, batch_size: int = 100, device="cpu", progress: bool = True):
    """(features (N, D), logits (N, K)) of every image, in order. Several processes (accelerate /
    torchrun) split the batches and every process gets the whole result."""
    state = PartialState()
    starts = list(range(0, len(source), batch_size))[state.process_index :: state.num_processes]
    feats = []
    for start in tqdm(
        starts,
        desc=f"features ({extractor.name.split('/')[0]})",
        unit="batch",
        disable=not (progress and state.is_main_process),
    ):
        f, lg = extractor(source.batch(start, start + batch_size).to(device))
        feats.append((start, f.cpu().numpy(), lg.cpu().numpy()))
    if state.num_processes > 1:
        feats = gather_object(feats)
    feats.sort(key=lambda item: item[0])
    return np.concatenate([f for _, f, _ in feats]), np.concatenate([lg for _, _, lg in feats])


def stats_from_features(features: np.ndarray, extractor_name: str) -> Stats:
    n, d = features.shape
    if n <= d:
        warnings.warn(
            f"FID from {n} samples of {d}-dim features is unreliable: the covariance is singular. "
            f"Use more than {d} samples (the standard is 50,000 for Inception FID).",
            stacklevel=2,
        )
    return Stats(features.mean(0), np.cov(features, rowvar=False), n, extractor_name)


def fid(a: Stats, b: Stats) -> float:
    if a.extractor != b.extractor:
        raise ValueError(f"the statistics come from different feature extractors: {a.extractor} vs {b.extractor}")
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
