"""A domain metric for Fashion-MNIST, where Inception features say little about 28x28 grey clothes:
a small CNN trained on the train split, whose 128-d penultimate features give a Frechet distance and
whose predictions give class consistency (share of class-k samples it calls k).

Like Inception FID, which everyone computes with one weights file of known hash, the classifier is
shipped: ``dit/eval/weights/fashion_mnist_cnn_v1.safetensors``, checked against WEIGHTS_SHA256 on
every load. Nothing is trained or cached on first use, so every machine, thread count and run measures
with the same function. The extractor's name carries the weights' hash, so statistics computed with one
classifier are refused against another's (``dit.eval.stats.fid``).

How the shipped file was made (1 thread: the training is deterministic for a fixed thread count, not
across thread counts)::

    python -m dit.eval train-domain-classifier -o my_classifier.safetensors --threads 1

A file written that way is used only when pointed to (``--domain-classifier`` of ``python -m
dit.eval``, ``training.domain_classifier``); its figures carry its own hash.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save

from dit.atomic import atomic_file
from dit.data import FashionMNIST
from dit.integrity import DamagedFileError, load_safetensors, load_state_dict_checked, sha256_of, shipped_weights

WEIGHTS = Path(__file__).resolve().parent / "weights" / "fashion_mnist_cnn_v1.safetensors"
WEIGHTS_SHA256 = "20767b53ac9927732fa06df7b83890ac9a80a32cf3e98564cb63a68a4a28c58a"
EPOCHS, BATCH, SEED, THREADS = 2, 128, 0, 1  # the recipe of the shipped weights (THREADS: torch intra-op threads)


def extractor_name(sha256: str) -> str:
    """The feature space of a classifier file: architecture, layer, and the weights' hash (12 hex digits)."""
    return f"fashion-mnist-cnn-v1@{sha256[:12]}/fc1-128"


EXTRACTOR = extractor_name(WEIGHTS_SHA256)  # the shipped classifier's


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


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train_classifier(root: str | None = None, threads: int = THREADS, log=_stderr) -> tuple[FashionCNN, float]:
    """Train on the train split with a fixed seed, order, epoch count and thread count; returns (model,
    test accuracy). Progress goes to ``log`` (stderr by default), never to stdout."""
    kw = {"root": root} if root else {}
    train, test = FashionMNIST(split="train", **kw), FashionMNIST(split="test", **kw)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
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
    finally:
        torch.set_num_threads(previous)
    return model, (pred == test.labels).float().mean().item()


def save_classifier(model: FashionCNN, test_accuracy: float, path: str | Path, threads: int = THREADS) -> str:
    """Write the weights (atomically) with how they were made in the safetensors metadata; returns the SHA-256."""
    metadata = {
        "torch": torch.__version__,
        "test_accuracy": repr(float(test_accuracy)),
        "recipe": f"adam lr 1e-3, {EPOCHS} epochs, batch {BATCH}, seed {SEED}, {threads} thread(s)",
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    data = metadata_in_order(save(state, metadata=metadata), list(metadata))
    atomic_file(path, lambda tmp: Path(tmp).write_bytes(data), suffix=".safetensors")
    return sha256_of(path)


def metadata_in_order(data: bytes, order: list[str]) -> bytes:
    """The safetensors bytes with the header's metadata in ``order``. safetensors writes it from a hash map, in an
    order that changes from process to process, so the same weights would otherwise give files (and hashes)
    that differ; the tensors' entries are already sorted, and the header keeps its length."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__")
    ordered = {"__metadata__": {k: meta[k] for k in order}, **header}
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    assert len(text) <= n, "the reordered header is longer than safetensors' own"
    return data[:8] + text.ljust(n) + data[8 + n :]


def load_classifier(path: str | Path | None = None) -> tuple[FashionCNN, float, str]:
    """(model in eval mode, its test accuracy, the file's SHA-256). path None: the shipped weights, whose
    hash must be WEIGHTS_SHA256; another file is taken as it is (its hash names its feature space)."""
    path, digest, metadata = shipped_weights(path, WEIGHTS, WEIGHTS_SHA256, "domain classifier")
    model = FashionCNN()
    load_state_dict_checked(model, load_safetensors(path), path)
    try:
        accuracy = float(metadata["test_accuracy"])
    except (KeyError, ValueError):
        raise DamagedFileError(path, "no test_accuracy in its metadata (write it with save_classifier)") from None
    return model.eval(), accuracy, digest


class FashionFeatures(nn.Module):
    """uint8 (N, C, H, W) -> (features (N, 128), logits (N, 10)), like InceptionFeatures.

    weights: a classifier file (None: the shipped one). ``name`` names the feature space, hash included."""

    dims = 128

    def __init__(self, weights: str | Path | None = None):
        super().__init__()
        self.net, self.test_accuracy, self.sha256 = load_classifier(weights)
        self.name = extractor_name(self.sha256)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = self.net(to_model_input(images).to(next(self.net.parameters()).device))
        return features.double(), logits.double()
