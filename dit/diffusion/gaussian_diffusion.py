"""Gaussian diffusion as DiT trains and samples it (ADM: Nichol & Dhariwal 2021; DDPM: Ho et al. 2020).

The model predicts epsilon and, with learned sigma, v in [-1, 1] that interpolates the log variance
between the posterior variance and beta_t (ADM eq. 15). The loss is the epsilon MSE plus the
variational bound with a stop-gradient on the mean (ADM section 3.1, "L_hybrid").

All schedule tables are float64; they are cast to the input's dtype only when used.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from dit.diffusion.objective import Objective, mean_flat
from dit.diffusion.schedule import get_betas, respace_betas, space_timesteps

__all__ = ["GaussianDiffusion", "create_diffusion", "normal_kl", "discretized_gaussian_log_likelihood"]

VARIANCE_TYPES = ("learned_range", "fixed_small", "fixed_large")


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF used by ADM (kept for identical losses)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log p(x) of data in [-1, 1] discretised to 256 bins under N(means, exp(log_scales)^2) (DDPM eq. 13)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class GaussianDiffusion(Objective):
    """Forward noising, posterior, model mean/variance, loss, and the DDPM / DDIM steps.

    ``timestep_map`` maps this chain's indices 0..T'-1 to the timesteps the model was trained on
    (identity unless respaced), so a respaced chain calls the model with original timesteps.
    As an Objective ("ddpm", DiT's): uniform integer timesteps, epsilon MSE (+ VB with learned sigma).
    ``config`` holds the settings it was built from (create_diffusion), what checkpoints record.
    """

    def __init__(
        self,
        betas: np.ndarray,
        variance_type: str = "learned_range",
        timestep_map: list[int] | None = None,
        config: dict | None = None,
    ):
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"unknown variance_type {variance_type!r}; valid: {', '.join(VARIANCE_TYPES)}")
        betas = np.asarray(betas, dtype=np.float64)
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.variance_type = variance_type
        self.num_timesteps = len(betas)
        self.timestep_map = torch.tensor(timestep_map if timestep_map is not None else range(len(betas)))
        self.config = config
        # The length of the chain the model was trained on (timestep_map's range).
        self.num_train_timesteps = config["diffusion_steps"] if config else len(betas)

        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)  # DDPM eq. 7
        tables = dict(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1),
            posterior_variance=posterior_variance,
            # The posterior variance is 0 at t = 0: its log is clipped to the value at t = 1.
            posterior_log_variance_clipped=np.log(np.append(posterior_variance[1], posterior_variance[1:])),
            posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
            log_betas=np.log(betas),
            # "fixed_large" uses beta_t, with the posterior variance at t = 0 (ADM).
            fixed_large_log_variance=np.log(np.append(posterior_variance[1], betas[1:])),
        )
        for name, value in tables.items():
            setattr(self, name, torch.from_numpy(value))

    # --- as an Objective ---------------------------------------------------------------------

    name = "ddpm"
    default_sampler = "ddpm"  # DiT's: ancestral sampling
    eval_sampler = "ddim"  # deterministic, good in 25 steps

    @classmethod
    def from_settings(
        cls, noise_schedule: str = "linear", diffusion_steps: int = 1000, variance_type: str = "learned_range"
    ):
        return create_diffusion(None, noise_schedule, diffusion_steps, variance_type)

    def settings(self) -> dict:
        if self.config is None:
            raise ValueError(
                "this GaussianDiffusion was built from raw betas; build it with create_diffusion to save its settings"
            )
        return {"name": self.name, **self.config}

    @property
    def loss_terms(self) -> tuple[str, ...]:
        return ("loss", "mse", "vb") if self.variance_type == "learned_range" else ("loss", "mse")

    def check_model(self, model) -> None:
        super().check_model(model)
        if self.variance_type == "learned_range" and not model.learn_sigma:
            raise ValueError("diffusion.variance_type=learned_range needs model.learn_sigma=true")

    def draw(self, rng, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Uniform timesteps of this chain and Gaussian noise (in this order: resumes draw the same)."""
        t = rng.randint(self.num_timesteps, len(x))
        return {"t": t, "noise": rng.randn(x.shape)}

    def losses(self, model, x, draw, model_kwargs) -> dict[str, torch.Tensor]:
        return self.training_losses(model, x, draw["t"], model_kwargs, noise=draw["noise"])

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """Model timestep t in 0..T-1 -> t / (T - 1): 1 at pure noise, 0 at the last denoising step."""
        return t.double() / max(self.num_train_timesteps - 1, 1)

    def respaced(self, spacing: str | int | None, variance_type: str | None = None) -> GaussianDiffusion:
        """The same schedule visiting fewer steps (ADM respacing), e.g. "250" or "ddim50", for samplers."""
        if self.config is None:
            raise ValueError("cannot respace a GaussianDiffusion built from raw betas")
        return create_diffusion(
            spacing, **{**self.config, "variance_type": variance_type or self.config["variance_type"]}
        )

    # --- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _extract(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] as (N, 1, 1, ...) in like's dtype and device."""
        out = table.to(like.device)[t.to(like.device)].to(like.dtype)
        return out.reshape(-1, *([1] * (like.dim() - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Chain indices -> the timesteps the model was trained with."""
        return self.timestep_map.to(t.device)[t]

    # --- forward process and posterior -------------------------------------------------------

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (DDPM eq. 4)."""
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7)."""
        mean = (
            self._extract(self.posterior_mean_coef1, t, x_t) * x_start
            + self._extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        return (
            mean,
            self._extract(self.posterior_variance, t, x_t),
            self._extract(self.posterior_log_variance_clipped, t, x_t),
        )

    def predict_xstart(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, x_start: torch.Tensor) -> torch.Tensor:
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x_start) / self._extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    # --- the model's distribution ------------------------------------------------------------

    def p_mean_variance(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False
    ):
        """From the raw model output (eps, or eps and v), the mean and log variance of p(x_{t-1} | x_t).

        Returns a dict with mean, log_variance, pred_xstart, eps.
        """
        C = x_t.shape[1]
        if self.variance_type == "learned_range":
            if model_output.shape[1] != 2 * C:
                raise ValueError(f"learned_range needs 2*{C} output channels (eps, v), got {model_output.shape[1]}")
            eps, v = model_output[:, :C], model_output[:, C:]
            min_log = self._extract(self.posterior_log_variance_clipped, t, x_t)
            max_log = self._extract(self.log_betas, t, x_t)
            frac = (v + 1) / 2  # v in [-1, 1] -> interpolation weight (ADM eq. 15)
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            eps = model_output[:, :C]  # a learned-sigma model sampled with a fixed variance ignores v
            table = (
                self.posterior_log_variance_clipped
                if self.variance_type == "fixed_small"
                else self.fixed_large_log_variance
            )
            log_variance = self._extract(table, t, x_t).expand_as(x_t)
        pred_xstart = self.predict_xstart(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
            eps = self.predict_eps(x_t, t, pred_xstart)
        mean, _, _ = self.q_posterior(pred_xstart, x_t, t)
        return dict(mean=mean, log_variance=log_variance, pred_xstart=pred_xstart, eps=eps)

    # --- training ----------------------------------------------------------------------------

    def vb_terms_bpd(self, model_output, x_start, x_t, t) -> torch.Tensor:
        """The variational-bound term L_t in bits per dim: KL for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -mean_flat(
            discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        ) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self, model: Callable, x_start: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None, noise=None
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses: {"loss", "mse", "vb"}; loss = mse + vb with learned sigma (L_hybrid)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        model_output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        C = x_start.shape[1]
        terms = {"mse": mean_flat((noise - model_output[:, :C]) ** 2)}
        if self.variance_type == "learned_range":
            # Stop-gradient on the mean: the VB term trains only the variance (ADM section 3.1).
            frozen = torch.cat([model_output[:, :C].detach(), model_output[:, C:]], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    # --- sampling steps ----------------------------------------------------------------------

    def p_sample(self, model_output, x_t, t, noise, clip_denoised: bool = False):
        """One ancestral DDPM step: x_{t-1} = mean + sigma * noise (no noise at t = 0)."""
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised)
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise, out["pred_xstart"]

    def ddim_sample(self, model_output, x_t, t, noise, eta: float = 0.0, clip_denoised: bool = False):
        """One DDIM step (Song et al. 2021, eq. 12); eta = 1 has DDPM's variance, eta = 0 is deterministic."""
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised)
        eps = self.predict_eps(x_t, t, out["pred_xstart"])
        alpha_bar = self._extract(self.alphas_cumprod, t, x_t)
        alpha_bar_prev = self._extract(self.alphas_cumprod_prev, t, x_t)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
        return mean + nonzero * sigma * noise, out["pred_xstart"]


def create_diffusion(
    timestep_respacing: str | int | None = None,
    noise_schedule: str = "linear",
    diffusion_steps: int = 1000,
    variance_type: str = "learned_range",
) -> GaussianDiffusion:
    """DiT's diffusion: 1000 linear steps; respaced (e.g. "250", "ddim50") for sampling."""
    betas = get_betas(noise_schedule, diffusion_steps)
    config = dict(noise_schedule=noise_schedule, diffusion_steps=diffusion_steps, variance_type=variance_type)
    if timestep_respacing in (None, "", diffusion_steps, str(diffusion_steps)):
        return GaussianDiffusion(betas, variance_type, config=config)
    kept = space_timesteps(diffusion_steps, timestep_respacing)
    return GaussianDiffusion(respace_betas(betas, kept), variance_type, timestep_map=kept, config=config)
