"""Fused and reference operators. Every fast path has a plain PyTorch reference beside it."""

from dit.ops.adaln import MODES, layernorm_modulate, layernorm_modulate_fused, layernorm_modulate_reference, modulate

__all__ = ["MODES", "layernorm_modulate", "layernorm_modulate_fused", "layernorm_modulate_reference", "modulate"]
