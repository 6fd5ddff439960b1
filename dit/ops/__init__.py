"""Fused and reference operators. Every fast path has a plain PyTorch reference beside it."""

from dit.ops.adaln import layernorm_modulate, layernorm_modulate_reference, modulate

__all__ = ["layernorm_modulate", "layernorm_modulate_reference", "modulate"]
