"""Fast samplers for DDPM-trained models through diffusers' schedulers (reused, not rewritten):
DPM-Solver++(2M) (Lu et al. 2022) and UniPC (Zhao et al. 2023), ~10-25 model calls per image.

The scheduler is built from the objective's own betas (``trained_betas``), so a cosine-trained model
is sampled with its cosine schedule. The model's epsilon channels are passed to the scheduler; a
learned variance (DiT's v channels) is not used by these deterministic solvers. Guidance (with
``cfg_interval``) is applied by the Sampler base class, as for every sampler.
"""

from __future__ import annotations

import torch

from dit.diffusion.gaussian_diffusion import GaussianDiffusion
from dit.diffusion.sampler import Sampler
from dit.diffusion.settings import SamplingSettings

__all__ = ["DiffusersSolver", "DPMSolverPlusPlus", "UniPC"]


class DiffusersSolver(Sampler):
    """A diffusers multistep scheduler driven over ``steps`` model calls (its own timestep spacing)."""

    objectives = ("ddpm",)

    def __init__(self, objective: GaussianDiffusion, settings: SamplingSettings, **scheduler_kwargs):
        super().__init__(objective, settings)
        if objective.timestep_map.numel() != objective.num_train_timesteps:
            raise ValueError("build the solver from the training objective, not a respaced chain")
        self.scheduler = self.make_scheduler(
            num_train_timesteps=objective.num_train_timesteps,
            trained_betas=objective.betas.numpy(),
            prediction_type="epsilon",
            **scheduler_kwargs,
        )

    def make_scheduler(self, **kwargs):
        raise NotImplementedError

    def run(self, denoiser, noise, y, generator):
        scheduler = self.scheduler
        scheduler.set_timesteps(self.settings.steps, device=noise.device)
        C = noise.shape[1]
        x = noise * scheduler.init_noise_sigma  # 1 for these variance-preserving schedulers
        for t in scheduler.timesteps:
            t_batch = torch.full((len(x),), int(t), device=x.device, dtype=torch.long)
            eps = denoiser(x, t_batch, y)[:, :C]  # epsilon; learned-variance channels unused
            x = scheduler.step(eps, t, x, return_dict=False)[0]
        return x


class DPMSolverPlusPlus(DiffusersSolver):
    """DPM-Solver++ multistep (2M by default) via diffusers' DPMSolverMultistepScheduler."""

    name = "dpmpp"

    def __init__(
        self, objective, settings, order: int = 2, lower_order_final: bool = True, use_karras_sigmas: bool = False
    ):
        super().__init__(
            objective,
            settings,
            solver_order=order,
            lower_order_final=lower_order_final,
            use_karras_sigmas=use_karras_sigmas,
        )

    def make_scheduler(self, **kwargs):
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **kwargs)


class UniPC(DiffusersSolver):
    """UniPC multistep (bh2, order 2 by default) via diffusers' UniPCMultistepScheduler."""

    name = "unipc"

    def __init__(self, objective, settings, order: int = 2, solver_type: str = "bh2"):
        super().__init__(objective, settings, solver_order=order, solver_type=solver_type)

    def make_scheduler(self, **kwargs):
        from diffusers import UniPCMultistepScheduler

        return UniPCMultistepScheduler(**kwargs)
