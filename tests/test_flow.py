"""The flow matching objective and its samplers (dit/diffusion/flow.py) against SiT.

The references below are written here from the formulas of SiT (github.com/willisma/SiT, commit
947f95bd3a510e9af441d38c1e9f72e0eee873c5) and of torchdiffeq (github.com/rtqichen/torchdiffeq,
commit 657943acefa826ef04c025ebeb1ff5e9d60dc268, ``_impl/fixed_grid.py``: Euler, Heun2), neither
imported nor vendored:

- transport/__init__.py create_transport: Linear + velocity -> train_eps = sample_eps = 0;
- transport/transport.py Transport.check_interval, training_losses, get_drift (velocity_ode),
  get_score (velocity), Sampler.sample_ode, Sampler.sample_sde and its __get_last_step;
- transport/path.py ICPlan: compute_alpha_t, compute_sigma_t, compute_drift, compute_diffusion,
  get_score_from_velocity, plan;
- transport/integrators.py: ode (torchdiffeq odeint on linspace(t0, t1, num_steps)) and
  sde.__Euler_Maruyama_step / sde.sample.

Everything runs in float64 with the same network and the same initial noise (and, for the SDE, the
same per-step noise), so our samplers must agree with the reference to rounding.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, needs_fmnist
from hydra.utils import instantiate
from PIL import Image

import sample
import train
from dit.diffusion import FlowMatching, SamplingSettings, create_diffusion
from dit.diffusion.registry import OBJECTIVES, SAMPLERS, build_objective, build_sampler
from dit.models import DiT
from dit.training.randomness import SlicedRandom

CPU = torch.device("cpu")
TOL = dict(rtol=1e-12, atol=1e-12)


class RandomVelocity(torch.nn.Module):
    """A small random float64 network v(x, t, y) with 2C outputs (the learn_sigma layout: the last C
    channels are garbage that must be ignored), nonlinear in x, t and y. Records the t it sees."""

    num_classes = 3

    def __init__(self, channels=2):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = torch.nn.Conv2d(channels, 8, 3, padding=1).double()
        self.conv2 = torch.nn.Conv2d(8, 2 * channels, 3, padding=1).double()
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3
        self.t_scale = torch.randn(8, generator=g, dtype=torch.float64)
        self.y_table = torch.randn(4, 8, generator=g, dtype=torch.float64)
        self.y_embedder = type("Y", (), {"has_null_class": True})()
        self.seen_t = []

    def forward(self, x, t, y):
        self.seen_t.append(t.clone())
        h = self.conv1(x) + (torch.sin(3 * t[:, None] * self.t_scale) + self.y_table[y])[:, :, None, None]
        out = self.conv2(torch.tanh(h))
        return torch.cat([out[:, : x.shape[1]], 1e3 * torch.cos(out[:, x.shape[1] :])], dim=1)


def tiny_dit():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=4, in_channels=2, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    with torch.no_grad():  # DiT's adaLN-zero init outputs zeros: give every layer weights
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.double().eval()


# --- the SiT reference, written from its code ------------------------------------------------


def sit_velocity(model, cfg_scale):
    """model(x, t, **model_kwargs) as SiT calls it: the velocity (SiT's forward drops the learn_sigma half);
    with guidance as forward_with_cfg (here on all C channels: our guidance_channels=null)."""

    def fn(x, t, y):
        C = x.shape[1]
        if cfg_scale == 1.0:
            return model(x, t, y)[:, :C]
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, model.num_classes)]))[:, :C]
        cond, uncond = out.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    return fn


def sit_ode(v, x, y, num_steps, method):
    """Sampler.sample_ode(sampling_method=euler | heun2, num_steps): check_interval(sde=False, eval=True)
    gives (t0, t1) = (0, 1) for Linear + velocity; ode.sample calls torchdiffeq's odeint on
    t = linspace(t0, t1, num_steps) with _fn(t, x) = velocity_ode(x, ones(N) * t); the fixed-grid
    solver steps over that grid: dt = t1 - t0, Euler dy = dt * f0, Heun2 (rk2_step_func, tableau
    [[0,0,0],[1,1,0],[0,1/2,1/2]]) k2 = f(t0 + dt * 1, y0 + dt * k1 * 1), dy = dt * (k1/2 + k2/2)."""
    t = torch.linspace(0, 1, num_steps, dtype=torch.float64)

    def _fn(ti, x):
        return v(x, torch.ones(x.size(0), dtype=torch.float64) * ti, y)

    for t0, t1 in zip(t[:-1], t[1:]):
        dt = t1 - t0
        k1 = _fn(t0, x)
        if method == "euler":
            dy = dt * k1
        else:
            k2 = _fn(t0 + dt * 1.0, x + dt * k1 * 1.0)
            dy = dt * (k1 * 0.5 + k2 * 0.5)
        x = x + dy
    return x


def expand_t_like_x(t, x):
    return t.view(t.size(0), *[1] * (x.dim() - 1))


class ICPlan:
    """transport/path.py ICPlan (Linear path)."""

    @staticmethod
    def compute_alpha_t(t):
        return t, 1

    @staticmethod
    def compute_sigma_t(t):
        return 1 - t, -1

    def compute_drift(self, x, t):
        t = expand_t_like_x(t, x)
        alpha_ratio = 1 / t
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        return -(alpha_ratio * x), alpha_ratio * (sigma_t**2) - sigma_t * d_sigma_t

    def compute_diffusion(self, x, t, form, norm):
        t = expand_t_like_x(t, x)
        choices = {  # evaluated eagerly as in SiT (the SBDM entry is inf at t = 0 even when not chosen)
            "constant": norm,
            "SBDM": norm * self.compute_drift(x, t)[1],
            "sigma": norm * self.compute_sigma_t(t)[0],
            "linear": norm * (1 - t),
            "decreasing": 0.25 * (norm * torch.cos(np.pi * t) + 1) ** 2,
            "inccreasing-decreasing": norm * torch.sin(np.pi * t) ** 2,  # sic: SiT's key (its CLI spells it right)
        }
        return choices["inccreasing-decreasing" if form == "increasing-decreasing" else form]

    def get_score_from_velocity(self, velocity, x, t):
        t = expand_t_like_x(t, x)
        alpha_t, d_alpha_t = self.compute_alpha_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        reverse_alpha_ratio = alpha_t / d_alpha_t
        var = sigma_t**2 - reverse_alpha_ratio * d_sigma_t * sigma_t
        return (reverse_alpha_ratio * velocity - x) / var


def sit_sde(
    v,
    x,
    y,
    num_steps,
    noises,
    diffusion_form,
    diffusion_norm=1.0,
    last_step="Mean",
    last_step_size=0.04,
    sample_eps=0.0,
):
    """Sampler.sample_sde(sampling_method="Euler", ...) with SiT's randn replaced by ``noises``."""
    plan = ICPlan()
    if last_step is None:
        last_step_size = 0.0
    # Transport.check_interval(sde=True, eval=True): ICPlan and (velocity or sde)
    t0 = sample_eps if diffusion_form == "SBDM" else 0
    t1 = 1 - sample_eps if last_step_size == 0 else 1 - last_step_size

    def score(x, t):
        return plan.get_score_from_velocity(v(x, t, y), x, t)

    def diffusion_fn(x, t):
        return plan.compute_diffusion(x, t, diffusion_form, diffusion_norm)

    def sde_drift(x, t):
        return v(x, t, y) + diffusion_fn(x, t) * score(x, t)

    ts = torch.linspace(t0, t1, num_steps, dtype=torch.float64)
    dt = ts[1] - ts[0]
    for i, ti in enumerate(ts[:-1]):  # sde.sample / __Euler_Maruyama_step
        w_cur = noises[i]
        t = torch.ones(x.size(0), dtype=torch.float64) * ti
        dw = w_cur * torch.sqrt(dt)
        drift = sde_drift(x, t)
        diffusion = diffusion_fn(x, t)
        mean_x = x + drift * dt
        x = (
            mean_x + torch.sqrt(torch.as_tensor(2 * diffusion)) * dw
        )  # as_tensor: SiT's th.sqrt fails on "constant"'s float
    t = torch.ones(x.size(0), dtype=torch.float64) * t1
    if last_step == "Mean":
        x = x + sde_drift(x, t) * last_step_size
    elif last_step == "Tweedie":
        alpha, sigma = plan.compute_alpha_t, plan.compute_sigma_t
        x = x / alpha(t)[0][0] + (sigma(t)[0][0] ** 2) / alpha(t)[0][0] * score(x, t)
    elif last_step == "Euler":
        x = x + v(x, t, y) * last_step_size
    return x


# --- samplers == SiT step for step -------------------------------------------------------------


@pytest.mark.parametrize(
    "net,method,steps,cfg_scale",
    [
        *(("random", *case) for case in [("euler", 7, 1.0), ("heun", 5, 1.0), ("euler", 4, 2.5), ("heun", 3, 3.0)]),
        *(("dit", *case) for case in [("euler", 3, 2.5), ("heun", 2, 3.0)]),
    ],
)
def test_ode_samplers_equal_sit(net, method, steps, cfg_scale):
    """Our `steps` = SiT's num_steps - 1 (the grid has steps + 1 points); every step matches, the last included."""
    model = RandomVelocity() if net == "random" else tiny_dit()
    obj = FlowMatching()
    sampler = build_sampler(obj, SamplingSettings(sampler=method, steps=steps, cfg_scale=cfg_scale))
    g = torch.Generator().manual_seed(1)
    noise, y = torch.randn(3, 2, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0, 2, 1])
    got = sampler.sample(model, noise, y, torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = sit_ode(sit_velocity(model, cfg_scale), noise, y, steps + 1, "euler" if method == "euler" else "heun2")
    torch.testing.assert_close(got, want, **TOL)
    assert got.dtype == torch.float64 and torch.isfinite(got).all() and not torch.allclose(got, noise)


def test_ode_time_grid_and_evaluations():
    model = RandomVelocity()
    noise, y = torch.randn(2, 2, 8, 8, dtype=torch.float64), torch.tensor([0, 1])
    build_sampler(FlowMatching(), SamplingSettings(sampler="euler", steps=4, cfg_scale=1.0)).sample(model, noise, y)
    assert [float(t[0]) for t in model.seen_t] == [0.0, 0.25, 0.5, 0.75]
    model.seen_t.clear()
    build_sampler(FlowMatching(), SamplingSettings(sampler="heun", steps=2, cfg_scale=1.0)).sample(model, noise, y)
    assert [float(t[0]) for t in model.seen_t] == [0.0, 0.5, 0.5, 1.0]  # the last step evaluates at t = 1 too


SDE_CASES = [
    ({}, 6),  # SiT's command-line defaults: sigma, norm 1, last step Mean of 0.04
    ({"diffusion_form": "SBDM", "sample_eps": 1e-3, "last_step": "Tweedie"}, 5),
    ({"diffusion_form": "constant", "diffusion_norm": 0.5, "last_step": "Euler", "last_step_size": 0.1}, 4),
    ({"diffusion_form": "decreasing", "last_step": None}, 5),
    ({"diffusion_form": "increasing-decreasing", "diffusion_norm": 2.0}, 3),
    ({"diffusion_form": "linear", "last_step": None, "sample_eps": 0.01}, 2),
]


@pytest.mark.parametrize("options,steps", SDE_CASES)
@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_euler_maruyama_equals_sit(options, steps, cfg_scale):
    """Same per-step noise: our generator's draws (one per noisy step, before the model call) fed to SiT's loop."""
    model = RandomVelocity()
    sampler = build_sampler(
        FlowMatching(), SamplingSettings(sampler="euler_maruyama", steps=steps, cfg_scale=cfg_scale, options=options)
    )
    noise, y = (
        torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
        torch.tensor([2, 0, 1]),
    )
    got = sampler.sample(model, noise, y, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    noises = [torch.randn(noise.shape, generator=g, dtype=torch.float64) for _ in range(steps - 1)]
    with torch.no_grad():
        form = options.get("diffusion_form", "sigma")
        rest = {k: v for k, v in options.items() if k != "diffusion_form"}
        want = sit_sde(sit_velocity(model, cfg_scale), noise, y, steps, noises, form, **rest)
    torch.testing.assert_close(got, want, **TOL)
    assert torch.isfinite(got).all()
    assert torch.equal(sampler.sample(model, noise, y, torch.Generator().manual_seed(7)), got)  # deterministic per seed
    assert not torch.allclose(sampler.sample(model, noise, y, torch.Generator().manual_seed(8)), got)


def test_euler_maruyama_default_grid():
    """Defaults: t from 0 to 1 - 0.04 over `steps` points, then the Mean step at 0.96 (SiT's num_steps = steps)."""
    model = RandomVelocity()
    s = build_sampler(FlowMatching(), SamplingSettings(sampler="euler_maruyama", steps=5, cfg_scale=1.0))
    s.sample(model, torch.randn(1, 2, 8, 8, dtype=torch.float64), torch.tensor([0]), torch.Generator().manual_seed(0))
    seen = torch.tensor([float(t[0]) for t in model.seen_t], dtype=torch.float64)
    want = torch.tensor([0.0, 0.24, 0.48, 0.72, 0.96], dtype=torch.float64)
    torch.testing.assert_close(seen, want, rtol=0, atol=1e-15)


def test_float32_samplers_run_and_guidance_interval_uses_noise_level():
    """float32 (what the training grid uses) stays close to float64; cfg_interval is in noise levels 1 - t."""
    model = tiny_dit()
    noise, y = torch.randn(2, 2, 8, 8, dtype=torch.float64), torch.tensor([0, 1])
    s = build_sampler(FlowMatching(), SamplingSettings(sampler="heun", steps=4, cfg_scale=2.0))
    x64 = s.sample(model, noise, y)
    x32 = s.sample(model.float(), noise.float(), y)
    torch.testing.assert_close(x32.double(), x64, rtol=1e-4, atol=1e-4)
    rec = RandomVelocity()
    s = build_sampler(
        FlowMatching(), SamplingSettings(sampler="euler", steps=10, cfg_scale=2.0, cfg_interval=[0.3, 0.6])
    )
    s.sample(rec, noise[:1], y[:1])
    calls = [(float(t[0]), len(t)) for t in rec.seen_t]
    for t, n in calls:
        assert n == (2 if 0.3 <= 1 - t <= 0.6 else 1), (t, n)
    assert {n for _, n in calls} == {1, 2}


# --- the objective ------------------------------------------------------------------------------


@pytest.mark.parametrize("time_sampling", ["uniform", "logit_normal"])
def test_loss_equals_float64_formula(time_sampling):
    """loss = mean over C, H, W of (v(x_t, t)[:C] - (x1 - x0))^2 with x_t = t x1 + (1 - t) x0; the net sees t itself."""
    obj = build_objective(name="flow", time_sampling=time_sampling, logit_mean=0.3, logit_std=0.8)
    model = RandomVelocity()
    x1, y = torch.randn(5, 2, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    draw = obj.draw(SlicedRandom(0, 3, 0, 1, 0, CPU), x1)
    g = SlicedRandom(0, 3, 0, 1, 0, CPU)  # what draw takes from the step's rng, in this order
    t = g.rand(5) if time_sampling == "uniform" else 1 / (1 + torch.exp(0.3 + 0.8 * g.randn((5,))))
    x0 = g.randn(x1.shape)
    torch.testing.assert_close(draw["t"], t, rtol=1e-6, atol=1e-7)
    assert torch.equal(draw["noise"], x0)
    terms = obj.losses(model, x1, draw, {"y": y})
    assert set(terms) == set(obj.loss_terms) == {"loss"}
    t64, x0 = draw["t"].double(), x0.double()
    tt = t64.view(-1, 1, 1, 1)
    xt = tt * x1 + (1 - tt) * x0
    with torch.no_grad():
        want = ((model(xt, t64, y)[:, :2] - (x1 - x0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(terms["loss"], want, **TOL)
    assert torch.equal(model.seen_t[0], t64)  # t in [0, 1] as the model's timestep (SiT), not 1000 t


def test_loss_trains_a_dit_and_ignores_the_sigma_half():
    model = tiny_dit().float().train()
    obj = FlowMatching()
    x = torch.randn(4, 2, 8, 8)
    draw = obj.draw(SlicedRandom(1, 0, 0, 1, 0, CPU), x)
    loss = obj.losses(model, x, draw, {"y": torch.tensor([0, 1, 2, 0])})["loss"]
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    loss.mean().backward()
    w = model.final_layer.linear.weight.grad.view(-1, 2 * 2, model.final_layer.linear.in_features)  # rows (p, p, 2C)
    assert w[:, :2].abs().sum() > 0 and w[:, 2:].abs().sum() == 0  # the sigma half gets no gradient


def test_settings_round_trip_and_noise_level():
    assert "flow" in OBJECTIVES
    obj = instantiate(compose_config("train", ["diffusion=flow", "diffusion.time_sampling=logit_normal"]).diffusion)
    assert isinstance(obj, FlowMatching)
    settings = obj.settings()
    assert settings == {"name": "flow", "time_sampling": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0}
    assert build_objective(**json.loads(json.dumps(settings))).settings() == settings
    assert obj.noise_level(torch.tensor([0.0, 0.25, 1.0])).tolist() == [1.0, 0.75, 0.0]


def _ks(sample: torch.Tensor, cdf) -> float:
    xs = torch.sort(sample.double()).values
    n = len(xs)
    f = cdf(xs)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - f, f - (i - 1) / n).max())


def test_time_draws_have_the_right_distribution_and_survive_resume():
    n = 20000
    x = torch.zeros(n, 1, 1, 1)
    bound = 1.63 / math.sqrt(n)  # KS at the 1% level

    t = FlowMatching().draw(SlicedRandom(5, 11, 0, 1, 0, CPU), x)["t"]
    assert 0 <= t.min() and t.max() < 1 and _ks(t, lambda s: s) < bound

    mean, std = 0.5, 1.5
    obj = FlowMatching("logit_normal", mean, std)
    t = obj.draw(SlicedRandom(5, 11, 0, 1, 0, CPU), x)["t"].double()
    z = torch.log((1 - t) / t)  # logit of the noise level 1 - t ~ N(mean, std), as SD3
    assert abs(float(z.mean()) - mean) < 4 * std / math.sqrt(n) and abs(float(z.std()) / std - 1) < 0.03
    assert _ks(z, lambda s: 0.5 * (1 + torch.erf((s - mean) / (std * math.sqrt(2))))) < bound
    assert float(t.mean()) < 0.5  # logit_mean > 0: more weight at high noise (small t)

    for o in (FlowMatching(), obj):  # a resumed step draws the same; so does each rank of 2 processes
        a, b = o.draw(SlicedRandom(5, 11, 0, 1, 0, CPU), x[:8]), o.draw(SlicedRandom(5, 11, 0, 1, 0, CPU), x[:8])
        halves = [o.draw(SlicedRandom(5, 11, 0, 2, r, CPU), x[:4]) for r in (0, 1)]
        for k in ("t", "noise"):
            assert torch.equal(a[k], b[k]) and torch.equal(torch.cat([h[k] for h in halves]), a[k])
        assert not torch.equal(o.draw(SlicedRandom(5, 12, 0, 1, 0, CPU), x[:8])["t"], a["t"])


# --- errors -------------------------------------------------------------------------------------


def test_errors():
    with pytest.raises(ValueError, match="cannot sample a model trained with the 'ddpm' objective; valid for it: "):
        build_sampler(create_diffusion(), SamplingSettings(sampler="euler"))
    for name in ("heun", "euler_maruyama"):
        with pytest.raises(ValueError, match="cannot sample a model trained with the 'ddpm' objective"):
            build_sampler(create_diffusion(), SamplingSettings(sampler=name))
    for name in ("ddpm", "ddim"):
        with pytest.raises(
            ValueError,
            match=r"cannot sample a model trained with the 'flow' objective; "
            r"valid for it: .*euler, euler_maruyama, heun",
        ):
            build_sampler(FlowMatching(), SamplingSettings(sampler=name))
    assert {"euler", "heun", "euler_maruyama"} <= set(SAMPLERS)
    with pytest.raises(ValueError, match="unknown time_sampling 'cosine'; valid: uniform, logit_normal"):
        build_objective(name="flow", time_sampling="cosine")
    with pytest.raises(ValueError, match="logit_std=0"):
        FlowMatching("logit_normal", 0.0, 0)
    sde = dict(sampler="euler_maruyama", steps=4)
    with pytest.raises(ValueError, match="unknown diffusion_form 'sbdm'; valid: constant, SBDM, sigma"):
        build_sampler(FlowMatching(), SamplingSettings(**sde, options={"diffusion_form": "sbdm"}))
    with pytest.raises(ValueError, match="SBDM.*infinite at t = 0.*sample_eps > 0"):
        build_sampler(FlowMatching(), SamplingSettings(**sde, options={"diffusion_form": "SBDM"}))
    with pytest.raises(ValueError, match="unknown last_step 'mean'"):
        build_sampler(FlowMatching(), SamplingSettings(**sde, options={"last_step": "mean"}))
    with pytest.raises(ValueError, match="last_step_size=0"):
        build_sampler(FlowMatching(), SamplingSettings(**sde, options={"last_step_size": 0}))
    with pytest.raises(ValueError, match="steps=1: euler_maruyama needs at least 2"):
        build_sampler(FlowMatching(), SamplingSettings(sampler="euler_maruyama", steps=1))
    with pytest.raises(ValueError, match="sampler 'euler' has no option eta; its options: none"):
        build_sampler(FlowMatching(), SamplingSettings(sampler="euler", options={"eta": 0.0}))


# --- train.py and sample.py ---------------------------------------------------------------------


@needs_fmnist
def test_train_resume_and_sample_a_flow_model(tmp_path):
    """diffusion=flow with logit-normal times: train 2 steps, resume to 4, the export records the flow objective,
    sample.py with the training grid's sampler reproduces its grid, and heun samples too; a resume with a
    changed time_sampling is refused. (After 4 steps the EMA velocity is ~0, so euler and heun give the same
    pixels here: the samplers' numerics are tested above.) No sampler is named for the in-training FID: a flow
    run's is its objective's (euler), see test_objectives."""
    run = tmp_path / "run"
    base = [
        "experiment=smoke",
        "diffusion=flow",
        "diffusion.time_sampling=logit_normal",
        "training.ckpt_every=2",
        "training.sample_per_class=1",
        "training.sample_max_classes=10",
        "training.grid_sampling.sampler=euler",
        "training.grid_sampling.steps=4",
        "training.grid_sampling.cfg_scale=2.0",
    ]
    first = train.run(compose_config("train", [*base, "training.total_steps=2"]), run)
    assert first["step"] == 2
    result = train.run(compose_config("train", [*base, "training.total_steps=4"]), run)
    assert result["step"] == 4
    settings = {"name": "flow", "time_sampling": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0}
    assert json.loads((run / "model" / "config.json").read_text())["objective"] == settings
    with pytest.raises(ValueError, match="time_sampling"):
        train.run(
            compose_config("train", [o for o in base if "time_sampling" not in o] + ["training.total_steps=5"]), run
        )

    def sample_grid(out, *extra):
        overrides = [
            f"checkpoint={run / 'model'}",
            f"out_dir={out}",
            "per_class=1",
            "seed=0",
            "batch_size=10",
            "steps=4",
            "cfg_scale=2.0",
            *extra,
        ]
        sample.run(compose_config("sample", overrides))
        return np.array(Image.open(Path(out) / "grid.png"))

    grid_train = np.array(Image.open(run / "samples" / "latest.png"))
    assert np.array_equal(sample_grid(tmp_path / "euler", "sampler=euler"), grid_train)
    assert sample_grid(tmp_path / "heun", "sampler=heun").shape == grid_train.shape
    with pytest.raises(ValueError, match="cannot sample a model trained with the 'flow' objective"):
        sample_grid(tmp_path / "ddim", "sampler=ddim")  # sample.py took the objective from the export
