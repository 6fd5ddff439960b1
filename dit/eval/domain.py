"""A domain metric for Fashion-MNIST, where Inception features say little about 28x28 grey clothes:
a small CNN trained once on the train split (seeded, cached), whose 128-d penultimate features give a
Frechet distance, and whose predictions give class consistency (share of class-k samples it calls k).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from dit.atomic import atomic_file
from dit.integrity import DamagedFileError, load_safetensors, read_json
from dit.models.state_dict import load_state_dict_checked

EXTRACTOR = "fashion-mnist-cnn-v1/fc1-128"
EPOCHS, BATCH, SEED = 2, 128, 0


class FashionCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 8 * 8, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, 1, 32, 32) in [-1, 1] -> (features (N, 128), logits (N, 10))."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        features = F.relu(self.fc1(x.flatten(1)))
        return features, self.fc2(features)


def cache_dir() -> Path:
    return Path(os.environ.get("DIT_CACHE", Path.home() / ".cache" / "dit"))


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W), C in {1, 3}, H = W in {28, 32} -> (N, 1, 32, 32) float in [-1, 1]."""
    x = images.float()
    if x.shape[1] == 3:
        x = x.mean(1, keepdim=True)
    x = x / 127.5 - 1
    if x.shape[-1] == 28:
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)
    if x.shape[-2:] != (32, 32):
        raise ValueError(f"the Fashion-MNIST metric takes 28x28 or 32x32 images, got {tuple(images.shape[-2:])}")
    return x


def train_classifier(root: str | None = None, log=print) -> tuple[FashionCNN, float]:
    """Train on the train split (deterministic: fixed seed, order and epochs); returns (model, test accuracy)."""
    from dit.data import FashionMNIST

    kw = {"root": root} if root else {}
    train, test = FashionMNIST(split="train", **kw), FashionMNIST(split="test", **kw)
    g = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    model = FashionCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(EPOCHS):
        perm = torch.randperm(len(train), generator=g)
        for i in range(0, len(perm), BATCH):
            idx = perm[i : i + BATCH]
            loss = F.cross_entropy(model(train.images[idx])[1], train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        log(f"fashion-mnist classifier: epoch {epoch + 1}/{EPOCHS}, last loss {loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(test.images[i : i + 1000])[1].argmax(1) for i in range(0, len(test), 1000)])
    return model, (pred == test.labels).float().mean().item()


def load_classifier(root: str | None = None, log=print) -> tuple[FashionCNN, float]:
    """The cached classifier (trained on first use, ~1 min on 2 CPU cores) and its test accuracy.
    A damaged cache is only a cache: it is retrained (and rewritten) with a warning."""
    weights, info = cache_dir() / "fashion_mnist_cnn_v1.safetensors", cache_dir() / "fashion_mnist_cnn_v1.json"
    if weights.exists() and info.exists():
        try:
            model = FashionCNN()
            load_state_dict_checked(model, load_safetensors(weights), weights)
            accuracy = read_json(info)
            if not isinstance(accuracy, dict) or not isinstance(accuracy.get("test_accuracy"), float):
                raise DamagedFileError(info, "no test_accuracy in it")
            return model.eval(), accuracy["test_accuracy"]
        except (DamagedFileError, ValueError) as e:
            warnings.warn(f"the cached Fashion-MNIST classifier cannot be used ({e}); training it again", stacklevel=2)
    log(f"training the Fashion-MNIST feature classifier once (cached in {cache_dir()})")
    model, accuracy = train_classifier(root, log)
    # The weights first, the info file last: both present means both complete (each written atomically).
    atomic_file(weights, lambda tmp: save_file(model.state_dict(), tmp), suffix=".safetensors")
    info_text = json.dumps({"test_accuracy": accuracy, "epochs": EPOCHS, "seed": SEED})
    atomic_file(info, lambda tmp: Path(tmp).write_text(info_text), suffix=".json")
    return model, accuracy


class FashionFeatures(nn.Module):
    """uint8 (N, C, H, W) -> (features (N, 128), logits (N, 10)), like InceptionFeatures."""

    name = EXTRACTOR
    dims = 128

    def __init__(self, root: str | None = None):
        super().__init__()
        self.net, self.test_accuracy = load_classifier(root)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = self.net(to_model_input(images).to(next(self.net.parameters()).device))
        return features.double(), logits.double()
