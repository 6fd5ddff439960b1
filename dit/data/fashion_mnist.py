"""Fashion-MNIST read from the idx files of Debian's dataset-fashion-mnist package."""

from __future__ import annotations

import functools
import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dit.data.class_names import FASHION_MNIST_CLASSES

# Where Debian's dataset-fashion-mnist package puts the four idx files: the default root everywhere (configs/data/
# fashion_mnist.yaml, dit.eval's fashion_mnist:<split> sources, `make setup`, the tests' skip marks).
ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (optionally gzipped) as a read-only numpy array; a clear error naming the file otherwise. Kept
    while the file is unchanged (its size and modification time): a process that builds the dataset again (a sweep's
    pool worker, the evaluator's reference) does not decompress it again."""
    try:
        stat = Path(path).stat()
    except OSError as e:
        raise ValueError(f"{path}: not a readable idx file ({e})") from None
    return _read_idx(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_idx(path: str, size: int, mtime_ns: int) -> np.ndarray:
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("bad magic number")
        shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return array.reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise ValueError(f"{path}: not a readable idx file ({e})") from None


class FashionMNIST(Dataset):
    """28x28 grey images padded (or resized) to image_size, in [-1, 1], with labels 0..9."""

    class_names = FASHION_MNIST_CLASSES
    num_classes = 10
    channels = 1
    latent = False

    def __init__(self, root: str = ROOT, split: str = "train", image_size: int = 32, resize: str = "pad"):
        root = Path(root)
        if split not in FILES:
            raise ValueError(f"unknown Fashion-MNIST split {split!r}; valid: train, test")
        images_file, labels_file = (root / name for name in FILES[split])
        for f in (images_file, labels_file):
            if not f.exists():
                raise FileNotFoundError(
                    f"Fashion-MNIST file not found: {f} "
                    "(install Debian's dataset-fashion-mnist: `make setup`, or set data.root=)"
                )
        images = torch.from_numpy(read_idx(images_file).copy())  # (N, 28, 28) uint8
        self.labels = torch.from_numpy(read_idx(labels_file).astype(np.int64))
        if len(images) != len(self.labels) or images.dim() != 3:
            raise ValueError(
                f"{images_file} and {labels_file} do not match ({tuple(images.shape)} vs {len(self.labels)} labels)"
            )
        if self.labels.min() < 0 or self.labels.max() >= self.num_classes:
            raise ValueError(f"{labels_file}: labels outside [0, {self.num_classes - 1}]")
        x = images.float().div(127.5).sub(1).unsqueeze(1)  # (N, 1, 28, 28) in [-1, 1]
        if resize == "pad":
            pad = image_size - x.shape[-1]
            if pad < 0 or pad % 2:
                raise ValueError(f"cannot pad 28x28 to {image_size}x{image_size}; use resize=bilinear")
            x = torch.nn.functional.pad(x, (pad // 2,) * 4, value=-1.0)  # black border, like the background
        elif resize == "bilinear":
            x = torch.nn.functional.interpolate(
                x, size=image_size, mode="bilinear", antialias=True, align_corners=False
            )
        else:
            raise ValueError(f"unknown resize {resize!r}; valid: pad, bilinear")
        self.images = x.contiguous()
        self.image_size = image_size
        self.input_size = image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]

    def batch_transform(self, x: torch.Tensor, rng) -> torch.Tensor:
        """No augmentation (clothes are left-right symmetric enough; keeps the default fast)."""
        return x
