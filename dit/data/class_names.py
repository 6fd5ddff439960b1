"""Class-name lists of the datasets we know (no download: torchvision ships the ImageNet names)."""

from __future__ import annotations

__all__ = ["FASHION_MNIST_CLASSES", "imagenet_class_names"]

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names (shipped inside torchvision, no download)."""
    # torchvision.models loads every model definition (over a second); only ImageNet-class exports ask for names
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
