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

Samplers say which objectives they can sample (dit/diffusion/sampler.py); an objective names the
sampler its models get when the user names none (``default_sampler``; ``eval_sampler`` for the
in-training FID). Adding an objective = one class with a ``name``, one line in the OBJECTIVES list
(dit/diffusion/registry.py), one config file in configs/diffusion/.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

__all__ = ["Objective", "mean_flat"]


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch."""
    return x.mean(dim=tuple(range(1, x.dim())))


class Objective:
    """Interface of a training objective (see the module docstring)."""

    name: ClassVar[str]  # its key in OBJECTIVES and the "name" of its settings
    loss_terms: tuple[str, ...] = ("loss",)
    default_sampler: ClassVar[str]  # what `sampler: null` means for its models (sample.py, the training grids)
    eval_sampler: ClassVar[str]  # ... for the in-training FID (TrainConfig.fid_sampling): a few-step one
    interval_input: ClassVar[bool] = False  # its models take a second time, the interval (model.interval_input)
    guidance_input: bool = False  # it trains the guidance input (model.guidance_input): MeanFlow's option
    # Settings added after runs were recorded -> their defaults: left out of the settings digest at the default
    # (and, by the objective's settings(), of checkpoint records), so older records still describe their runs.
    ADDED_SETTINGS: ClassVar[dict[str, Any]] = {}

    @classmethod
    def from_settings(cls, **settings: Any) -> Objective:
        return cls(**settings)

    @classmethod
    def recorded(cls, settings: dict[str, Any]) -> dict[str, Any]:
        """Settings as records keep them (checkpoints, exports, the settings digest): ADDED_SETTINGS at their
        default left out, so the records made before they existed still describe the same runs."""
        added = cls.ADDED_SETTINGS
        return {k: v for k, v in settings.items() if not (k in added and v == added[k])}

    def settings(self) -> dict[str, Any]:
        """JSON-able; includes "name" so build_objective(**settings) rebuilds this objective."""
        raise NotImplementedError

    def check_model(self, model: torch.nn.Module) -> None:
        """A clear ValueError if the model cannot be trained or sampled with this objective."""
        if getattr(model, "g_embedder", None) is not None and not self.guidance_input:
            raise ValueError(
                "model.guidance_input=true: only diffusion=meanflow with diffusion.guidance_input=true trains the "
                "guidance input (left untrained, guidance=input would sample unguided at any scale)"
            )

    def training_flops(self, config, flops: float) -> float:
        """FLOPs of one training image with this objective, given ``flops``: the DiT's forward and backward (the
        passes an objective adds without gradient, e.g. MeanFlow's JVP, are its own to count)."""
        return flops

    def draw(self, rng, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The step's random tensors for the batch x (rng: dit.training.randomness.SlicedRandom)."""
        raise NotImplementedError

    def losses(
        self, model: Callable, x: torch.Tensor, draw: dict[str, torch.Tensor], model_kwargs: dict
    ) -> dict[str, torch.Tensor]:
        """Per-sample loss terms, keys ``loss_terms``; "loss" is what the optimiser minimises."""
        raise NotImplementedError

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """Model timesteps -> noise level in [0, 1], 1 at pure noise and 0 at the data."""
        raise NotImplementedError
