"""Conditional normalisation layers: the family adaLN grew from, as standalone modules."""

from dit.nn.conditional_norms import (
    SPADE,
    AdaIN,
    AdaLN,
    AdaLNZero,
    ConditionalBatchNorm2d,
    ConditionalInstanceNorm2d,
    FiLM,
)

__all__ = ["AdaIN", "AdaLN", "AdaLNZero", "ConditionalBatchNorm2d", "ConditionalInstanceNorm2d", "FiLM", "SPADE"]
