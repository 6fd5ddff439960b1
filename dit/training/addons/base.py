"""The protocol of a training add-on: a feature the Trainer calls through a few hooks instead of branching on it.

An add-on is built from its settings (``training.<name>``, a dataclass in TrainConfig) when they turn it on, and then
takes part in a run at five points, each a method whose default does nothing:

- ``check(settings, model, dataset, cfg)``: clear errors before anything is built (run on the settings whether
  they turn the add-on on or not: a bad value is named either way);
- ``wrap(model, device, seed)``: the module the optimiser trains (REPA adds its projector around the DiT);
  ``inner(module)`` takes the wrapper off again, so the Trainer finds the DiT under any stack of add-ons;
- ``conditions(rng, model, batch_size)``: extra inputs of a training forward, drawn from the step's randomness so a
  resumed run draws the same (TREAD's token route);
- ``add_losses(terms, images)``: extra per-sample loss terms, added to ``terms["loss"]`` with their weight and logged
  under their own names (``terms``, the names it adds);
- ``training_flops(model, flops)``: the FLOPs of one training image with the add-on, from the count without it;
- ``export_weights(state_dict)``: what the export keeps of the trained module's weights (the DiT's).

Adding one: a settings dataclass as a TrainConfig field, an Addon subclass, a line in ADDONS (docs/extending.md). The
Trainer calls them in ADDONS order (dit/training/addons/__init__.py), the same on every process.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn

__all__ = ["Addon"]


class Addon:
    """Base class of a training add-on (see the module docstring). ``name`` is its TrainConfig field."""

    name: ClassVar[str]
    terms: tuple[str, ...] = ()  # the loss terms add_losses adds, logged beside the objective's

    def __init__(self, settings: Any):
        self.settings = settings

    @staticmethod
    def enabled(settings: Any) -> bool:
        """Whether these settings turn the add-on on (default: their ``enabled``)."""
        return bool(settings.enabled)

    @classmethod
    def check(cls, settings: Any, model: nn.Module, dataset, cfg) -> None:
        """A clear ValueError for bad settings, or when the add-on cannot train this model on this data."""

    def wrap(self, model: nn.Module, device: torch.device, seed: int) -> nn.Module:
        return model

    def inner(self, module: nn.Module) -> nn.Module:
        """The module wrap() was given, from the module it returned."""
        return module

    def conditions(self, rng, model: nn.Module, batch_size: int) -> dict[str, Any]:
        return {}

    def add_losses(self, terms: dict[str, torch.Tensor], images: torch.Tensor | None) -> None:
        """Add per-sample terms (N,) to ``terms`` (and their weighted sum to terms["loss"]); images: the clean images
        of the batch in [-1, 1] (None for latent data without images)."""

    def training_flops(self, model: nn.Module, flops: float) -> float:
        """FLOPs of one training image with this add-on, given ``flops`` without it (forward and backward)."""
        return flops

    def export_weights(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state_dict
