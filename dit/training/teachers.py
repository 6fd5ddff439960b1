"""Frozen self-supervised teachers for REPA (representation alignment, Yu et al., ICLR 2025).

REPA aligns a DiT block's hidden tokens, through a small MLP, with a frozen encoder's patch features (DINOv2 at
ImageNet scale). No pretrained encoder of Fashion-MNIST can be downloaded here, so the teacher was trained here:
a small conv encoder trained self-supervised (SimCLR: two augmented views of each image, no labels) on the train
split. It shares nothing with the evaluator (``dit.eval.domain``'s classifier, trained with labels): not its
architecture, weights, objective or code.

Like the domain classifier it is shipped, ``dit/training/weights/fashion_mnist_ssl_v1.safetensors``, checked
against WEIGHTS_SHA256 on every load. The recipe remakes it byte for byte (1 thread: deterministic for a fixed
thread count, not across thread counts)::

    python -m dit.training.teachers train -o my_teacher.safetensors --threads 1

Labels are used only to measure the features (a k-NN probe on pooled features, written in the file's metadata).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save

from dit.atomic import atomic_file
from dit.data import FashionMNIST
from dit.eval.domain import metadata_in_order
from dit.integrity import load_safetensors, load_state_dict_checked, sha256_of, shipped_weights

WEIGHTS = Path(__file__).resolve().parent / "weights" / "fashion_mnist_ssl_v1.safetensors"
WEIGHTS_SHA256 = "89f783927102efd240d2c184a6bd81d72eac4c4f73357e13cbf33c06cb10eb26"
# The recipe of the shipped weights (THREADS: torch intra-op threads).
STEPS, BATCH, LR, TEMPERATURE, SEED, THREADS = 600, 256, 2e-3, 0.2, 0, 1
PROBE_BANK, PROBE_K = 10000, 20  # k-NN probe: the first PROBE_BANK train images as the bank, k neighbours
METADATA = ("name", "torch", "recipe", "steps", "threads", "probe", "probe_accuracy", "random_probe_accuracy")


class Encoder(nn.Module):
    """(N, 1, 32, 32) -> (N, dim, 8, 8): a stride-2 stem to 16x16, a conv, a stride-2 conv to 8x8, a conv, a 1x1."""

    def __init__(self, width: int = 32, dim: int = 128):
        super().__init__()

        def block(cin, cout, k, s, p):
            return [nn.Conv2d(cin, cout, k, s, p, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.net = nn.Sequential(
            *block(1, width, 4, 2, 1),  # 16x16
            *block(width, width, 3, 1, 1),
            *block(width, 2 * width, 3, 2, 1),  # 8x8
            *block(2 * width, 2 * width, 3, 1, 1),
            nn.Conv2d(2 * width, dim, 1),  # the patch features (no ReLU: signed, like a ViT's tokens)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FashionMNISTTeacher(nn.Module):
    """A frozen self-supervised Fashion-MNIST encoder: images -> (N, grid*grid, dim) patch features.

    weights: a teacher file (None: the shipped one, whose SHA-256 must be WEIGHTS_SHA256)."""

    name = "fashion_mnist_ssl"
    grid = 8
    dim = 128
    input_shape = (1, 32, 32)  # one image, as forward takes it

    def __init__(self, weights: str | Path | None = None):
        super().__init__()
        self.encoder, self.metadata, self.sha256 = load_encoder(weights)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: BatchNorm keeps its running statistics

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, 32, 32) float in [-1, 1] -> (N, grid*grid, dim) float32 patch features, row-major."""
        if images.dim() != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(f"the Fashion-MNIST teacher takes (N, 1, 32, 32) images, got {tuple(images.shape)}")
        with torch.autocast(images.device.type, enabled=False):  # float32 even inside the DiT's bf16 autocast
            features = self.encoder(images.float())  # (N, dim, grid, grid)
        return features.flatten(2).transpose(1, 2).contiguous()


