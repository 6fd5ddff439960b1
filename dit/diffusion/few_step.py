"""Few-step objectives: MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling") and shortcut models
(Frans et al. 2025, "One Step Diffusion via Shortcut Models"), and the sampler that takes their steps ("meanflow",
also registered as "shortcut"): one or two model calls an image instead of 25-250.

Conventions as flow.py (SiT's linear path): x_t = t * x1 + (1 - t) * x0, t = 0 the noise x0, t = 1 the data x1,
v = x1 - x0. The network has an interval input (model.interval_input: a second time embedding added to t's) and
predicts the **average velocity** from t to t + h,

    u(x_t, t, h) = 1/h * integral_t^{t+h} v(x_s, s) ds,    so    x_{t+h} = x_t + h u(x_t, t, h),

and at h = 0 the instantaneous velocity v: a few-step model is a flow model at h = 0 (Euler and Heun sample it
there), and a flow model fine-tuned into one (init_from) starts where it was, the interval embedding's output being
zero at first.

**MeanFlow** ("meanflow"). The papers write time the other way (t_p = 1 - t: data at 0, noise at 1) and the network as
u_p(z, r, t) with t_p >= r_p; here h = t_p - r_p and u = -u_p, v = -v_p, so the MeanFlow identity
u_p = v_p - (t_p - r_p) du_p/dt_p reads u = v + h du/dt, du/dt = v . d_x u + d_t u, the total derivative along the
trajectory with the end time r = t + h held (a forward-mode JVP with tangents (v, 1, 0) for (x, t, r)). The loss is the
squared error to the stop-gradient target v + h du/dt, summed over the image, with the adaptive weight
1 / sg(error + norm_eps)^norm_p (the paper's Eq. 11; Gsunshine/py-meanflow, commit 1f6d72d, models/meanflow.py).
(t_p, r_p) are two logit-normal draws sorted so t_p >= r_p, and r_p = t_p except on a share `interval_share` of the
samples (py-meanflow's sampler "v0", the paper's; its defaults for ImageNet: logit-normal(-0.4, 1.0), 25% r != t,
p = 1). Classifier-free guidance is folded into the target (the paper's Sec. 4.2, Eq. 19): the velocity becomes
omega v + kappa u(x_t, t, 0 | c) + (1 - omega - kappa) u(x_t, t, 0 | null) for the labelled samples whose noise level
lies in `guidance_interval`, the network's own h = 0 outputs standing for the guided field; a 1-call sample is then
guided without a second branch (omega = 1, kappa = 0: unguided). `tangent="predicted"` is improved MeanFlow's
(iMF, Geng et al. 2025b, Sec. 4.1): the JVP's x-tangent is the network's own instantaneous velocity u(x_t, t, 0)
(the guided field where guidance is folded in, which its h = 0 output learns) instead of the sample's v, so the
compound prediction u + h sg(du/dt) is a function of x_t alone regressed on v: the same loss with that tangent.
`guidance_input=true` is iMF's guidance as conditions (Sec. 4.2; its official code, imf.py): a model with a guidance
input (model.guidance_input) is told the guidance g = (scale w, lo, hi), which each sample draws (w from a power
distribution on [1, 1 + guidance_max], [lo, hi] within [0, 0.5] x [0.5, 1]; [0, 1] at h = 0), and learns the field
guided at w within [lo, hi] (the target v + (1 - 1/w) (v_c - v_u), v_c the network's own h = 0 output at (w, 0, 1),
v_u the null class's at (1, 0, 1)); it is then guided at any scale chosen after training in one call an image
(`guidance=input`, dit/diffusion/sampler.py). iMF pairs it with tangent="predicted" (the JVP along v_c); with the
default tangent the JVP runs along the guided target, MeanFlow's choice. Not built: iMF's auxiliary v-head (the
h = 0 output stands for it).

The JVP pass, and why it is a pass of its own: the target is a stop-gradient, so du/dt is computed without autograd
(torch.func.jvp under no_grad) on the module under any DistributedDataParallel wrapper, and the prediction u that the
loss back-propagates is an ordinary forward through the wrapper. DDP therefore synchronises the gradients as for any
objective (calling the inner module for the loss's own forward would skip that silently), at one forward more than
reusing the JVP's primal output. Forward-mode AD has no SDPA flash or memory-efficient kernel (nor a CPU one): the JVP
pass runs attention on the math backend, with the fused adaLN kernel (no forward-mode rule) off and autocast off.

**Shortcut models** ("shortcut"). The same interval input is the step size d. A share `bootstrap_share` of the samples
(each with that probability; the official code takes the first quarter of each device's batch) learns
self-consistency: for d = 2^k / max_steps (k uniform in 0 .. log2(max_steps) - 1) and t on the grid of multiples of 2d,
the target of u(x_t, t, 2d) is the mean of the two half steps u(x_t, t, d) and u(x_t + d u(x_t, t, d), t + d, d),
without gradient; the rest learn flow matching at d = 0 (target v). No JVP: every attention kernel and DDP work
unchanged. The smallest step 1/max_steps is the flow velocity (the model is queried at h = 0 there, as the official
code's finest level is its flow-matching level), so a shortcut model samples with
power-of-two step counts up to max_steps.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dit.diffusion.flow import FlowMatching, _per_sample
from dit.diffusion.objective import Objective, mean_flat
from dit.diffusion.sampler import Sampler
from dit.diffusion.settings import SamplingSettings
from dit.models.embeddings import GuidanceEmbedder
from dit.models.flops import count_config

__all__ = ["FewStepSampler", "MeanFlow", "Shortcut", "ShortcutSampler", "jvp_pass"]


JVP_FORWARDS = 3  # a JVP through the DiT costs three forwards' FLOPs (FlopCounterMode: the primal, and the tangent
# whose products with two varying factors, attention's, are two)


def forward_flops(config) -> float:
    """FLOPs of one image's forward through the DiT (2 a multiply-add, as training_flops)."""
    return count_config(config)["gflops"] * 2e9


