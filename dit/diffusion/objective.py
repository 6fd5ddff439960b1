"""Training objectives: what the training loop is handed (as edm2 hands its loss to the loop).

An objective owns everything that differs between ways of training the same network:

- ``draw(rng, x)``: the step's randomness (timesteps, noise), drawn from the step's SlicedRandom so
  it is the same whatever the number of processes and across a resume;
- ``losses(model, x, draw, model_kwargs)``: the per-sample loss terms; ``"loss"`` is optimised, the
  others (``loss_terms``) are only logged. The loop averages and logs them without naming them;
- ``settings()``: a JSON-able dict saved in every checkpoint and export; ``build_objective(**settings)``
  rebuilds the objective, so sample.py samples with the schedule the model was trained with;
- ``noise_level(t)``: the model timestep mapped to [0, 1] (1 = pure noise), what guidance intervals
  are expressed in, so one guidance implementation serves every objective and sampler.

Samplers say which objectives they can sample (dit/diffusion/sampler.py). Adding an objective =
one class with ``@register_objective``, one config file in configs/diffusion/.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

__all__ = ["OBJECTIVES", "Objective", "build_objective", "register_objective"]

OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(name: str):
    """Class decorator: make an objective selectable as ``diffusion=<name>`` (its ``name`` setting)."""

    def wrap(cls):
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is registered twice")
        cls.name = name
        OBJECTIVES[name] = cls
        return cls

    return wrap


def build_objective(name: str = "ddpm", **settings: Any) -> Objective:
    """The objective ``name`` built from its settings (what ``Objective.settings()`` returned)."""
    try:
        cls = OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; valid objectives: {', '.join(sorted(OBJECTIVES))}") from None
    return cls.from_settings(**settings)


class Objective:
    """Interface of a training objective (see the module docstring)."""

    name: ClassVar[str]
    loss_terms: tuple[str, ...] = ("loss",)
    default_sampler: ClassVar[str]  # what `sampler: null` means for its models

    @classmethod
    def from_settings(cls, **settings: Any) -> Objective:
        return cls(**settings)

    def settings(self) -> dict[str, Any]:
        """JSON-able; includes "name" so build_objective(**settings) rebuilds this objective."""
        raise NotImplementedError

    def check_model(self, model: torch.nn.Module) -> None:
        """A clear ValueError if the model cannot be trained or sampled with this objective."""

    def draw(self, rng, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The step's random tensors for the batch x (rng: dit.training.randomness.SlicedRandom)."""
        raise NotImplementedError

    def losses(self, model: Callable, x: torch.Tensor, draw: dict[str, torch.Tensor], model_kwargs: dict) -> dict[str, torch.Tensor]:
        """Per-sample loss terms, keys ``loss_terms``; "loss" is what the optimiser minimises."""
        raise NotImplementedError

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """Model timesteps -> noise level in [0, 1], 1 at pure noise and 0 at the data."""
        raise NotImplementedError
