"""Class-conditional image generation: labels, batched sampling, VAE decoding, grids and files.

Seeding is per batch of the global image list (batch b uses seed (seed, b)), so the same seed gives
the same images whatever the number of processes.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from dit.atomic import atomic_file
from dit.diffusion import Sampler

__all__ = ["resolve_classes", "make_labels", "generate", "decode", "to_uint8", "save_grid", "save_npz_atomic"]


def resolve_classes(
    spec: Sequence[int | str] | int | str | None, class_names: list[str] | None, num_classes: int
) -> list[int]:
    """Class ids from ids and/or names (case-insensitive); None = every class."""
    if spec is None:
        return list(range(num_classes))
    if isinstance(spec, (int, str)):
        spec = [spec]
    lookup = {n.lower(): i for i, n in enumerate(class_names or [])}
    ids = []
    for item in spec:
        if isinstance(item, int) or (isinstance(item, str) and item.strip().lstrip("-").isdigit()):
            i = int(item)
            if not 0 <= i < num_classes:
                raise ValueError(f"class id {i} outside [0, {num_classes - 1}]")
            ids.append(i)
        elif item.strip().lower() in lookup:
            ids.append(lookup[item.strip().lower()])
        else:
            close = difflib.get_close_matches(item.lower(), list(lookup), n=5, cutoff=0.5)
            hint = f"; close names: {', '.join(repr(class_names[lookup[c]]) for c in close)}" if close else ""
            known = "" if class_names else " (this model has no class names: use ids)"
            raise ValueError(f"unknown class name {item!r}{hint}{known}")
    return ids


def make_labels(classes: list[int], per_class: int | None, num_images: int | None, seed: int) -> torch.Tensor:
    """per_class of each class in order (a grid), or num_images labels cycling through the classes,
    drawn uniformly at random (seeded) when every class is asked for (FID)."""
    if num_images is None:
        return torch.tensor([c for c in classes for _ in range(per_class)], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    return torch.tensor(classes, dtype=torch.long)[torch.randint(len(classes), (num_images,), generator=g)]


@torch.no_grad()
def decode(x: torch.Tensor, vae=None) -> torch.Tensor:
    """Latents -> images in [-1, 1] through the VAE (scaling factor from its config); pixels pass through."""
    if vae is None:
        return x
    scale = getattr(vae.config, "scaling_factor", 0.18215)
    return vae.decode((x / scale).to(vae.dtype)).sample.float()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, as the DiT sampler rounds them."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def generate(
    model: torch.nn.Module,
    sampler: Sampler,
    labels: torch.Tensor,
    *,
    batch_size: int,
    seed: int,
    vae=None,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first global index, uint8 NHWC images) for this rank's batches: b = rank, rank + world, ...

    sampler: from dit.diffusion.build_sampler (the model's objective + the sampling settings)."""
    if not isinstance(sampler, Sampler):
        raise TypeError(
            "generate() takes a sampler (dit.diffusion.build_sampler(objective, SamplingSettings(...))), "
            f"not {type(sampler).__name__}"
        )
    sampler.check_model(model)
    C, S = model.in_channels, model.input_size
    for b in range(rank, (len(labels) + batch_size - 1) // batch_size, world_size):
        y = labels[b * batch_size : (b + 1) * batch_size].to(device)
        g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + b)
        noise = torch.randn(len(y), C, S, S, generator=g, device=device)
        x = sampler.sample(model, noise, y, generator=g)
        yield b * batch_size, to_uint8(decode(x, vae))


def save_grid(images: torch.Tensor, nrow: int, path: str | Path) -> None:
    """uint8 NHWC images -> one PNG grid with nrow images per row (atomic write)."""
    grid = make_grid(images.permute(0, 3, 1, 2), nrow=nrow, padding=2, pad_value=255)  # (3, H', W') uint8
    atomic_file(path, Image.fromarray(grid.permute(1, 2, 0).numpy()).save, suffix=".png")


def save_npz_atomic(path: str | Path, images: np.ndarray, labels: np.ndarray) -> None:
    """ADM-format npz (arr_0 uint8 NHWC, arr_1 labels), written to a temporary file then renamed."""
    atomic_file(path, lambda tmp: np.savez(tmp, arr_0=images, arr_1=labels), suffix=".npz")
