"""Flow matching as SiT trains and samples it (Ma et al. 2024, "SiT: Exploring Flow and Diffusion-based
Generative Models with Scalable Interpolant Transformers"; github.com/willisma/SiT, compared with commit
947f95bd3a510e9af441d38c1e9f72e0eee873c5, ``transport/``). The "flow" objective and its samplers
"euler", "heun" (probability-flow ODE) and "euler_maruyama" (SDE).

Conventions (SiT's Linear path with velocity prediction, ``create_transport("Linear", "velocity")``):

- time runs from noise to data: x_t = t * x1 + (1 - t) * x0 with x0 ~ N(0, I) the noise and x1 the
  data; t = 0 is pure noise, t = 1 the data (path.ICPlan: alpha_t = t, sigma_t = 1 - t);
- the network predicts the velocity u_t = dx_t/dt = x1 - x0 (ICPlan.compute_ut) and the loss is its
  per-sample mean squared error (Transport.training_losses, ``mean_flat``);
- the network sees t in [0, 1] itself as its timestep (SiT's model.forward passes t straight to the
  DiT TimestepEmbedder, whose sinusoid then only uses its low frequencies); ``noise_level(t) = 1 - t``
  is what guidance intervals are expressed in (1 = pure noise);
- train_eps / sample_eps: for Linear + velocity SiT's create_transport forces both to 0 ("stable
  everywhere"): training draws t on [0, 1), the ODE integrates over [0, 1] exactly, and the SDE starts
  at t = 0 (except with diffusion_form="SBDM", whose coefficient (1 - t) / t is infinite there: SiT
  starts it at sample_eps, which is an option here);
- with learn_sigma the DiT returns 2C channels; as SiT's model (which drops that half in forward) the
  first C are the velocity and the rest are ignored, in training (they get no gradient) and sampling.

Time sampling (``time_sampling``): "uniform" (SiT: t ~ U[0, 1)) or "logit_normal" (Esser et al. 2024,
SD3, section 3.1). SD3 draws its *noise level* s = sigmoid(n), n ~ N(logit_mean, logit_std^2), with
x = (1 - s) * data + s * noise; we keep that meaning for logit_mean (positive = more weight at high
noise, as in SD3) and set t = 1 - s = sigmoid(-n). With logit_mean = 0 both readings agree.

Samplers (``steps`` = SamplingSettings.steps):

- "euler", "heun": SiT's ``Sampler.sample_ode(sampling_method="euler" | "heun2")``, i.e. torchdiffeq's
  fixed-grid Euler / Heun2 on SiT's grid linspace(0, 1, num_steps). ``steps`` integration steps =
  SiT's num_steps = steps + 1 grid points; every step is a full step, the last one included (Heun
  evaluates the model at t = 1 too): Euler costs ``steps`` model evaluations, Heun 2 * ``steps``;
- "euler_maruyama": SiT's ``Sampler.sample_sde(sampling_method="Euler")``: dx = [v + w(t) * score] dt +
  sqrt(2 w(t)) dW on linspace(t0, t1, steps) (``steps`` = SiT's num_steps: steps - 1 noisy steps, then
  the noise-free last step from t1 = 1 - last_step_size), the score from the velocity as ICPlan's
  get_score_from_velocity: score = (t * v - x) / (1 - t). Options are SiT's knobs: diffusion_form
  (default "sigma", w(t) = 1 - t, SiT's command-line default; sample_sde's own default "SBDM" needs
  sample_eps > 0 here), diffusion_norm = 1.0, last_step = "Mean" (x + drift * last_step_size), last_step_size
  = 0.04, sample_eps = 0. Its noise comes from the generator passed to ``sample`` (one draw per step,
  before the model call, as SiT), so it is deterministic per seed. SiT evaluates the model twice per
  step (drift and score); once is enough for the same result. Two SiT forms fail in SiT itself and work
  here: "constant" (th.sqrt of a Python float in the Euler-Maruyama step) and "increasing-decreasing"
  (path.py spells its key "inccreasing-decreasing").
"""

from __future__ import annotations

import math

import torch

from dit.diffusion.objective import Objective, mean_flat
from dit.diffusion.sampler import Sampler
from dit.diffusion.settings import SamplingSettings