def load_encoder(path: str | Path | None = None) -> tuple[Encoder, dict, str]:
    """(encoder in eval mode, the file's metadata, its SHA-256). path None: the shipped weights, hash checked."""
    path, digest, metadata = shipped_weights(path, WEIGHTS, WEIGHTS_SHA256, "teacher")
    encoder = Encoder()
    load_state_dict_checked(encoder, load_safetensors(path), path)
    return encoder.eval(), metadata, digest


# --- the recipe -------------------------------------------------------------------------------------------------


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One random view per image: a random resized crop (scale 0.5-1 of the area, aspect 3/4-4/3) with a small
    rotation, a horizontal flip, contrast/brightness jitter and a little noise; stays in [-1, 1]."""
    n = len(x)
    u = torch.rand(n, 7, generator=g)
    scale = (0.5 + 0.5 * u[:, 0]).sqrt()  # side length as a share of the image
    aspect = torch.exp((u[:, 1] - 0.5) * 2 * math.log(4 / 3)).sqrt()
    sx, sy = scale * aspect, scale / aspect
    tx, ty = (1 - sx).clamp(min=0) * (2 * u[:, 2] - 1), (1 - sy).clamp(min=0) * (2 * u[:, 3] - 1)
    angle = (u[:, 4] - 0.5) * (math.pi / 9)  # +-10 degrees
    flip = torch.where(u[:, 5] < 0.5, -1.0, 1.0)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack(
        [torch.stack([sx * cos * flip, -sy * sin, tx], 1), torch.stack([sx * sin * flip, sy * cos, ty], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    v = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1  # border: -1
    contrast = 0.6 + 0.8 * u[:, 6].view(n, 1, 1, 1)
    v = (v + 1) * contrast - 1
    v = v + 0.05 * torch.randn(v.shape, generator=g)
    return v.clamp(-1, 1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """SimCLR's loss: each view must pick its partner among the other 2N - 1 views."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    n = len(z1)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, target)


@torch.no_grad()
def pooled_features(encoder: nn.Module, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """(N, dim): the patch features averaged over the grid, L2-normalised."""
    encoder.eval()
    out = torch.cat([encoder(images[i : i + batch]).mean((2, 3)) for i in range(0, len(images), batch)])
    return F.normalize(out, dim=1)


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, labels: torch.Tensor, k=PROBE_K):
    """A weighted k-NN probe on cosine similarity (weights exp(sim / 0.07), as in InstDisc / DINO)."""
    sim = query @ bank.t()
    top, idx = sim.topk(k, dim=1)
    votes = torch.zeros(len(query), int(bank_labels.max()) + 1)
    votes.scatter_add_(1, bank_labels[idx], (top / 0.07).exp())
    return (votes.argmax(1) == labels).float().mean().item()


