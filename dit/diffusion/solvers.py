"""Fast samplers through diffusers' schedulers (reused, not rewritten): DPM-Solver++(2M) (Lu et al. 2022) for DDPM and
flow models, UniPC (Zhao et al. 2023) for DDPM models, ~10-25 model calls per image.

DDPM models: the scheduler is built from the objective's own betas (``trained_betas``), so a cosine-trained model
is sampled with its cosine schedule. The model's epsilon channels are passed to the scheduler; a
learned variance (DiT's v channels) is not used by these deterministic solvers. Guidance (with
``cfg_interval``) is applied by the Sampler base class, as for every sampler.

Flow models ("flow", and the few-step models at interval 0): the scheduler with flow sigmas
(``use_flow_sigmas``, ``prediction_type="flow_prediction"``), whose convention is x = (1 - sigma) data + sigma noise
and output noise - data: sigma = 1 - t and its model output is -v. Its grid is the Euler sampler's (flow.py
ode_grid, time-shifted as trained), so the first model call is at t = 0 on the noise itself; diffusers' own flow
grid starts at sigma = 1 - 1 / num_train_timesteps, so it is replaced after ``set_timesteps``.
"""

from __future__ import annotations

import torch

from dit.diffusion.flow import FlowSampler
from dit.diffusion.gaussian_diffusion import GaussianDiffusion
from dit.diffusion.sampler import Sampler
from dit.diffusion.settings import SamplingSettings

__all__ = ["DiffusersSolver", "DPMSolverPlusPlus", "FlowDPMSolverPlusPlus", "UniPC"]


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
    """DPM-Solver++ multistep (2M by default) via diffusers' DPMSolverMultistepScheduler. A flow model's (one name
    for both kinds of model) is FlowDPMSolverPlusPlus, with the same options."""

    name = "dpmpp"
    objectives = ("ddpm", *FlowSampler.objectives)

    def __new__(cls, objective=None, *args, **kwargs):  # (no arguments: copy and pickle make an empty one)
        if getattr(objective, "name", None) in FlowDPMSolverPlusPlus.objectives:
            return FlowDPMSolverPlusPlus(objective, *args, **kwargs)
        return super().__new__(cls)

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


class FlowDPMSolverPlusPlus(FlowSampler):
    """DPM-Solver++ multistep (2M by default) for a flow model: diffusers' DPMSolverMultistepScheduler with flow
    sigmas on the Euler sampler's grid (module docstring). ``steps`` model calls, at t = grid[0] = 0 .. grid[-2].
    From sigma = 1 (lambda = log(alpha / sigma) = -inf) the first step is an Euler step and the second's multistep
    correction is zero (the previous lambda is infinitely far); the last, to sigma = 0, is first order (diffusers'
    ``final_sigmas_type="zero"``) and returns the predicted data x + (1 - t) v, an Euler step too. Order 1 is Euler.
    diffusers computes the sample's term in float32 (1e-7 relative), whatever the input's dtype."""

    name = "dpmpp"

    def __init__(
        self, objective, settings, order: int = 2, lower_order_final: bool = True, use_karras_sigmas: bool = False
    ):
        super().__init__(objective, settings)
        if use_karras_sigmas:
            raise ValueError(
                "use_karras_sigmas: a DDPM model's grid; a flow model's is the Euler sampler's, time-shifted as trained"
            )
        from diffusers import DPMSolverMultistepScheduler

        self.scheduler = DPMSolverMultistepScheduler(
            algorithm_type="dpmsolver++",
            solver_order=order,
            lower_order_final=lower_order_final,
            use_flow_sigmas=True,
            prediction_type="flow_prediction",
        )

    def run(self, denoiser, noise, y, generator):
        scheduler, grid = self.scheduler, self.ode_grid()
        scheduler.set_timesteps(self.settings.steps)  # resets the multistep state; its grid is replaced:
        scheduler.sigmas = torch.tensor([1.0 - t for t in grid], dtype=torch.float64)  # 1 .. 0
        scheduler.timesteps = scheduler.sigmas[:-1] * scheduler.config.num_train_timesteps  # diffusers' definition
        scheduler.set_begin_index(0)
        x = noise
        for i, t in enumerate(grid[:-1]):
            v = self.velocity(denoiser, x, t, y)
            x = scheduler.step(-v, scheduler.timesteps[i], x, return_dict=False)[0]  # its output: noise - data = -v
        return x


class UniPC(DiffusersSolver):
    """UniPC multistep (bh2, order 2 by default) via diffusers' UniPCMultistepScheduler."""

    name = "unipc"

    def __init__(self, objective, settings, order: int = 2, solver_type: str = "bh2"):
        super().__init__(objective, settings, solver_order=order, solver_type=solver_type)

    def make_scheduler(self, **kwargs):
        from diffusers import UniPCMultistepScheduler

        return UniPCMultistepScheduler(**kwargs)
