"""Pre-extracted VAE latents (python -m dit.data.extract): both flips' posterior mean and std per image.

Training draws the flip and samples z = (mean + std * eps) * scaling_factor on the fly, so the
VAE's posterior is sampled anew each epoch, as when encoding online. Shards extracted with --pixels also
hold the images (uint8), flipped with the same draw as their latents, for an encoder that reads pixels (REPA).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from dit.integrity import DamagedFileError, read_json, safetensors_problem


def _read(path: Path, key: str) -> torch.Tensor:
    try:
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(key)
    except Exception as e:  # SafetensorError: the shard was checked whole, so a missing key or bad record
        raise DamagedFileError(path, f"cannot read {key!r} ({type(e).__name__}: {e})") from None


def _shape(path: Path, key: str) -> list[int]:
    try:
        with safe_open(path, framework="pt") as f:
            return f.get_slice(key).get_shape()
    except Exception as e:
        raise DamagedFileError(path, f"cannot read {key!r} ({type(e).__name__}: {e})") from None


class LatentShards(Dataset):
    """Reads <root>/meta.json and <root>/shard_*.safetensors (mean, std: (n, 2, C, h, w) fp16; labels; pixels:
    (n, channels, H, W) uint8 if extracted with --pixels)."""

    latent = True

    def __init__(self, root: str):
        self.root = Path(root)
        meta_file = self.root / "meta.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"{meta_file} not found: extract latents first (python -m dit.data.extract ...)")
        self.meta = read_json(meta_file)
        self.shards = sorted(self.root.glob("shard_*.safetensors"))
        if not self.shards:
            raise ValueError(f"{self.root}: meta.json but no shard_*.safetensors")
        for shard in self.shards:  # header and size: a truncated shard fails here, not mid-epoch
            if problem := safetensors_problem(shard):
                raise DamagedFileError(shard, problem)
        if not isinstance(self.meta, dict):
            raise DamagedFileError(meta_file, f"a JSON {type(self.meta).__name__}, not an object")
        missing = [k for k in ("count", "num_classes", "image_size", "vae", "scaling_factor") if k not in self.meta]
        if missing:
            raise DamagedFileError(meta_file, f"no {', '.join(missing)} in it")
        # Labels are small: read them all (for checks); means and stds are read lazily per item.
        self.labels = torch.cat([_read(s, "labels") for s in self.shards]).long()
        sizes = [_shape(s, "labels")[0] for s in self.shards]
        self.offsets = torch.tensor([0] + sizes).cumsum(0)
        if len(self.labels) != self.meta["count"]:
            raise ValueError(
                f"{self.root}: meta.json says {self.meta['count']} latents, shards hold {len(self.labels)}"
            )
        self._handles: dict = {}
        self.num_classes = self.meta["num_classes"]
        if self.labels.min() < 0 or self.labels.max() >= self.num_classes:
            raise ValueError(f"{self.root}: labels outside [0, {self.num_classes - 1}]")
        self.class_names = self.meta.get("class_names")
        _, _, self.channels, _, self.input_size = _shape(self.shards[0], "mean")
        self.image_size = self.meta["image_size"]
        self.vae = self.meta["vae"]
        self.scaling_factor = self.meta["scaling_factor"]
        self.pixels = self.meta.get("pixels")  # the stored images' size, or None
        for shard in self.shards if self.pixels else ():
            if _shape(shard, "pixels")[0] != _shape(shard, "labels")[0]:
                raise DamagedFileError(shard, "its pixels and labels differ in number")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        shard = int(torch.searchsorted(self.offsets, i, right=True)) - 1
        j = i - int(self.offsets[shard])
        if shard not in self._handles:  # one memory-mapped handle per shard and process
            self._handles[shard] = safe_open(self.shards[shard], framework="pt")
        f = self._handles[shard]
        mean, std = f.get_slice("mean")[j : j + 1][0], f.get_slice("std")[j : j + 1][0]
        stats = torch.stack([mean, std]).float()  # (2 [mean, std], 2 [flips], C, h, w)
        if self.pixels:
            return {"stats": stats, "pixels": f.get_slice("pixels")[j : j + 1][0]}, self.labels[i]
        return stats, self.labels[i]

    def batch_transform(self, x, rng) -> torch.Tensor:
        """(N, 2, 2, C, h, w) -> (N, C, h, w): pick a flip, sample the posterior, scale."""
        return self.batch_transform_with_images(x, rng)[0]

    def batch_transform_with_images(self, x, rng) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The latents (as batch_transform) and, with stored pixels, the images in [-1, 1] flipped as their latents."""
        stats, pixels = (x["stats"], x["pixels"]) if isinstance(x, dict) else (x, None)
        n = len(stats)
        flip = (rng.rand(n) < 0.5).long()
        picked = stats[torch.arange(n, device=stats.device), :, flip]  # (N, 2, C, h, w)
        mean, std = picked[:, 0], picked[:, 1]
        latents = (mean + std * rng.randn(mean.shape)) * self.scaling_factor
        if pixels is None:
            return latents, None
        images = pixels.float() / 127.5 - 1
        return latents, torch.where(flip.bool()[:, None, None, None], images.flip(-1), images)
