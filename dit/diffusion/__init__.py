"""Training objectives and samplers, each in one registry, chosen by config.

Objectives (``diffusion=``): "ddpm" (GaussianDiffusion: ADM/DiT, linear or cosine schedule, learned
sigma). Samplers (``sampler=``): "ddpm" (ancestral), "ddim", and diffusers' "dpmpp" (DPM-Solver++)
and "unipc" for DDPM models; "flow" (SiT's flow matching) with "euler", "heun", "euler_maruyama" and "dpmpp"
(diffusers' DPM-Solver++ with flow sigmas; also for the few-step models at interval 0);
classifier-free guidance (optionally in a noise-level interval) for all of them.
"""

from dit.diffusion.flow import FlowMatching
from dit.diffusion.gaussian_diffusion import GaussianDiffusion, create_diffusion
from dit.diffusion.objective import Objective
from dit.diffusion.registry import (
    GUIDANCE,
    OBJECTIVES,
    PURPOSES,
    SAMPLERS,
    build_objective,
    build_sampler,
    check_sampling,
    sampler_name,
)
from dit.diffusion.sampler import ChainSampler, Sampler, guided_model
from dit.diffusion.schedule import get_betas, respace_betas, space_timesteps
from dit.diffusion.settings import SamplingSettings
from dit.diffusion.solvers import DPMSolverPlusPlus, FlowDPMSolverPlusPlus, UniPC

__all__ = [
    "GUIDANCE",
    "FlowMatching",
    "OBJECTIVES",
    "PURPOSES",
    "SAMPLERS",
    "ChainSampler",
    "DPMSolverPlusPlus",
    "FlowDPMSolverPlusPlus",
    "GaussianDiffusion",
    "UniPC",
    "Objective",
    "Sampler",
    "SamplingSettings",
    "build_objective",
    "build_sampler",
    "check_sampling",
    "create_diffusion",
    "get_betas",
    "guided_model",
    "respace_betas",
    "sampler_name",
    "space_timesteps",
]
