"""Your own images: one sub-folder per class, ADM centre crop to the resolution, random flips."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop: box-downsample while the short side >= 2x, bicubic to the size, crop the centre."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def scan(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted sub-folders) and (file, label) pairs; clear errors for missing/empty roots."""
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (expected {root}/<class>/<image>)")
    items = [
        (f, label)
        for label, c in enumerate(classes)
        for f in sorted((root / c).rglob("*"))
        if f.suffix.lower() in EXTENSIONS
    ]
    if not items:
        raise ValueError(f"{root}: no images ({', '.join(sorted(EXTENSIONS))}) in its {len(classes)} class folders")
    return classes, items


class ImageFolder(Dataset):
    """RGB images in [-1, 1] (3, S, S). verify=True opens every file once before training and either
    fails naming the bad files or (skip_corrupt=True) leaves them out and counts them."""

    channels = 3
    latent = False

    def __init__(
        self, root: str, image_size: int = 256, hflip: bool = True, verify: bool = True, skip_corrupt: bool = False
    ):
        self.root = Path(root)
        self.class_names, self.items = scan(self.root)
        self.num_classes = len(self.class_names)
        self.image_size = self.input_size = image_size
        self.hflip = hflip
        self.skipped: list[Path] = []
        if verify:
            bad = []
            for path, _ in self.items:
                try:
                    with Image.open(path) as im:
                        im.convert("RGB").load()
                except Exception as e:  # PIL raises many types for corrupt files
                    bad.append((path, f"{type(e).__name__}: {e}"))
            if bad and not skip_corrupt:
                listing = "\n".join(f"  {p}: {why}" for p, why in bad[:10])
                raise ValueError(
                    f"{len(bad)} unreadable image(s) in {self.root} (to skip them: data.dataset.skip_corrupt=true "
                    f"for train.py, --skip-corrupt for dit.data.extract):\n{listing}"
                )
            if bad:
                self.skipped = [p for p, _ in bad]
                skip = set(self.skipped)
                self.items = [it for it in self.items if it[0] not in skip]
                warnings.warn(f"skipped {len(bad)} unreadable image(s) in {self.root}, e.g. {bad[0][0]}", stacklevel=2)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        try:
            with Image.open(path) as im:
                arr = center_crop_arr(im.convert("RGB"), self.image_size)
        except Exception as e:
            raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
        x = torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1)
        return x, label

    def batch_transform(self, x: torch.Tensor, rng) -> torch.Tensor:
        """Random horizontal flip of half the images (rng: the step's SlicedRandom)."""
        if not self.hflip:
            return x
        flip = rng.rand(len(x)) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(-1), x)
