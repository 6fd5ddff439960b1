"""Embedding layers: image patches, timesteps, class labels, fixed 2-D position (DiT paper, section 3.2)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from timm.layers import PatchEmbed

__all__ = ["GuidanceEmbedder", "LabelEmbedder", "PatchEmbed", "TimestepEmbedder", "sincos_pos_embed_2d"]


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) as [sin(pos * w), cos(pos * w)], w = 1 / 10000^(i / (dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Frozen ViT/MAE 2-D sin-cos position embedding, (grid_size**2, dim), float64.

    Token k = row * grid_size + col; the first dim/2 channels encode the column, the last dim/2 the
    row (the layout of the MAE code the released DiT checkpoints were trained with).
    """
    if dim % 4:
        raise ValueError(f"hidden_size must be a multiple of 4 for the 2-D sin-cos embedding, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([_sincos_1d(dim // 2, cols.flatten()), _sincos_1d(dim // 2, rows.flatten())], dim=1)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> (N, hidden_size): 256-d sinusoidal frequencies, then Linear-SiLU-Linear.

    freq_shift=0 is the GLIDE/ADM/DiT embedding (frequencies 10000^(-i/half)); diffusers'
    DiTTransformer2DModel uses freq_shift=1 (10000^(-i/(half-1))). Converted models carry the shift
    of the code they came from, so outputs stay identical.
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: int = 0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000, freq_shift: int = 0) -> torch.Tensor:
        """(N,) possibly fractional timesteps -> (N, dim) as [cos(t * f), sin(t * f)]."""
        half = dim // 2
        # Same fp32 operation order as the official code and diffusers, so converted models match bit for bit; float64
        # timesteps stay float64 (derivatives through t checked against finite differences need it).
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        exponent = -math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / (half - freq_shift)
        freqs = torch.exp(exponent)
        args = t[:, None].to(dtype) * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class GuidanceEmbedder(nn.Module):
    """The guidance a few-step model is asked for, (N, 3) = (scale, lo, hi): the classifier-free guidance scale and
    the noise levels [lo, hi] it applies in (improved MeanFlow's guidance conditions, Geng et al. 2025b, Sec. 4.2) ->
    (N, hidden_size): each value's 256-d sinusoidal frequencies (as a timestep's), concatenated, then
    Linear-SiLU-Linear. Unguided is (1, 0, 1)."""

    UNGUIDED = (1.0, 0.0, 1.0)

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(3 * frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        freqs = [TimestepEmbedder.timestep_embedding(g[:, i], self.frequency_embedding_size) for i in range(3)]
        return self.mlp(torch.cat(freqs, dim=1).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> (N, hidden_size), with label dropout for classifier-free guidance.

    With dropout_prob > 0 the table has one extra row, index num_classes: the learned null class
    that replaces dropped labels in training and gives the unconditional branch at sampling time.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.has_null_class = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(self.has_null_class), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def drops(self, uniform: torch.Tensor) -> torch.Tensor:
        """force_drop_ids from one uniform [0, 1) draw per label: 1 where label dropout replaces the label by the
        null class. The one rule for label dropout: the trainer passes draws from its step randomness, and
        drop_labels draws from torch.rand when no force_drop_ids are given."""
        return (uniform < self.dropout_prob).long()

    def drop_labels(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace a random dropout_prob share of labels (or those where force_drop_ids == 1) by the null class."""
        if force_drop_ids is None:
            force_drop_ids = self.drops(torch.rand(labels.shape[0], device=labels.device))
        return torch.where(force_drop_ids == 1, torch.full_like(labels, self.num_classes), labels)

    def check_labels(self, labels: torch.Tensor) -> None:
        """Raise a clear error for labels outside [0, num_classes] (num_classes = the null class)."""
        top = self.num_classes if self.has_null_class else self.num_classes - 1
        if labels.dtype.is_floating_point or labels.dim() != 1:
            raise ValueError(f"labels must be a 1-D integer tensor, got {tuple(labels.shape)} {labels.dtype}")
        bad = (labels < 0) | (labels > top)
        if bool(bad.any()):
            raise ValueError(
                f"label(s) {labels[bad].unique().tolist()} outside [0, {top}] "
                f"(num_classes={self.num_classes}" + (", null class = num_classes)" if self.has_null_class else ")")
            )

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if labels.device.type != "meta" and not torch.compiler.is_compiling():
            self.check_labels(labels)  # a host sync; skipped on meta tensors (FLOP counting) and under compile
        if (train and self.has_null_class) or force_drop_ids is not None:
            if not self.has_null_class:
                raise ValueError(
                    "labels cannot be dropped: the model was built with class_dropout_prob=0 (no null class)"
                )
            labels = self.drop_labels(labels, force_drop_ids)
        return self.embedding_table(labels)
