"""The objective and sampler registries, each filled from one explicit list (adding one = one class + one line)."""

from __future__ import annotations

import inspect
from typing import Any

from dit.diffusion.flow import EulerMaruyamaSampler, EulerSampler, FlowMatching, HeunSampler
from dit.diffusion.gaussian_diffusion import GaussianDiffusion
from dit.diffusion.objective import Objective
from dit.diffusion.sampler import DDIMSampler, DDPMSampler, Sampler, SamplingSettings
from dit.diffusion.solvers import DPMSolverPlusPlus, UniPC
from dit.registry import Registry

__all__ = ["OBJECTIVES", "SAMPLERS", "build_objective", "build_sampler"]

OBJECTIVES: Registry[Objective] = Registry("objective", [GaussianDiffusion, FlowMatching])
SAMPLERS: Registry[Sampler] = Registry(
    "sampler", [DDIMSampler, DDPMSampler, DPMSolverPlusPlus, UniPC, EulerSampler, EulerMaruyamaSampler, HeunSampler]
)


def build_objective(name: str = "ddpm", **settings: Any) -> Objective:
    """The objective ``name`` built from its settings (what ``Objective.settings()`` returned)."""
    return OBJECTIVES[name].from_settings(**settings)


def build_sampler(objective: Objective, settings: SamplingSettings) -> Sampler:
    """The sampler named by settings.sampler (null: the objective's default_sampler) for a model trained with
    ``objective``. Clear errors for a sampler that cannot sample that objective and for unknown options (the
    settings themselves are checked when they are made, SamplingSettings.__post_init__)."""
    name = settings.sampler or objective.default_sampler
    cls = SAMPLERS[name]
    if objective.name not in cls.objectives:
        fits = sorted(n for n, c in SAMPLERS.items() if objective.name in c.objectives)
        raise ValueError(
            f"sampler {name!r} cannot sample a model trained with the {objective.name!r} objective; "
            f"valid for it: {', '.join(fits)}"
        )
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "objective", "settings")]
    unknown = sorted(set(settings.options) - set(accepted))
    if unknown:
        raise ValueError(
            f"sampler {name!r} has no option {', '.join(unknown)}; its options: {', '.join(accepted) or 'none'}"
        )
    return cls(objective, settings, **settings.options)
