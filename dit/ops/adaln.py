"""LayerNorm followed by adaptive modulation: the hot path of every adaLN block.

    layernorm_modulate(x, shift, scale) = LayerNorm(x, no affine) * (1 + scale) + shift

x: (B, T, D); shift, scale: (B, D), broadcast over the T tokens (DiT paper, section 3.2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift with (B, D) shift/scale broadcast over the tokens of (B, T, D) x."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def layernorm_modulate_reference(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Eager PyTorch reference: three passes over the activations (norm, scale, shift)."""
    return modulate(F.layer_norm(x, x.shape[-1:], eps=eps), shift, scale)


def layernorm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Dispatcher used by the model; today the eager reference on every device."""
    return layernorm_modulate_reference(x, shift, scale, eps)
