"""LayerNorm followed by adaptive modulation: the hot path of every adaLN block.

    layernorm_modulate(x, shift, scale) = LayerNorm(x, no affine) * (1 + scale) + shift

x: (B, T, D); shift, scale: (B, D), broadcast over the T tokens (DiT paper, section 3.2).
The eager reference makes three passes over the activations; the fused path (triton_adaln.py) one
forward and one backward. It is a torch.library custom op with fake and autograd registrations, so
torch.compile traces through it and the state dict does not change.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

MODES = ("auto", "true", "false")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift with (B, D) shift/scale broadcast over the tokens of (B, T, D) x."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def layernorm_modulate_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Eager PyTorch reference: three passes over the activations (norm, scale, shift)."""
    return modulate(F.layer_norm(x, x.shape[-1:], eps=eps), shift, scale)


# --- the fused op ------------------------------------------------------------------------------


@torch.library.custom_op("dit::layernorm_modulate_fwd", mutates_args=())
def _fused_fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from dit.ops import triton_adaln

    return triton_adaln.forward(x, shift, scale, eps)


@_fused_fwd.register_fake
def _(x, shift, scale, eps):
    B, T, _ = x.shape
    stats = x.new_empty(B * T, dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("dit::layernorm_modulate_bwd", mutates_args=())
def _fused_bwd(
    dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from dit.ops import triton_adaln

    return triton_adaln.backward(dy, x, scale, mean, rstd)


@_fused_bwd.register_fake
def _(dy, x, scale, mean, rstd):
    return torch.empty_like(x), torch.empty_like(scale), torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    x, _, scale, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = _fused_bwd(dy, x, scale, mean, rstd)
    return dx, dshift, dscale, None


_fused_fwd.register_autograd(_backward, setup_context=_setup_context)


def layernorm_modulate_fused(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The Triton path (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1)."""
    if x.dim() != 3 or shift.shape != (x.shape[0], x.shape[2]) or scale.shape != shift.shape:
        raise ValueError(
            f"layernorm_modulate: x (B, T, D) and shift/scale (B, D), got {tuple(x.shape)}, {tuple(shift.shape)}, {tuple(scale.shape)}"
        )
    return _fused_fwd(x, shift, scale, eps)[0]


# --- dispatch ----------------------------------------------------------------------------------


def _triton_usable(x: torch.Tensor) -> bool:
    if x.is_cuda:
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return os.environ.get("TRITON_INTERPRET") == "1" and x.device.type == "cpu"


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, fused: str = "auto") -> torch.Tensor:
    """fused="auto": Triton on CUDA tensors, the eager reference elsewhere; "true": always Triton
    (an error where it cannot run); "false": always the reference."""
    fused = str(fused).lower()
    if fused == "false" or x.device.type == "meta":
        return layernorm_modulate_reference(x, shift, scale, eps)
    if fused == "auto":
        return (
            layernorm_modulate_fused(x, shift, scale, eps)
            if x.is_cuda and _triton_usable(x)
            else layernorm_modulate_reference(x, shift, scale, eps)
        )
    if fused == "true":
        if not _triton_usable(x):
            raise ValueError(
                f"fused_adaln=true needs a CUDA tensor with Triton (or TRITON_INTERPRET=1 on CPU); got a {x.device.type} tensor"
            )
        return layernorm_modulate_fused(x, shift, scale, eps)
    raise ValueError(f"fused_adaln={fused!r}; valid: {', '.join(MODES)}")
