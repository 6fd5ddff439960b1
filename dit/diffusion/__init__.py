"""Training objectives and samplers, each in one registry, chosen by config.

Objectives (``diffusion=``): "ddpm" (GaussianDiffusion: ADM/DiT, linear or cosine schedule, learned
sigma). Samplers (``sampler=``): "ddpm" (ancestral), "ddim", and diffusers' "dpmpp" (DPM-Solver++)
and "unipc" for DDPM models; "flow" (SiT's flow matching) with "euler", "heun" and "euler_maruyama";
classifier-free guidance (optionally in a noise-level interval) for all of them.
"""

from dit.diffusion.flow import FlowMatching  # registers the flow objective and the euler, heun, euler_maruyama samplers
from dit.diffusion.gaussian_diffusion import GaussianDiffusion, create_diffusion
from dit.diffusion.objective import OBJECTIVES, Objective, build_objective, register_objective
from dit.diffusion.sampler import SAMPLERS, Sampler, SamplingSettings, build_sampler, guided_model, register_sampler, sample_loop
from dit.diffusion.schedule import get_betas, respace_betas, space_timesteps
from dit.diffusion.solvers import DPMSolverPlusPlus, UniPC  # registers the dpmpp and unipc samplers

__all__ = [
    "FlowMatching",
    "OBJECTIVES", "SAMPLERS", "DPMSolverPlusPlus", "GaussianDiffusion", "UniPC", "Objective", "Sampler", "SamplingSettings", "build_objective", "build_sampler",
    "create_diffusion", "get_betas", "guided_model", "register_objective", "register_sampler", "respace_betas", "sample_loop",
    "space_timesteps",
]  # fmt: skip
