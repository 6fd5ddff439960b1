"""Datasets (Fashion-MNIST, image folders, pre-extracted latents) and the resumable batch sampler.

Every dataset has num_classes, class_names, channels, input_size (what the model sees), latent, and
batch_transform(x, rng): per-batch augmentation drawn from the training step's SlicedRandom.
"""

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
