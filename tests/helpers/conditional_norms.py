"""Conditional normalisation as the papers write it, on image features (N, C, H, W): the tests' reference for the
token blocks of dit/models/blocks/ (normalised.py carries these statistics onto tokens, the token axis as the
spatial one), each checked against its formula in tests/test_conditional_norms.py.

    from helpers.conditional_norms import AdaIN, ConditionalBatchNorm2d, FiLM

Normalise, then re-scale and re-shift with parameters that come from a condition instead of being fixed. They
differ in where gamma and beta come from:

| layer                      | gamma, beta from                         | paper                          |
|----------------------------|------------------------------------------|--------------------------------|
| AdaIN                      | the style features' channel mean / std   | Huang & Belongie 2017, eq. 8   |
| ConditionalInstanceNorm2d  | a table row per style id                 | Dumoulin et al. 2017, eq. 5    |
| FiLM                       | a linear projection of a vector          | Perez et al. 2018, eq. 1       |
| ConditionalBatchNorm2d     | FiLM on batch-normalised features        | de Vries et al. 2017           |
| SPADE                      | convolutions of a resized mask (spatial) | Park et al. 2019, eq. 1        |
| AdaLN / AdaLNZero          | Linear(SiLU(c)) per token; Zero: + a gate| DiT, section 3.2               |
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dit.ops import layernorm_modulate


def _channel_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and std over the spatial dims of (N, C, *spatial)."""
    dims = tuple(range(2, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    std = (x.var(dim=dims, keepdim=True, unbiased=False) + eps).sqrt()
    return mean, std


def _broadcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N, C) -> (N, C, 1, ..., 1) to broadcast over the spatial dims of ``like``."""
    return v.reshape(*v.shape, *([1] * (like.dim() - 2)))


class AdaIN(nn.Module):
    """Adaptive instance norm: AdaIN(x, s) = std(s) * (x - mean(x)) / std(x) + mean(s), per channel."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        if content.shape[:2] != style.shape[:2]:
            raise ValueError(f"content {tuple(content.shape)} and style {tuple(style.shape)} differ in (N, C)")
        c_mean, c_std = _channel_stats(content, self.eps)
        s_mean, s_std = _channel_stats(style, self.eps)
        return s_std * (content - c_mean) / c_std + s_mean


class ConditionalInstanceNorm2d(nn.Module):
    """Conditional instance norm: one learned (gamma, beta) row per style id, after instance norm."""

    def __init__(self, num_features: int, num_styles: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.InstanceNorm2d(num_features, affine=False, eps=eps)
        self.gamma = nn.Embedding(num_styles, num_features)
        self.beta = nn.Embedding(num_styles, num_features)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: torch.Tensor, style_id: torch.Tensor) -> torch.Tensor:
        return _broadcast(self.gamma(style_id), x) * self.norm(x) + _broadcast(self.beta(style_id), x)


class FiLM(nn.Module):
    """Feature-wise linear modulation: FiLM(x, z) = gamma(z) * x + beta(z), gamma and beta linear in z.

    Works on (N, C, *spatial) features; gamma starts at 1 and beta at 0 (identity at init).
    """

    def __init__(self, num_features: int, cond_dim: int):
        super().__init__()
        self.proj = nn.Linear(cond_dim, 2 * num_features)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        delta_gamma, beta = self.proj(z).chunk(2, dim=1)  # (N, C) each
        return _broadcast(1 + delta_gamma, x) * x + _broadcast(beta, x)


class ConditionalBatchNorm2d(nn.Module):
    """Conditional batch norm: batch norm without affine, then FiLM from a conditioning vector."""

    def __init__(self, num_features: int, cond_dim: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_features, affine=False, eps=eps, momentum=momentum)
        self.film = FiLM(num_features, cond_dim)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.film(self.norm(x), z)


class SPADE(nn.Module):
    """Spatially-adaptive norm: x_hat * (1 + gamma(m)) + beta(m), gamma and beta (N, C, H, W) maps
    computed from the mask m, resized (nearest) to the feature map, by a shared conv + ReLU and one
    conv each. x_hat is parameter-free batch norm (or instance norm)."""

    def __init__(self, num_features: int, label_nc: int, hidden: int = 128, kernel_size: int = 3, norm: str = "batch"):
        super().__init__()
        norms = {"batch": nn.BatchNorm2d, "instance": nn.InstanceNorm2d}
        if norm not in norms:
            raise ValueError(f"unknown SPADE norm {norm!r}; valid: {', '.join(norms)}")
        self.norm = norms[norm](num_features, affine=False)
        pad = kernel_size // 2
        self.shared = nn.Sequential(nn.Conv2d(label_nc, hidden, kernel_size, padding=pad), nn.ReLU())
        self.gamma = nn.Conv2d(hidden, num_features, kernel_size, padding=pad)
        self.beta = nn.Conv2d(hidden, num_features, kernel_size, padding=pad)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = F.interpolate(mask, size=x.shape[-2:], mode="nearest")
        h = self.shared(mask)
        return self.norm(x) * (1 + self.gamma(h)) + self.beta(h)


class AdaLN(nn.Module):
    """Adaptive layer norm on tokens: LN(x) * (1 + scale(c)) + shift(c), x (N, T, D), c (N, cond_dim)."""

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=1)
        return layernorm_modulate(x, shift, scale, self.eps)


class AdaLNZero(nn.Module):
    """adaLN-Zero around a sub-layer f: x + alpha(c) * f(LN(x) * (1 + scale(c)) + shift(c)).

    The modulation is zero-initialised, so alpha = 0 and the residual branch starts switched off.
    """

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 3 * dim))
        nn.init.zeros_(self.modulation[-1].weight)
        nn.init.zeros_(self.modulation[-1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, sublayer) -> torch.Tensor:
        shift, scale, gate = self.modulation(c).chunk(3, dim=1)
        return x + gate.unsqueeze(1) * sublayer(layernorm_modulate(x, shift, scale, self.eps))
