"""Sampling loops (ancestral DDPM, DDIM) and classifier-free guidance (Ho & Salimans 2022)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dit.diffusion.gaussian_diffusion import GaussianDiffusion

SAMPLERS = ("ddpm", "ddim")


def guided_model(model: Callable, cfg_scale: float, null_class: int, guidance_channels: int | None = None) -> Callable:
    """Wrap model(x, t, y) so that it returns guided outputs for N images from ONE forward of 2N.

    eps = eps(x | null) + cfg_scale * (eps(x | y) - eps(x | null)) on the first ``guidance_channels``
    output channels (all eps channels by default; 3 reproduces the original DiT code, which guided
    only the first three of the four latent channels). The remaining channels (v, and unguided eps
    channels) come from the conditional branch.
    """

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
        cond, uncond = out.chunk(2)
        g = x.shape[1] if guidance_channels is None else guidance_channels
        eps = uncond[:, :g] + cfg_scale * (cond[:, :g] - uncond[:, :g])
        return torch.cat([eps, cond[:, g:]], dim=1)

    return fn


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
    """Run the reverse chain from x_T = noise to x_0. Deterministic for a given generator state."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
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
