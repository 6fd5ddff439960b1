"""Datasets (Fashion-MNIST, image folders, pre-extracted latents) and the resumable batch sampler.

Every dataset has num_classes, class_names, channels, input_size (what the model sees), latent, and
batch_transform(x, rng): per-batch augmentation drawn from the training step's SlicedRandom.
A dataset whose model input is not the image (latents) may give the images too, augmented alike:
batch_transform_with_images(x, rng) -> (input, images or None); see with_images.
"""

import torch

from dit.data.fashion_mnist import FashionMNIST
from dit.data.image_folder import ImageFolder
from dit.data.latents import LatentShards
from dit.data.sampler import GlobalBatchSampler

__all__ = ["FashionMNIST", "GlobalBatchSampler", "ImageFolder", "LatentShards"]


class Subset:
    """The first n samples of a dataset, keeping its attributes (num_classes, batch_transform, ...)."""

    def __init__(self, dataset, n: int):
        self.dataset, self.n = dataset, min(n, len(dataset))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.dataset[i]

    def __getattr__(self, name):
        if name == "dataset":  # not set yet (unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


__all__.append("Subset")


def to_device(x, device: torch.device):
    """A batch's inputs (a tensor, or a dict of them: latents with their pixels) on ``device``."""
    if isinstance(x, dict):
        return {k: v.to(device, non_blocking=True) for k, v in x.items()}
    return x.to(device, non_blocking=True)


def with_images(dataset, x, rng) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model input of a batch and the clean images in [-1, 1] it shows (None where the dataset has none: latents
    extracted without --pixels), both from one augmentation draw."""
    if hasattr(dataset, "batch_transform_with_images"):
        return dataset.batch_transform_with_images(x, rng)
    x = dataset.batch_transform(x, rng)
    return x, (None if dataset.latent else x)


def has_images(dataset) -> bool:
    """Whether training can see the images (pixel datasets; latents extracted with --pixels)."""
    return not dataset.latent or bool(getattr(dataset, "pixels", None))


__all__ += ["has_images", "to_device", "with_images"]
