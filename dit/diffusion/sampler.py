"""Samplers in one registry, and classifier-free guidance (Ho & Salimans 2022) shared by all of them.

    sampler = build_sampler(objective, SamplingSettings(sampler="ddim", steps=50, cfg_scale=4.0))
    x0 = sampler.sample(model, noise, labels, generator)

A sampler is built once from the objective a model was trained with and the sampling settings, and
is used identically by the training grids, the in-training FID and sample.py. Adding a sampler = one
class with a ``name`` (plus one line in the SAMPLERS list, dit/diffusion/registry.py) that lists the
objectives it can sample and implements
``run(denoiser, noise, y, generator)``; its keyword arguments are the sampler-specific options
(``SamplingSettings.options``, e.g. DDIM's eta), checked when it is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from dit.diffusion.gaussian_diffusion import GaussianDiffusion
from dit.diffusion.objective import Objective

__all__ = ["DDIMSampler", "DDPMSampler", "Sampler", "SamplingSettings", "guided_model", "sample_loop"]


@dataclass
class SamplingSettings:
    """How to sample: the same keys in sample.py, the training grids and the in-training FID."""

    sampler: str | None = None  # a key of SAMPLERS; null = the objective's default (ddpm: ddpm, flow: euler)
    steps: int = 250  # model evaluations per image (x2 with guidance)
    cfg_scale: float = 1.0  # classifier-free guidance; 1 = unguided
    guidance_channels: int | None = None  # null = every eps channel; 3 = the original DiT code (its FIDs)
    cfg_interval: list[float] | None = None  # [lo, hi]: guide only at noise levels in it (Kynkaanniemi et al. 2024)
    options: dict[str, Any] = field(
        default_factory=dict
    )  # sampler-specific keyword arguments, e.g. {eta: 1.0} for ddim


def guided_model(
    model: Callable,
    cfg_scale: float,
    null_class: int,
    guidance_channels: int | None = None,
    interval: list[float] | None = None,
    noise_level: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Callable:
    """Wrap model(x, t, y) so that it returns guided outputs for N images from ONE forward of 2N.

    out = out(x | null) + cfg_scale * (out(x | y) - out(x | null)) on the first ``guidance_channels``
    output channels (all of the input's channels by default; 3 reproduces the original DiT code, which
    guided only the first three of the four latent channels). The remaining channels (v, and unguided
    channels) come from the conditional branch. With ``interval`` = [lo, hi], steps whose noise level
    (``noise_level(t)``, 1 = pure noise) lies outside it run the conditional model alone (one forward of N).
    """

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if interval is not None:
            level = float(noise_level(t[:1])[0])
            if not interval[0] <= level <= interval[1]:
                return model(x, t, y)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
        cond, uncond = out.chunk(2)
        g = x.shape[1] if guidance_channels is None else guidance_channels
        guided = uncond[:, :g] + cfg_scale * (cond[:, :g] - uncond[:, :g])
        return torch.cat([guided, cond[:, g:]], dim=1)

    return fn


class Sampler:
    """Base class: holds the objective and the settings; ``sample`` applies guidance, ``run`` the steps."""

    name: ClassVar[str]
    objectives: ClassVar[tuple[str, ...]]  # names of the objectives whose models it can sample

    def __init__(self, objective: Objective, settings: SamplingSettings):
        self.objective, self.settings = objective, settings

    def check_model(self, model) -> None:
        """Guidance needs the learned null class: a clear error instead of silently unguided samples."""
        if self.settings.cfg_scale != 1.0 and not model.y_embedder.has_null_class:
            raise ValueError(
                f"cfg_scale={self.settings.cfg_scale} needs a null class; this model was trained without label dropout "
                "(model.class_dropout_prob=0): sample with cfg_scale=1"
            )

    def denoiser(self, model) -> Callable:
        """model(x, t, y), guided as the settings say."""
        self.check_model(model)
        s = self.settings
        if s.cfg_scale == 1.0:
            return model
        interval = [float(v) for v in s.cfg_interval] if s.cfg_interval is not None else None
        return guided_model(
            model, s.cfg_scale, model.num_classes, s.guidance_channels, interval, self.objective.noise_level
        )

    @torch.no_grad()
    def sample(
        self, model, noise: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """x_0 from x_T = noise for labels y. Deterministic for a given generator state."""
        return self.run(self.denoiser(model), noise, y, generator)

    def run(
        self, denoiser: Callable, noise: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        raise NotImplementedError


@torch.no_grad()
def sample_loop(
    diffusion: GaussianDiffusion,
    model_fn: Callable,
    noise: torch.Tensor,
    y: torch.Tensor,
    sampler: str = "ddpm",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip_denoised: bool = False,
) -> torch.Tensor:
    """Run the reverse chain of a (respaced) GaussianDiffusion from x_T = noise to x_0: ancestral DDPM
    or DDIM steps. Deterministic for a given generator state (one normal draw per step for both)."""
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"unknown sampler {sampler!r}; valid: ddpm, ddim")
    x = noise
    for i in reversed(range(diffusion.num_timesteps)):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        out = model_fn(x, diffusion.model_timesteps(t), y)
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if sampler == "ddpm":
            x, _ = diffusion.p_sample(out, x, t, z, clip_denoised)
        else:
            x, _ = diffusion.ddim_sample(out, x, t, z, eta, clip_denoised)
    return x


class DDPMSampler(Sampler):
    """Ancestral sampling (DDPM, Ho et al. 2020) on the ADM-respaced chain of ``steps`` steps.
    variance_type: null = the one trained (learned_range for DiT); fixed_small / fixed_large ignore v."""

    name = "ddpm"
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

    def run(self, denoiser, noise, y, generator):
        return sample_loop(
            self.chain, denoiser, noise, y, "ddpm", generator=generator, clip_denoised=self.clip_denoised
        )


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021, eq. 12) on the ADM-respaced chain; eta = 0 deterministic, 1 = DDPM's variance."""

    name = "ddim"
    objectives = ("ddpm",)

    def __init__(
        self, objective: GaussianDiffusion, settings: SamplingSettings, eta: float = 0.0, clip_denoised: bool = False
    ):
        super().__init__(objective, settings)
        self.chain = objective.respaced(str(settings.steps))
        self.eta, self.clip_denoised = float(eta), clip_denoised

    def run(self, denoiser, noise, y, generator):
        return sample_loop(self.chain, denoiser, noise, y, "ddim", self.eta, generator, self.clip_denoised)
