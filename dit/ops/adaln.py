"""A normalisation followed by adaptive modulation: the hot path of every adaLN block.

    layernorm_modulate(x, shift, scale) = LayerNorm(x, no affine) * (1 + scale) + shift
    rmsnorm_modulate(x, shift, scale)   = RMSNorm(x, no affine)   * (1 + scale) + shift

x: (B, T, D); shift, scale: (B, D), broadcast over the T tokens (DiT paper, section 3.2).
The eager reference makes three passes over the activations; the fused path (triton_adaln.py) one
forward and one backward. It is a torch.library custom op with fake and autograd registrations, so
torch.compile traces through it and the state dict does not change.

Which path runs is a runtime choice, resolved once into a plain function by ``resolve_modulate``
(models do it when built and in ``set_fused_adaln``), so nothing parses a mode string per call.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

MODES = ("auto", "true", "false")
NORMS = ("layernorm", "rmsnorm")

NormModulate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift with (B, D) shift/scale broadcast over the tokens of (B, T, D) x."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def layernorm_modulate_reference(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Eager PyTorch reference: three passes over the activations (norm, scale, shift)."""
    return modulate(F.layer_norm(x, x.shape[-1:], eps=eps), shift, scale)


def rmsnorm_modulate_reference(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Eager PyTorch reference of the RMSNorm variant: x / sqrt(mean(x^2) + eps), then modulate."""
    return modulate(F.rms_norm(x, x.shape[-1:], eps=eps), shift, scale)


# --- the fused op (one op for both norms: `rms` selects the kernel's RMSNorm branch) -------------


@torch.library.custom_op("dit::layernorm_modulate_fwd", mutates_args=())
def _fused_fwd(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, rms: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from dit.ops import triton_adaln  # imports triton, optional (CUDA installs): only when the kernel runs

    return triton_adaln.forward(x, shift, scale, eps, rms)


@_fused_fwd.register_fake
def _(x, shift, scale, eps, rms):
    B, T, _ = x.shape
    stats = x.new_empty(B * T, dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("dit::layernorm_modulate_bwd", mutates_args=())
def _fused_bwd(
    dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, rms: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from dit.ops import triton_adaln  # imports triton, optional (CUDA installs): only when the kernel runs

    return triton_adaln.backward(dy, x, scale, mean, rstd, rms)


@_fused_bwd.register_fake
def _(dy, x, scale, mean, rstd, rms):
    return torch.empty_like(x), torch.empty_like(scale), torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    x, _, scale, _, rms = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.rms = rms


def _backward(ctx, dy, _dmean, _drstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = _fused_bwd(dy, x, scale, mean, rstd, ctx.rms)
    return dx, dshift, dscale, None, None


_fused_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_shapes(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> None:
    if x.dim() != 3 or shift.shape != (x.shape[0], x.shape[2]) or scale.shape != shift.shape:
        raise ValueError(
            "layernorm_modulate: x (B, T, D) and shift/scale (B, D), "
            f"got {tuple(x.shape)}, {tuple(shift.shape)}, {tuple(scale.shape)}"
        )


def layernorm_modulate_fused(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """The Triton path (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1)."""
    _check_shapes(x, shift, scale)
    return _fused_fwd(x, shift, scale, eps, False)[0]


def rmsnorm_modulate_fused(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """The Triton path of the RMSNorm variant (same kernels, RMS branch)."""
    _check_shapes(x, shift, scale)
    return _fused_fwd(x, shift, scale, eps, True)[0]


# --- resolution: a mode string -> one plain function, decided once --------------------------------

_REFERENCE = {"layernorm": layernorm_modulate_reference, "rmsnorm": rmsnorm_modulate_reference}
_FUSED = {"layernorm": layernorm_modulate_fused, "rmsnorm": rmsnorm_modulate_fused}


def check_mode(mode: str | bool) -> str:
    """Normalise a fused_adaln value ("auto" | "true" | "false", or a bool); ValueError otherwise."""
    value = str(mode).lower()
    if value not in MODES:
        raise ValueError(f"fused_adaln={mode!r}; valid: {', '.join(MODES)}")
    return value


def _cuda_or_reference(x, shift, scale, eps, *, fused, reference):
    """ "auto": the kernel on CUDA tensors, the reference elsewhere (CPU, meta). One attribute test per
    call; under torch.compile it becomes a guard, not a branch in the graph."""
    return fused(x, shift, scale, eps) if x.is_cuda else reference(x, shift, scale, eps)


def _always_fused(x, shift, scale, eps, *, fused, reference, interpret):
    """ "true": the kernel, an error where it cannot run; meta tensors (FLOP counting) use the reference."""
    if x.is_cuda or (interpret and x.device.type == "cpu"):
        return fused(x, shift, scale, eps)
    if x.device.type == "meta":
        return reference(x, shift, scale, eps)
    raise ValueError(
        f"fused_adaln=true needs a CUDA tensor with Triton (or TRITON_INTERPRET=1 on CPU); got a {x.device.type} tensor"
    )


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401  (optional, heavy: probed once, when a mode is first resolved)
    except ImportError:
        return False
    return True


@functools.cache
def resolve_modulate(norm: str, mode: str | bool = "auto") -> NormModulate:
    """The function ``f(x, shift, scale, eps)`` that computes ``norm`` + modulate under fused mode ``mode``.

    "false": the eager reference. "true": always the Triton kernel. "auto": the kernel on CUDA tensors
    when Triton imports, the reference otherwise; decided by ``x.is_cuda`` alone at call time (a model
    can move between devices after it is built, and the test is one attribute read). Cached: the
    same (norm, mode) gives the same function object. Picklable (module-level functions and partials).
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
    mode = check_mode(mode)
    reference, fused = _REFERENCE[norm], _FUSED[norm]
    if mode == "false" or (mode == "auto" and not _triton_importable()):
        return reference
    if mode == "auto":
        return functools.partial(_cuda_or_reference, fused=fused, reference=reference)
    return functools.partial(
        _always_fused, fused=fused, reference=reference, interpret=os.environ.get("TRITON_INTERPRET") == "1"
    )


def layernorm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, fused: str = "auto"
) -> torch.Tensor:
    """fused="auto": Triton on CUDA tensors, the eager reference elsewhere; "true": always Triton
    (an error where it cannot run); "false": always the reference. (Models resolve the mode once; this
    is the one-call form for tests and benchmarks.)"""
    return resolve_modulate("layernorm", fused)(x, shift, scale, eps)


def rmsnorm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, fused: str = "auto"
) -> torch.Tensor:
    """The RMSNorm counterpart of ``layernorm_modulate``."""
    return resolve_modulate("rmsnorm", fused)(x, shift, scale, eps)