__all__ = [
    "DIFFUSION_FORMS",
    "LAST_STEPS",
    "TIME_SAMPLINGS",
    "EulerMaruyamaSampler",
    "EulerSampler",
    "FlowMatching",
    "HeunSampler",
]

TIME_SAMPLINGS = ("uniform", "logit_normal")
PREDICTIONS = ("velocity", "x")  # what the network outputs: the velocity (SiT), or the data x1 (JiT)
X_PREDICTION_EPS = 0.05  # x-prediction: 1 - t is clipped at this in the velocity (x1 - x_t) / (1 - t) (JiT's t_eps)
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
LAST_STEPS = (None, "Mean", "Tweedie", "Euler")


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, ...) in like's dtype and device."""
    return t.to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


class FlowMatching(Objective):
    """SiT's Linear interpolant with velocity prediction (see the module docstring for the conventions)."""

    name = "flow"

    loss_terms = ("loss",)
    default_sampler = "euler"  # SiT's ODE with Euler steps
    eval_sampler = "euler"
    # Settings added after runs were recorded, with their defaults (SiT's objective): left out of settings() --
    # so of checkpoints and exports -- and of the settings digest at their default, so older records still
    # describe the same objective.
    ADDED_SETTINGS = {"time_shift": 1.0, "contrastive_weight": 0.0, "prediction": "velocity"}

    def __init__(
        self,
        time_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        time_shift: float = 1.0,
        contrastive_weight: float = 0.0,
        prediction: str = "velocity",
    ):
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time_sampling {time_sampling!r}; valid: {', '.join(TIME_SAMPLINGS)}")
        if not float(logit_std) > 0:
            raise ValueError(f"logit_std={logit_std}: must be > 0")
        if not float(time_shift) > 0:
            raise ValueError(f"time_shift={time_shift}: must be > 0 (1 = no shift; SD3 uses 3 at 1024 px)")
        if not 0.0 <= float(contrastive_weight) < 1.0:
            raise ValueError(f"contrastive_weight={contrastive_weight}: need 0 <= weight < 1 (Stoica et al.: 0.05)")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        self.time_sampling, self.logit_mean, self.logit_std = time_sampling, float(logit_mean), float(logit_std)
        self.time_shift, self.contrastive_weight = float(time_shift), float(contrastive_weight)
        self.prediction = prediction
        if self.contrastive_weight > 0:  # the optimised loss, then its two parts (logged)
            self.loss_terms = ("loss", "flow_mse", "contrastive_mse")

    def settings(self) -> dict:
        sit = ("time_sampling", "logit_mean", "logit_std")  # SiT's; the added ones only where they differ from its
        return self.recorded({"name": self.name, **{k: getattr(self, k) for k in (*sit, *self.ADDED_SETTINGS)}})

    def shift(self, t):
        """SD3's time shift (Esser et al. 2024, eq. 23) of the noise level s = 1 - t: s' = a s / (1 + (a - 1) s),
        a = time_shift; a > 1 spends more of training and of the sampling grid at high noise. t: floats or a tensor."""
        if self.time_shift == 1.0:
            return t
        s = 1 - t
        return 1 - self.time_shift * s / (1 + (self.time_shift - 1) * s)

    def velocity(self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity the network's output stands for: itself (velocity prediction), or, predicting the data x1
        (Li & He 2025, "Back to Basics"), (x1 - x_t) / (1 - t), with 1 - t clipped at X_PREDICTION_EPS."""
        if self.prediction == "velocity":
            return out
        return (out - xt) / (1 - _per_sample(t, xt)).clamp_min(X_PREDICTION_EPS)

    def check_model(self, model) -> None:
        """Any DiT: with learn_sigma its extra C output channels are ignored (SiT drops them too)."""
        super().check_model(model)

    def draw(self, rng, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """t in [0, 1] (1 = data), then the noise x0: both from the step's SlicedRandom, in this order."""
        n = len(x)
        if self.time_sampling == "uniform":
            t = rng.rand(n)
        else:  # noise level s = sigmoid(N(mean, std)) as SD3; t = 1 - s = sigmoid(-N(mean, std))
            t = torch.sigmoid(-(self.logit_mean + self.logit_std * rng.randn((n,))))
        return {"t": self.shift(t), "noise": rng.randn(x.shape)}

    def interpolate(self, x1: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t = t * x1 + (1 - t) * x0 and its velocity u_t = x1 - x0 (SiT ICPlan.plan)."""
        tt = _per_sample(t, x1)
        return tt * x1 + (1 - tt) * x0, x1 - x0

    def losses(self, model, x, draw, model_kwargs) -> dict[str, torch.Tensor]:
        t = draw["t"].to(x.device, x.dtype)
        xt, ut = self.interpolate(x, t, draw["noise"].to(x.dtype))
        v = self.velocity(model(xt, t, **(model_kwargs or {}))[:, : x.shape[1]], xt, t)
        mse = mean_flat((v - ut) ** 2)
        if self.contrastive_weight == 0:
            return {"loss": mse}
        # Contrastive flow matching (Stoica et al. 2025, eq. 6): away from another sample's target, here the
        # previous sample's of the micro-batch (so this term depends on the per-process batch, not the global one).
        contrast = mean_flat((v - ut.roll(1, dims=0)) ** 2)
        return {"loss": mse - self.contrastive_weight * contrast, "flow_mse": mse, "contrastive_mse": contrast}

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """Model time t in [0, 1] (1 = data) -> 1 - t (1 = pure noise)."""
        return 1.0 - t.double()


class FlowSampler(Sampler):
    """Base of the flow samplers: the velocity of the (guided) model at a scalar time t. Few-step models
    (few_step.py) are flow models at interval 0: the ODE samplers take them too."""

    objectives = ("flow", "meanflow", "shortcut")

    def velocity(self, denoiser, x: torch.Tensor, t: float, y: torch.Tensor) -> torch.Tensor:
        """The (guided) model's velocity at x, t: its output as the objective reads it (FlowMatching.velocity)."""
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)  # SiT: th.ones(N).to(x) * t
        return self.objective.velocity(denoiser(x, tt, y)[:, : x.shape[1]], x, tt)

    def ode_grid(self) -> list[float]:
        """SiT's linspace(t0=0, t1=1, num_steps) with num_steps = steps + 1 (float64), time-shifted as trained."""
        grid = torch.linspace(0.0, 1.0, self.settings.steps + 1, dtype=torch.float64).tolist()
        return [self.objective.shift(t) for t in grid]


class EulerSampler(FlowSampler):
    """Probability-flow ODE, fixed-step Euler (SiT sample_ode(sampling_method="euler"))."""

    name = "euler"

    def run(self, denoiser, noise, y, generator):
        x, grid = noise, self.ode_grid()
        for t0, t1 in zip(grid[:-1], grid[1:]):
            x = x + (t1 - t0) * self.velocity(denoiser, x, t0, y)
        return x


class HeunSampler(FlowSampler):
    """Probability-flow ODE, fixed-step Heun (SiT sample_ode(sampling_method="heun2"): torchdiffeq's
    Heun2, k1 = v(x, t0), k2 = v(x + dt k1, t0 + dt), x += dt (k1 / 2 + k2 / 2), on every step)."""

    name = "heun"
    calls_per_step = 2

    def run(self, denoiser, noise, y, generator):
        x, grid = noise, self.ode_grid()
        for t0, t1 in zip(grid[:-1], grid[1:]):
            dt = t1 - t0
            k1 = self.velocity(denoiser, x, t0, y)
            k2 = self.velocity(denoiser, x + dt * k1, t0 + dt, y)
            x = x + dt * (k1 * 0.5 + k2 * 0.5)
        return x


class EulerMaruyamaSampler(FlowSampler):
    """SDE, Euler-Maruyama (SiT sample_sde(sampling_method="Euler")); options as SiT's (module docstring)."""

    name = "euler_maruyama"
    objectives = ("flow",)

    def __init__(
        self,
        objective: FlowMatching,
        settings: SamplingSettings,
        diffusion_form: str = "sigma",
        diffusion_norm: float = 1.0,
        last_step: str | None = "Mean",
        last_step_size: float = 0.04,
        sample_eps: float = 0.0,
    ):
        super().__init__(objective, settings)
        if diffusion_form not in DIFFUSION_FORMS:
            raise ValueError(f"unknown diffusion_form {diffusion_form!r}; valid: {', '.join(DIFFUSION_FORMS)}")
        if last_step not in LAST_STEPS:
            raise ValueError(f"unknown last_step {last_step!r}; valid: {', '.join(map(str, LAST_STEPS))} (None = null)")
        if settings.steps < 2:
            raise ValueError(
                f"steps={settings.steps}: euler_maruyama needs at least 2 (SiT's grid of num_steps points)"
            )
        if last_step is None:
            last_step_size = 0.0  # as SiT's sample_sde
        elif not 0.0 < float(last_step_size) < 1.0:
            raise ValueError(
                f"last_step_size={last_step_size}: need 0 < last_step_size < 1 with last_step={last_step!r}"
            )
        if not 0.0 <= float(sample_eps) < 1.0:
            raise ValueError(f"sample_eps={sample_eps}: need 0 <= sample_eps < 1")
        # SiT Transport.check_interval(sde=True, eval=True) for the Linear path with velocity prediction.
        t0 = float(sample_eps) if diffusion_form == "SBDM" else 0.0
        t1 = 1.0 - float(sample_eps) if last_step_size == 0 else 1.0 - float(last_step_size)
        if diffusion_form == "SBDM" and t0 == 0.0:
            raise ValueError(
                'diffusion_form="SBDM": its coefficient (1 - t) / t is infinite at t = 0 '
                "(SiT starts at sample_eps, which "
                "create_transport sets to 0 for a velocity model): pass sample_eps > 0, e.g. 0.001"
            )
        if t1 <= t0:
            raise ValueError(f"empty SDE interval [{t0}, {t1}]: lower last_step_size or sample_eps")
        if objective.time_shift != 1.0:
            raise ValueError(
                f"euler_maruyama samples SiT's uniform SDE grid; this model was trained with time_shift="
                f"{objective.time_shift}: sample it with euler or heun (their grids are shifted as trained)"
            )
        self.diffusion_form, self.diffusion_norm = diffusion_form, float(diffusion_norm)
        self.last_step, self.last_step_size = last_step, float(last_step_size)
        self.t0, self.t1 = t0, t1

    def diffusion(self, t: float) -> float:
        """w(t) (SiT ICPlan.compute_diffusion); the SDE's noise is sqrt(2 w(t)) dW."""
        n, form = self.diffusion_norm, self.diffusion_form
        if form == "constant":
            return n
        if form == "SBDM":
            return n * (1 - t) / t  # n * (alpha'/alpha * sigma^2 - sigma * sigma') for alpha = t, sigma = 1 - t
        if form in ("sigma", "linear"):
            return n * (1 - t)
        if form == "decreasing":
            return 0.25 * (n * math.cos(math.pi * t) + 1) ** 2
        return n * math.sin(math.pi * t) ** 2  # increasing-decreasing

    def drift(self, denoiser, x, t: float, y) -> tuple[torch.Tensor, torch.Tensor]:
        """(v, score) at (x, t): score = (t v - x) / (1 - t) (ICPlan.get_score_from_velocity)."""
        v = self.velocity(denoiser, x, t, y)
        return v, (t * v - x) / (1 - t)

    def run(self, denoiser, noise, y, generator):
        grid = torch.linspace(self.t0, self.t1, self.settings.steps, dtype=torch.float64).tolist()
        dt = grid[1] - grid[0]
        x = noise
        for t in grid[:-1]:
            w = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            v, score = self.drift(denoiser, x, t, y)
            d = self.diffusion(t)
            x = x + (v + d * score) * dt + math.sqrt(2 * d) * (w * math.sqrt(dt))
        t = self.t1
        if self.last_step == "Mean":
            v, score = self.drift(denoiser, x, t, y)
            x = x + (v + self.diffusion(t) * score) * self.last_step_size
        elif self.last_step == "Tweedie":
            _, score = self.drift(denoiser, x, t, y)
            x = x / t + (1 - t) ** 2 / t * score
        elif self.last_step == "Euler":
            x = x + self.velocity(denoiser, x, t, y) * self.last_step_size
        return x