def _rows(kwargs: dict, keep: torch.Tensor) -> dict:
    """The model's keyword arguments for the samples `keep` selects (per-sample tensors indexed, others as is)."""
    n = len(keep)
    return {k: a[keep] if torch.is_tensor(a) and len(a) == n else a for k, a in kwargs.items()}


def _label_and_null(inner, xt: torch.Tensor, t: torch.Tensor, kwargs: dict, **doubled) -> tuple[torch.Tensor, ...]:
    """The network's h = 0 outputs (the input's channels) for each sample's label and for the null class, from one
    forward of 2N: the per-sample keyword arguments repeated, `doubled` given for both halves (2N rows) as they are."""
    n, c = len(xt), xt.shape[1]
    both = {k: torch.cat([a, a]) if torch.is_tensor(a) and len(a) == n else a for k, a in kwargs.items()}
    both |= doubled | {"force_drop_ids": torch.cat([torch.zeros(n), torch.ones(n)]).to(xt.device, torch.long)}
    zero = torch.zeros(2 * n, device=xt.device, dtype=t.dtype)
    return inner(torch.cat([xt, xt]), torch.cat([t, t]), h=zero, **both)[:, :c].chunk(2)


def _inner(model):
    """The module under a DistributedDataParallel wrapper (itself otherwise): for the passes that do not
    back-propagate. DDP's own forward is kept for the one that does, so that it synchronises the gradients."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def jvp_pass(module, device_type: str):
    """What a forward-mode pass through a DiT needs: attention on SDPA's math backend (the flash and memory-efficient
    kernels have no forward-mode AD, on CPU neither), the fused adaLN kernel off (no forward-mode rule), no autocast."""
    fused = getattr(module, "runtime", {}).get("fused_adaln")
    if fused not in (None, "false"):
        module.set_fused_adaln("false")
    try:
        with sdpa_kernel(SDPBackend.MATH), torch.autocast(device_type, enabled=False):
            yield
    finally:
        if fused not in (None, "false"):
            module.set_fused_adaln(fused)


class FewStep(Objective):
    """What MeanFlow and shortcut models share: the linear path and its noise level, the interval input."""

    default_sampler = "meanflow"
    eval_sampler = "meanflow"
    interval_input = True

    def check_model(self, model) -> None:
        super().check_model(model)
        if getattr(model, "h_embedder", None) is None:
            raise ValueError(
                f"diffusion={self.name} needs a model with an interval input: model.interval_input=true "
                "(init_from a flow model adds it, starting as that model)"
            )

    # flow.py's path (x_t = t x1 + (1 - t) x0, v = x1 - x0) and noise level (1 - t), the same functions
    interpolate = FlowMatching.interpolate
    noise_level = FlowMatching.noise_level

    # At h = 0 the model is a flow model: flow.py's Euler and Heun sample it through these two.
    def velocity(self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return out

    def shift(self, t):
        return t

    def model_interval(self, h: float) -> float:
        """The interval the model is given for a step of h (the identity; shortcut models: 0 below their finest)."""
        return h

    def check_steps(self, steps: int) -> None:
        """A clear error for a step count the model was not trained for."""


class MeanFlow(FewStep):
    """MeanFlow (see the module docstring): the average velocity by the MeanFlow identity and a JVP."""

    name = "meanflow"
    loss_terms = ("loss", "u_mse")
    ADDED_SETTINGS = {"tangent": "sample", "guidance_input": False, "guidance_max": 7.0, "guidance_beta": 1.0}
    TANGENTS = ("sample", "predicted")

    def __init__(
        self,
        time_mean: float = -0.4,
        time_std: float = 1.0,
        interval_share: float = 0.25,
        norm_p: float = 1.0,
        norm_eps: float = 1e-3,
        omega: float = 1.0,
        kappa: float = 0.0,
        guidance_interval: list[float] | None = None,
        tangent: str = "sample",
        guidance_input: bool = False,
        guidance_max: float = 7.0,
        guidance_beta: float = 1.0,
    ):
        if tangent not in self.TANGENTS:
            raise ValueError(f"tangent={tangent!r}: one of {', '.join(self.TANGENTS)} (predicted: iMF's)")
        if not float(time_std) > 0:
            raise ValueError(f"time_std={time_std}: must be > 0")
        if not 0.0 <= float(interval_share) <= 1.0:
            raise ValueError(f"interval_share={interval_share}: a share of the batch, in [0, 1] (the paper: 0.25)")
        if float(norm_p) < 0 or not float(norm_eps) > 0:
            raise ValueError(f"norm_p={norm_p}, norm_eps={norm_eps}: need norm_p >= 0 and norm_eps > 0")
        if float(omega) <= 0 or not 0.0 <= float(kappa) < 1.0:
            raise ValueError(f"omega={omega}, kappa={kappa}: need omega > 0 and 0 <= kappa < 1 (1, 0: unguided)")
        if guidance_interval is not None:
            lo, hi = map(float, guidance_interval)
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"guidance_interval={list(guidance_interval)}: [lo, hi] noise levels in [0, 1]")
            guidance_interval = [lo, hi]
        self.time_mean, self.time_std, self.interval_share = float(time_mean), float(time_std), float(interval_share)
        self.norm_p, self.norm_eps = float(norm_p), float(norm_eps)
        self.omega, self.kappa, self.guidance_interval = float(omega), float(kappa), guidance_interval
        self.tangent = tangent
        if not isinstance(guidance_input, bool):
            raise ValueError(f"guidance_input={guidance_input!r}: true or false")
        if not float(guidance_max) > 0 or not float(guidance_beta) >= 0:
            raise ValueError(f"guidance_max={guidance_max}, guidance_beta={guidance_beta}: need > 0 and >= 0")
        if guidance_input and (self.omega != 1.0 or self.kappa != 0.0 or guidance_interval is not None):
            raise ValueError(
                "diffusion.guidance_input=true draws the guidance scale and interval per sample (the model's input): "
                f"leave omega, kappa and guidance_interval at 1, 0, null (got {omega}, {kappa}, {guidance_interval})"
            )
        self.guidance_input = guidance_input
        self.guidance_max, self.guidance_beta = float(guidance_max), float(guidance_beta)

    @property
    def guided(self) -> bool:
        """Guidance folded into the target: at a fixed scale (omega, kappa), or at the scale each sample draws (the
        guidance input)."""
        return self.omega != 1.0 or self.kappa != 0.0 or self.guidance_input

    def training_flops(self, config, flops: float) -> float:
        """The forwards without gradient: the guided velocity's two (folded guidance), and on interval_share of the
        images the JVP (and iMF's tangent)."""
        own = self.tangent == "predicted" and not self.guidance_input  # with the guidance input: the guided pass's
        extra = 2 * self.guided + self.interval_share * (JVP_FORWARDS + own)
        return flops + extra * forward_flops(config)

    def settings(self) -> dict:
        keys = ("time_mean", "time_std", "interval_share", "norm_p", "norm_eps", "omega", "kappa", "guidance_interval")
        return self.recorded({"name": self.name, **{k: getattr(self, k) for k in (*keys, *self.ADDED_SETTINGS)}})

    def check_model(self, model) -> None:
        super().check_model(model)
        if self.guidance_input and getattr(model, "g_embedder", None) is None:
            raise ValueError(
                "diffusion.guidance_input=true needs a model with a guidance input: model.guidance_input=true "
                "(init_from adds it, starting as the source model)"
            )
        if self.guided and not model.y_embedder.has_null_class:
            how = "guidance_input=true" if self.guidance_input else f"omega={self.omega}, kappa={self.kappa}"
            raise ValueError(
                f"diffusion.{how} folds classifier-free guidance into the target, which needs the null class: "
                "model.class_dropout_prob > 0"
            )

    def draw(self, rng, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """t and h from two logit-normal draws in the papers' time (t_p >= r_p; r_p = t_p but on interval_share of the
        samples), then the noise; with the guidance input then each sample's guidance g = (scale, lo, hi): from the
        step's SlicedRandom, in this order."""
        n = len(x)
        a = torch.sigmoid(self.time_mean + self.time_std * rng.randn((n,)))
        b = torch.sigmoid(self.time_mean + self.time_std * rng.randn((n,)))
        t_p, r_p = torch.maximum(a, b), torch.minimum(a, b)
        r_p = torch.where(rng.rand(n) < self.interval_share, r_p, t_p)
        found = {"t": 1 - t_p, "h": t_p - r_p, "noise": rng.randn(x.shape)}
        if self.guidance_input:
            found["g"] = self.draw_guidance(rng.rand(n), rng.rand(n), rng.rand(n), found["h"] == 0)
        return found

    def draw_guidance(self, u, a, b, instant) -> torch.Tensor:
        """(N, 3) guidance (scale, lo, hi) from three uniform draws (iMF's official code, imf.py: sample_cfg_scale,
        sample_cfg_interval): the scale from the power distribution of density ~ s^-guidance_beta on
        [1, 1 + guidance_max] (beta 1: log-uniform), lo uniform in [0, 0.5], hi in [0.5, 1]; the samples without an
        interval (`instant`, h = 0) are guided at every noise level, [0, 1]."""
        top = math.log1p(self.guidance_max)
        if self.guidance_beta == 1.0:
            scale = torch.exp(u * top)
        else:
            k = 1.0 - self.guidance_beta
            scale = torch.exp(torch.log1p(u * math.expm1(k * top)) / k)
        lo = torch.where(instant, torch.zeros_like(a), 0.5 * a)
        hi = torch.where(instant, torch.ones_like(b), 0.5 + 0.5 * b)
        return torch.stack([scale, lo, hi], dim=1)

    def guided_velocity(self, inner, xt, t, v, kwargs) -> torch.Tensor:
        """v with classifier-free guidance folded in (the paper's Eq. 19) for the labelled samples in the interval,
        the network's own h = 0 outputs standing for the guided field; v elsewhere."""
        n = len(xt)
        dropped = kwargs.get("force_drop_ids")
        dropped = torch.zeros(n, dtype=torch.bool, device=xt.device) if dropped is None else dropped.bool()
        use = ~dropped
        if self.guidance_interval is not None:
            level = 1.0 - t
            use = use & (level >= self.guidance_interval[0]) & (level <= self.guidance_interval[1])
        if not use.any():
            return v
        cond, uncond = (o.to(v.dtype) for o in _label_and_null(inner, xt, t, kwargs))
        guided = self.omega * v + self.kappa * cond + (1 - self.omega - self.kappa) * uncond
        return torch.where(_per_sample(use, v).bool(), guided, v)

    def input_guided_velocity(self, inner, xt, t, v, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """With the guidance input (iMF's Sec. 4.2 and its official code, imf.py: guidance_fn): each sample's scale w
        inside its interval [lo, hi] of noise levels (1 outside), the guided velocity v + (1 - 1/w) (v_c - v_u) with
        v_c the network's own h = 0 output for the label at guidance (w, 0, 1) and v_u for the null class unguided,
        (1, 0, 1) (where v_c and v_u are the network's estimates of the true velocities v(x | c) and v(x), this target's
        fixed point is the guided field w v(x | c) + (1 - w) v(x)); v for the samples whose label is dropped. Returns
        it and v_c, the network's guided velocity for the label before it is dropped (iMF's JVP tangent)."""
        n = len(xt)
        g = kwargs["g"].to(t.dtype)
        level = 1.0 - t
        w = torch.where((level >= g[:, 1]) & (level <= g[:, 2]), g[:, 0], torch.ones_like(t))
        asked = torch.stack([w, torch.zeros_like(w), torch.ones_like(w)], dim=1)
        plain = torch.tensor(GuidanceEmbedder.UNGUIDED, device=xt.device, dtype=t.dtype).expand(n, 3)
        cond, uncond = (o.to(v.dtype) for o in _label_and_null(inner, xt, t, kwargs, g=torch.cat([asked, plain])))
        guided = v + _per_sample(1 - 1 / w, v) * (cond - uncond)
        dropped = kwargs.get("force_drop_ids")
        if dropped is not None:
            guided = torch.where(_per_sample(dropped.bool(), v).bool(), v, guided)
        return guided, cond

    def target(self, inner, xt, t, h, v, kwargs) -> torch.Tensor:
        """The stop-gradient target v~ + h du/dt, du/dt by a JVP with tangents (v~, 1, 0) for (x, t, r = t + h)
        (tangent="predicted": (u(x, t, 0), 1, 0); with the guidance input the guided v_c of input_guided_velocity).
        The JVP runs on the samples with h != 0 only (interval_share of the batch: the others' term is h du/dt = 0),
        which is the same target for every block whose output for one sample does not depend on the others (all of
        the zoo's but batch-statistics norms in training mode, whose JVP then sees those samples' statistics)."""
        c = xt.shape[1]
        with torch.no_grad(), jvp_pass(inner, xt.device.type):
            field = None  # the network's own guided velocity where the guidance computes it (iMF's tangent)
            if self.guidance_input:
                v, field = self.input_guided_velocity(inner, xt, t, v, kwargs)
            elif self.guided:
                v = self.guided_velocity(inner, xt, t, v, kwargs)
            far = h != 0
            if not far.any():
                return v
            sub = _rows(kwargs, far)

            def u(x, t_, r_):
                return inner(x, t_, h=r_ - t_, **sub)[:, :c]

            tf, rf = t[far], (t + h)[far]
            if self.tangent == "sample":
                tangent = v[far]
            else:
                tangent = (u(xt[far], tf, tf) if field is None else field[far]).to(v.dtype)
            _, dudt = torch.func.jvp(u, (xt[far], tf, rf), (tangent, torch.ones_like(tf), torch.zeros_like(tf)))
            target = v.clone()
            target[far] = v[far] + _per_sample(h[far], dudt) * dudt.to(v.dtype)
        return target

    def losses(self, model, x, draw, model_kwargs) -> dict[str, torch.Tensor]:
        kwargs = dict(model_kwargs or {})
        if self.guidance_input:  # the guidance each sample is trained for, the model's input in every pass
            kwargs["g"] = draw["g"].to(x.device, x.dtype)
        t, h = draw["t"].to(x.device, x.dtype), draw["h"].to(x.device, x.dtype)
        xt, v = self.interpolate(x, t, draw["noise"].to(x.dtype))
        target = self.target(_inner(model), xt, t, h, v, kwargs)  # first: an add-on's hooks keep the last forward's
        u = model(xt, t, h=h, **kwargs)[:, : x.shape[1]]
        wide = torch.promote_types(x.dtype, torch.float32)  # the loss in float32 at least (bf16 autocast)
        error = ((u.to(wide) - target.to(wide)) ** 2).flatten(1)
        loss = error.sum(1) / (error.sum(1).detach() + self.norm_eps) ** self.norm_p
        return {"loss": loss, "u_mse": error.mean(1).detach()}


class Shortcut(FewStep):
    """Shortcut models (see the module docstring): flow matching at d = 0 and self-consistency across step sizes."""

    name = "shortcut"

    def __init__(self, max_steps: int = 128, bootstrap_share: float = 0.25):
        if isinstance(max_steps, bool) or int(max_steps) != max_steps or max_steps < 2 or max_steps & (max_steps - 1):
            raise ValueError(f"max_steps={max_steps}: a power of two >= 2 (the paper: 128)")
        if not 0.0 <= float(bootstrap_share) < 1.0:
            raise ValueError(f"bootstrap_share={bootstrap_share}: a share of the batch in [0, 1) (the paper: 0.25)")
        self.max_steps, self.bootstrap_share = int(max_steps), float(bootstrap_share)

    def settings(self) -> dict:
        return {"name": self.name, "max_steps": self.max_steps, "bootstrap_share": self.bootstrap_share}

    def model_interval(self, h: float) -> float:
        return 0.0 if h <= 1.0 / self.max_steps + 1e-12 else h

    def training_flops(self, config, flops: float) -> float:
        """The two half steps without gradient, on bootstrap_share of the images."""
        return flops + 2 * self.bootstrap_share * forward_flops(config)

    def check_steps(self, steps: int) -> None:
        if steps > self.max_steps or steps & (steps - 1):
            raise ValueError(
                f"steps={steps}: a shortcut model trained with max_steps={self.max_steps} samples with a power of "
                f"two up to {self.max_steps} steps (1, 2, 4, ...)"
            )

    def draw(self, rng, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per sample: t for flow matching, the level k and the grid position for self-consistency, whether it learns
        self-consistency (with probability bootstrap_share), then the noise: from the step's SlicedRandom, in this
        order."""
        n = len(x)
        t_flow = rng.rand(n)
        levels = int(math.log2(self.max_steps))
        d = 2.0 ** torch.floor(rng.rand(n) * levels).clamp_max(levels - 1) / self.max_steps  # 1/M .. 1/2
        t_grid = torch.floor(rng.rand(n) / (2 * d)).clamp_max(1 / (2 * d) - 1) * (2 * d)  # 0, 2d, .., 1 - 2d
        bootstrap = rng.rand(n) < self.bootstrap_share  # per sample, so alike for any number of processes
        t = torch.where(bootstrap, t_grid, t_flow)
        return {"t": t, "h": torch.where(bootstrap, 2 * d, torch.zeros(n)), "noise": rng.randn(x.shape)}

    def losses(self, model, x, draw, model_kwargs) -> dict[str, torch.Tensor]:
        kwargs = dict(model_kwargs or {})
        c = x.shape[1]
        t, h = draw["t"].to(x.device, x.dtype), draw["h"].to(x.device, x.dtype)
        xt, target = self.interpolate(x, t, draw["noise"].to(x.dtype))
        b = h > 0  # the self-consistency samples
        if b.any():
            inner, sub = _inner(model), _rows(kwargs, b)
            d = h[b] / 2
            q = torch.where(d <= 1.0 / self.max_steps + 1e-12, torch.zeros_like(d), d)  # the finest: the flow
            with torch.no_grad():
                s1 = inner(xt[b], t[b], h=q, **sub)[:, :c]
                s2 = inner(xt[b] + _per_sample(d, s1) * s1, t[b] + d, h=q, **sub)[:, :c]
            target = target.clone()
            target[b] = ((s1 + s2) / 2).to(target.dtype)
        u = model(xt, t, h=h, **kwargs)[:, :c]
        wide = torch.promote_types(x.dtype, torch.float32)
        return {"loss": mean_flat((u.to(wide) - target.to(wide)) ** 2)}


class FewStepSampler(Sampler):
    """x_{t+h} = x_t + h u(x_t, t, h) on the uniform grid of `steps` steps from noise to data (MeanFlow's 1- and 2-step
    samplers; the shortcut models' k-step one): `steps` model calls an image (x2 with guidance)."""

    name = "meanflow"
    objectives = ("meanflow", "shortcut")

    def __init__(self, objective: FewStep, settings: SamplingSettings):
        super().__init__(objective, settings)
        objective.check_steps(settings.steps)

    def run(self, denoiser, noise, y, generator):
        x, k = noise, self.settings.steps
        for i in range(k):
            t0, t1 = i / k, (i + 1) / k
            t = torch.full((x.shape[0],), t0, device=x.device, dtype=x.dtype)
            h = torch.full_like(t, self.objective.model_interval(t1 - t0))
            x = x + (t1 - t0) * denoiser(x, t, y, h=h)[:, : x.shape[1]]
        return x


class ShortcutSampler(FewStepSampler):
    """The same steps, by the name shortcut models are known by."""

    name = "shortcut"
