"""Samplers in one registry, and the guidance every one of them applies: classifier-free guidance (Ho & Salimans
2022), autoguidance (Karras et al. 2024: guided by a weaker version of the same model) and the guidance a model
takes as an input (improved MeanFlow), each a class of GUIDANCE.

    sampler = build_sampler(objective, SamplingSettings(sampler="ddim", steps=50, cfg_scale=4.0))
    x0 = sampler.sample(model, noise, labels, generator)

A sampler is built once from the objective a model was trained with and the sampling settings, and
is used identically by the training grids, the in-training FID and sample.py. Adding a sampler = one
class with a ``name`` (plus one line in the SAMPLERS list, dit/diffusion/registry.py) that lists the
objectives it can sample and implements
``run(denoiser, noise, y, generator)``; its keyword arguments are the sampler-specific options
(``SamplingSettings.options``, e.g. DDIM's eta), checked when it is built. A sampler on the ADM-respaced
chain of a DDPM model (ChainSampler) implements only ``step``, as DDPM and DDIM do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from dit.diffusion.gaussian_diffusion import GaussianDiffusion
from dit.diffusion.objective import Objective
from dit.diffusion.settings import SamplingSettings
from dit.models.spatial import null_map
from dit.registry import Registry

__all__ = [
    "AutoGuidance",
    "ChainSampler",
    "ClassifierFree",
    "DDIMSampler",
    "DDPMSampler",
    "Guidance",
    "InputGuidance",
    "Sampler",
    "SamplingSettings",
    "auto_guided_model",
    "guided_model",
]


# Conditions that are times, not something the unconditional branch drops: few-step models' interval h
# (dit/diffusion/few_step.py).
TIME_CONDITIONS = ("h",)


def _outside(interval, noise_level, t: torch.Tensor) -> bool:
    """True when the step's noise level (1 = pure noise) lies outside the guidance interval [lo, hi]."""
    if interval is None:
        return False
    level = float(noise_level(t[:1])[0])
    return not interval[0] <= level <= interval[1]


def guided_model(
    model: Callable,
    cfg_scale: float,
    null_class: int,
    guidance_channels: int | None = None,
    interval: list[float] | None = None,
    noise_level: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Callable:
    """Wrap model(x, t, y, **conditions) so that it returns guided outputs for N images from ONE forward of 2N.

    out = out(x | null) + cfg_scale * (out(x | y) - out(x | null)) on the first ``guidance_channels``
    output channels (all of the input's channels by default; 3 reproduces the original DiT code, which
    guided only the first three of the four latent channels). The remaining channels (v, and unguided
    channels) come from the conditional branch. With ``interval`` = [lo, hi], steps whose noise level
    (``noise_level(t)``, 1 = pure noise) lies outside it run the conditional model alone (one forward of N).
    ``conditions``: the model's other conditions (a spatial map: cond_map), dropped with the label in the
    unconditional branch (their null is dit.models.spatial.null_map).
    """

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
        if _outside(interval, noise_level, t):
            return model(x, t, y, **conditions)
        # e.g. cond_map: the map, then no map; a time (TIME_CONDITIONS) is the same in both branches
        both = {k: torch.cat([v, v if k in TIME_CONDITIONS else null_map(v)]) for k, v in conditions.items()}
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]), **both)
        cond, uncond = out.chunk(2)
        g = x.shape[1] if guidance_channels is None else guidance_channels
        guided = uncond[:, :g] + cfg_scale * (cond[:, :g] - uncond[:, :g])
        return torch.cat([guided, cond[:, g:]], dim=1)

    return fn


