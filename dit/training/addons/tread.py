"""TREAD token routing (dit/models/routing.py) as a training add-on: each step draws which image tokens skip the
routed blocks, and the FLOPs count follows the routing. Sampling never routes: nothing is wrapped or exported."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from dit.models.flops import training_flops
from dit.models.routing import TokenRouting
from dit.training.addons.base import Addon

__all__ = ["TREAD"]


class TREAD(Addon):
    name = "token_routing"  # training.token_routing

    @classmethod
    def check(cls, settings: TokenRouting, model: nn.Module, dataset, cfg) -> None:
        settings.check(model)

    def conditions(self, rng, model: nn.Module, batch_size: int) -> dict[str, Any]:
        """The step's route, drawn after the objective's draws and the label drops (exact resume)."""
        return {"route": self.settings.draw(rng, batch_size, model.num_tokens, len(model.blocks))}

    def training_flops(self, model: nn.Module, flops: float) -> float:
        """The DiT's forward and backward with the routing, in place of the count without it."""
        return flops - training_flops(model.config) + training_flops(model.config, self.settings)
