"""Training add-ons: features the Trainer calls through one protocol (base.py), in ADDONS order.

Adding one: its settings as a field of TrainConfig (``training.<name>``), an Addon subclass, one line here.
"""

from __future__ import annotations

import torch.nn as nn

from dit.registry import Registry
from dit.training.addons.base import Addon
from dit.training.addons.repa import REPA
from dit.training.addons.tread import TREAD

__all__ = ["ADDONS", "Addon", "build_addons"]

# In the order the Trainer calls them: TREAD's route is drawn before anything else an add-on does.
ADDONS: Registry[Addon] = Registry("training add-on", [TREAD, REPA])


def build_addons(cfg, model: nn.Module, dataset) -> list[Addon]:
    """The add-ons cfg (TrainConfig) turns on, each after its settings were checked (also those turned off: a bad
    value is named either way). An add-on whose field cfg lacks is left out."""
    addons = []
    for cls in ADDONS.values():
        settings = getattr(cfg, cls.name, None)
        if settings is None:
            continue
        cls.check(settings, model, dataset, cfg)
        if cls.enabled(settings):
            addons.append(cls(settings))
    return addons
