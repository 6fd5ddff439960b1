"""The objective and sampler registries, each filled from one explicit list (adding one = one class + one line), and
the rules that read them: a sampler's name is checked here (check_sampling), and which sampler a null ``sampler``
means is decided here, once (sampler_name)."""

from __future__ import annotations

import inspect
from typing import Any

from dit.diffusion.few_step import FewStepSampler, MeanFlow, Shortcut, ShortcutSampler
from dit.diffusion.flow import EulerMaruyamaSampler, EulerSampler, FlowMatching, HeunSampler
from dit.diffusion.gaussian_diffusion import GaussianDiffusion
from dit.diffusion.objective import Objective
from dit.diffusion.sampler import GUIDANCE, DDIMSampler, DDPMSampler, Sampler
from dit.diffusion.settings import SamplingSettings
from dit.diffusion.solvers import DPMSolverPlusPlus, UniPC
from dit.registry import Registry

__all__ = [
    "GUIDANCE",
    "OBJECTIVES",
    "PURPOSES",
    "SAMPLERS",
    "build_objective",
    "build_sampler",
    "check_sampling",
    "sampler_name",
]

OBJECTIVES: Registry[Objective] = Registry("objective", [GaussianDiffusion, FlowMatching, MeanFlow, Shortcut])
SAMPLERS: Registry[Sampler] = Registry(
    "sampler",
    [
        *[DDIMSampler, DDPMSampler, DPMSolverPlusPlus, UniPC],
        *[EulerSampler, EulerMaruyamaSampler, HeunSampler, FewStepSampler, ShortcutSampler],
    ],
)


def build_objective(name: str = "ddpm", **settings: Any) -> Objective:
    """The objective ``name`` built from its settings (what ``Objective.settings()`` returned)."""
    return OBJECTIVES[name].from_settings(**settings)


# What a null ``sampler`` means, by what the samples are for: the objective's class attribute naming its sampler.
PURPOSES = {"default": "default_sampler", "eval": "eval_sampler"}  # sample.py and the grids; the in-training FID


def check_sampling(settings: SamplingSettings) -> SamplingSettings:
    """settings, after checking that the sampler it names (if any) is registered: one line naming the valid ones.
    For entry points that check settings before anything is loaded (sample.py)."""
    if settings.sampler is not None:
        SAMPLERS[settings.sampler]  # unknown sampler 'x'; valid samplers: ... (sorted)
    GUIDANCE[settings.guidance]  # unknown guidance 'x'; valid guidances: auto, cfg, input
    return settings


def sampler_name(sampler: str | None, objective: type[Objective] | Objective, purpose: str = "default") -> str:
    """The sampler a ``sampler`` setting means: the one it names, or for null the objective's sampler for
    ``purpose`` (PURPOSES). The one place that rule is written. Names are not checked here (build_sampler and
    check_sampling do), so the records of runs keep their meaning."""
    return sampler or getattr(objective, PURPOSES[purpose])


def build_sampler(objective: Objective, settings: SamplingSettings, purpose: str = "default") -> Sampler:
    """The sampler settings name (null: the objective's for ``purpose``, sampler_name) for a model trained with
    ``objective``. Clear errors for an unknown sampler, one that cannot sample that objective and unknown options
    (the other settings are checked when they are made, SamplingSettings.__post_init__)."""
    name = sampler_name(settings.sampler, objective, purpose)
    cls = SAMPLERS[name]
    GUIDANCE[settings.guidance]  # an unknown guidance: one line naming the valid ones
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