def probe(encoder: nn.Module, train, test, bank: int = PROBE_BANK, queries: int | None = None) -> float:
    """k-NN test accuracy of the pooled features: the first ``bank`` train images, the first ``queries`` test ones."""
    q = slice(0, queries)
    return knn_accuracy(
        pooled_features(encoder, train.images[:bank]),
        train.labels[:bank],
        pooled_features(encoder, test.images[q]),
        test.labels[q],
    )


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train_encoder(root: str | None = None, threads: int = THREADS, steps: int = STEPS, log=_stderr):
    """SimCLR on the train split (images only) with a fixed seed, order, step count and thread count; returns
    (encoder, probe accuracy, a random encoder's probe accuracy)."""
    kw = {"root": root} if root else {}
    train = FashionMNIST(split="train", image_size=32, resize="pad", **kw)  # as configs/data/fashion_mnist.yaml
    test = FashionMNIST(split="test", image_size=32, resize="pad", **kw)
    previous, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        g = torch.Generator().manual_seed(SEED)
        torch.manual_seed(SEED)
        encoder = Encoder()
        random_accuracy = probe(encoder, train, test)
        projector = nn.Sequential(nn.Linear(FashionMNISTTeacher.dim, 256), nn.ReLU(), nn.Linear(256, 128))
        params = [*encoder.parameters(), *projector.parameters()]
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=1e-4)
        perm, pos, start = torch.randperm(len(train), generator=g), 0, time.perf_counter()
        for step in range(steps):
            if pos + BATCH > len(perm):
                perm, pos = torch.randperm(len(train), generator=g), 0
            x = train.images[perm[pos : pos + BATCH]]  # no labels: the images only
            pos += BATCH
            for group in opt.param_groups:  # linear warmup over 5% of the steps, then cosine decay
                warm = max(1, steps // 20)
                group["lr"] = LR * min((step + 1) / warm, 0.5 * (1 + math.cos(math.pi * step / steps)))
            encoder.train()
            v1, v2 = augment(x, g), augment(x, g)
            z = projector(encoder(torch.cat([v1, v2])).mean((2, 3)))
            loss = nt_xent(*z.chunk(2))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if (step + 1) % 50 == 0 or step + 1 == steps:
                log(
                    f"fashion-mnist teacher: step {step + 1}/{steps}, loss {loss.item():.3f}, "
                    f"{time.perf_counter() - start:.0f}s"
                )
        encoder.eval()
        accuracy = probe(encoder, train, test)
    finally:
        torch.set_num_threads(previous)
        torch.use_deterministic_algorithms(deterministic)
    return encoder, accuracy, random_accuracy


def save_teacher(encoder: Encoder, accuracy: float, random_accuracy: float, path, threads: int = THREADS, steps=STEPS):
    """Write the weights (atomically) with how they were made in the metadata, in a fixed order; returns the SHA-256."""
    metadata = {
        "name": FashionMNISTTeacher.name,
        "torch": torch.__version__,
        "recipe": (
            f"SimCLR (NT-Xent, temperature {TEMPERATURE}) on two augmented views of the train split, no labels; "
            f"adamw lr {LR} (warmup+cosine) wd 1e-4, batch {BATCH}, seed {SEED}; "
            "views: random resized crop 0.5-1 + rotation 10deg + hflip + contrast + noise"
        ),
        "steps": str(steps),
        "threads": str(threads),
        "probe": f"weighted {PROBE_K}-NN, cosine, pooled features; bank: first {PROBE_BANK} train; queries: test",
        "probe_accuracy": repr(float(accuracy)),
        "random_probe_accuracy": repr(float(random_accuracy)),
    }
    assert tuple(metadata) == METADATA
    state = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
    data = metadata_in_order(save(state, metadata=metadata), list(metadata))
    atomic_file(path, lambda tmp: Path(tmp).write_bytes(data), suffix=".safetensors")
    return sha256_of(path)


def train_teacher(out: str | Path, threads: int = THREADS, steps: int = STEPS, root: str | None = None, log=_stderr):
    """The recipe: train (train_encoder) and write ``out`` (save_teacher); returns its SHA-256."""
    encoder, accuracy, random_accuracy = train_encoder(root, threads, steps, log)
    return save_teacher(encoder, accuracy, random_accuracy, out, threads, steps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dit.training.teachers", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the Fashion-MNIST teacher (the shipped file's recipe)")
    t.add_argument("-o", "--out", required=True, type=Path, help="the safetensors file to write")
    t.add_argument("--threads", type=int, default=THREADS, help="torch threads (the shipped file: %(default)s)")
    t.add_argument("--steps", type=int, default=STEPS, help="training steps (the shipped file: %(default)s)")
    t.add_argument("--root", default=None, help="Fashion-MNIST directory (default: dit.data.fashion_mnist.ROOT)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    digest = train_teacher(args.out, args.threads, args.steps, args.root)
    _, metadata, _ = load_encoder(args.out)
    print(
        f"out={args.out} sha256={digest} probe_accuracy={float(metadata['probe_accuracy']):.4f} "
        f"random_probe_accuracy={float(metadata['random_probe_accuracy']):.4f} "
        f"seconds={time.perf_counter() - start:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
