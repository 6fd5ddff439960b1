"""Fused and reference operators. Every fast path has a plain PyTorch reference beside it."""

from dit.ops.adaln import (
    MODES,
    NORMS,
    check_mode,
    layernorm_modulate,
    layernorm_modulate_fused,
    layernorm_modulate_reference,
    modulate,
    resolve_modulate,
    rmsnorm_modulate,
    rmsnorm_modulate_fused,
    rmsnorm_modulate_reference,
)

__all__ = [
    "MODES",
    "NORMS",
    "check_mode",
    "layernorm_modulate",
    "layernorm_modulate_fused",
    "layernorm_modulate_reference",
    "modulate",
    "resolve_modulate",
    "rmsnorm_modulate",
    "rmsnorm_modulate_fused",
    "rmsnorm_modulate_reference",
]