def auto_guided_model(
    model: Callable,
    guide: Callable,
    scale: float,
    guidance_channels: int | None = None,
    interval: list[float] | None = None,
    noise_level: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Callable:
    """Autoguidance: out = guide(x | y) + scale * (model(x | y) - guide(x | y)), both conditioned alike (Karras et al.
    2024, Eq. 2: D_w = D_0 + w (D_1 - D_0), D_0 the guide, a smaller or less trained model of the same task). The same
    channels, interval and remaining channels as guided_model; two forwards of N (two models) instead of one of 2N.
    With guide = the model's own unconditional branch it is classifier-free guidance exactly."""

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
        out = model(x, t, y, **conditions)
        if _outside(interval, noise_level, t):
            return out
        weak = guide(x, t, y, **conditions)
        g = x.shape[1] if guidance_channels is None else guidance_channels
        return torch.cat([weak[:, :g] + scale * (out[:, :g] - weak[:, :g]), out[:, g:]], dim=1)

    return fn


class Guidance:
    """How a sampler's model is guided (SamplingSettings.guidance names one; a new kind = a class of GUIDANCE):
    ``check(model, guide, settings)`` refuses what cannot work, ``wrap`` returns the guided denoiser."""

    name: ClassVar[str]
    calls: ClassVar[int] = 2  # model evaluations an image for one unguided one (a second branch)

    @staticmethod
    def check(model, guide, settings: SamplingSettings) -> None:
        raise NotImplementedError

    @staticmethod
    def wrap(model, guide, settings: SamplingSettings, noise_level) -> Callable:
        raise NotImplementedError


class ClassifierFree(Guidance):
    name = "cfg"

    @staticmethod
    def check(model, guide, settings):
        """Guidance needs the learned null class: a clear error instead of silently unguided samples."""
        if not model.y_embedder.has_null_class:
            raise ValueError(
                f"cfg_scale={settings.cfg_scale} needs a null class; this model was trained without label dropout "
                "(model.class_dropout_prob=0): sample with cfg_scale=1, or guidance=auto with a guide model"
            )

    @staticmethod
    def wrap(model, guide, settings, noise_level):
        s = settings
        return guided_model(model, s.cfg_scale, model.num_classes, s.guidance_channels, s.cfg_interval, noise_level)


class AutoGuidance(Guidance):
    name = "auto"

    @staticmethod
    def check(model, guide, settings):
        if guide is None:
            raise ValueError(
                f"guidance=auto (cfg_scale={settings.cfg_scale}) needs a guide model: guide=<checkpoint or export>, "
                "or guide=@STEP for the run's own checkpoint at that step"
            )

    @staticmethod
    def wrap(model, guide, settings, noise_level):
        s = settings
        return auto_guided_model(model, guide, s.cfg_scale, s.guidance_channels, s.cfg_interval, noise_level)


class InputGuidance(Guidance):
    """The guidance as the model's input, for models with one (model.guidance_input; trained by diffusion=meanflow
    with guidance_input=true, improved MeanFlow's guidance conditions): the model is told the scale and the interval
    [lo, hi] of noise levels (cfg_interval; null: [0, 1]) and returns the guided output itself, one call a step."""

    name = "input"
    calls = 1

    @staticmethod
    def check(model, guide, settings):
        if getattr(model, "g_embedder", None) is None:
            raise ValueError(
                f"guidance=input (cfg_scale={settings.cfg_scale}) needs a model trained with a guidance input "
                "(model.guidance_input=true, diffusion.guidance_input=true): guidance=cfg guides this one"
            )

    @staticmethod
    def wrap(model, guide, settings, noise_level):
        lo, hi = settings.cfg_interval or (0.0, 1.0)

        def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
            g = torch.tensor([settings.cfg_scale, lo, hi], device=x.device, dtype=x.dtype).expand(len(x), 3)
            return model(x, t, y, g=g, **conditions)

        return fn


class Sampler:
    """Base class: holds the objective and the settings; ``sample`` applies guidance, ``run`` the steps."""

    name: ClassVar[str]
    objectives: ClassVar[tuple[str, ...]]  # names of the objectives whose models it can sample
    calls_per_step: ClassVar[int] = 1  # model evaluations a step (Heun: 2), before guidance doubles them

    def __init__(self, objective: Objective, settings: SamplingSettings):
        self.objective, self.settings = objective, settings

    @property
    def model_calls(self) -> int:
        """Network evaluations an image: steps x calls a step, x2 with guidance (a second, conditional-free or
        guide, branch; batched together or not; guidance=input: x1)."""
        s = self.settings
        return s.steps * self.calls_per_step * (1 if s.cfg_scale == 1.0 else GUIDANCE[s.guidance].calls)

    def check_model(self, model, guide=None) -> None:
        """The settings' guidance can guide this model (with this guide): one clear line if not."""
        if self.settings.cfg_scale != 1.0:
            GUIDANCE[self.settings.guidance].check(model, guide, self.settings)

    def denoiser(self, model, guide=None) -> Callable:
        """model(x, t, y), guided as the settings say (guide: the weaker model of guidance=auto). Where a model
        meets the sampler: checked here, once per denoiser (generate() makes one for all its batches)."""
        self.check_model(model, guide)
        if self.settings.cfg_scale == 1.0:
            return model
        return GUIDANCE[self.settings.guidance].wrap(model, guide, self.settings, self.objective.noise_level)

    @torch.no_grad()
    def sample(
        self, model, noise: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None, guide=None
    ) -> torch.Tensor:
        """x_0 from x_T = noise for labels y. Deterministic for a given generator state."""
        return self.run(self.denoiser(model, guide), noise, y, generator)

    def run(
        self, denoiser: Callable, noise: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        raise NotImplementedError


class ChainSampler(Sampler):
    """A sampler that walks the ADM-respaced chain of ``steps`` steps of a DDPM model (GaussianDiffusion) from
    x_T = noise to x_0, one model call and one normal draw per step (deterministic for a given generator
    state); a subclass says what one step does (``step``)."""

    objectives = ("ddpm",)

    def __init__(
        self,
        objective: GaussianDiffusion,
        settings: SamplingSettings,
        variance_type: str | None = None,
        clip_denoised: bool = False,
    ):
        super().__init__(objective, settings)
        self.chain = objective.respaced(str(settings.steps), variance_type)
        self.clip_denoised = clip_denoised

    def step(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_{t-1} from the model output at (x, t) and this step's standard normal draw (t: chain indices)."""
        raise NotImplementedError

    def run(self, denoiser, noise, y, generator):
        x, chain = noise, self.chain
        for i in reversed(range(chain.num_timesteps)):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            out = denoiser(x, chain.model_timesteps(t), y)
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = self.step(out, x, t, z)
        return x


class DDPMSampler(ChainSampler):
    """Ancestral sampling (DDPM, Ho et al. 2020) on the ADM-respaced chain of ``steps`` steps.
    variance_type: null = the one trained (learned_range for DiT); fixed_small / fixed_large ignore v."""

    name = "ddpm"

    def step(self, out, x, t, noise):
        return self.chain.p_sample(out, x, t, noise, self.clip_denoised)[0]


class DDIMSampler(ChainSampler):
    """DDIM (Song et al. 2021, eq. 12) on the ADM-respaced chain; eta = 0 deterministic, 1 = DDPM's variance."""

    name = "ddim"

    def __init__(
        self, objective: GaussianDiffusion, settings: SamplingSettings, eta: float = 0.0, clip_denoised: bool = False
    ):
        super().__init__(objective, settings, clip_denoised=clip_denoised)
        self.eta = float(eta)

    def step(self, out, x, t, noise):
        return self.chain.ddim_sample(out, x, t, noise, self.eta, self.clip_denoised)[0]


GUIDANCE: Registry[Guidance] = Registry("guidance", [ClassifierFree, AutoGuidance, InputGuidance])
