"""Gaussian diffusion (ADM/DiT), respacing, DDPM and DDIM samplers with classifier-free guidance."""

from dit.diffusion.gaussian_diffusion import GaussianDiffusion, create_diffusion
from dit.diffusion.sampler import guided_model, sample_loop
from dit.diffusion.schedule import get_betas, respace_betas, space_timesteps

__all__ = ["GaussianDiffusion", "create_diffusion", "get_betas", "guided_model", "respace_betas", "sample_loop", "space_timesteps"]
