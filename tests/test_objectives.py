"""Objectives and samplers as registry objects; settings that travel with the model (issue 12).

- A cosine-schedule model samples with its own schedule everywhere: the export records the
  objective, sample.py rebuilds it, and the training grid equals sample.py's images pixel for pixel.
- Resume accepts a changed runtime choice (fused_adaln) but refuses a changed objective.
- Samplers: one registry, clear errors for unknown names, options, steps and guidance intervals.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, needs_fmnist
from helpers.tiny import GRID_RUN
from PIL import Image

import sample
import train
from dit.diffusion import (
    OBJECTIVES,
    SAMPLERS,
    FlowMatching,
    GaussianDiffusion,
    Sampler,
    SamplingSettings,
    build_objective,
    build_sampler,
    check_sampling,
    create_diffusion,
    get_betas,
)
from dit.hub import load_model
from dit.models import DiT


def tiny_model(**kw):
    torch.manual_seed(0)
    return DiT(
        input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3, **kw
    ).eval()


# --- objectives ------------------------------------------------------------------------------


def test_objective_settings_round_trip_and_registry():
    d = build_objective(name="ddpm", noise_schedule="cosine", diffusion_steps=500, variance_type="fixed_small")
    assert isinstance(d, GaussianDiffusion) and "ddpm" in OBJECTIVES
    settings = d.settings()
    assert settings == {
        "name": "ddpm",
        "noise_schedule": "cosine",
        "diffusion_steps": 500,
        "variance_type": "fixed_small",
    }
    again = build_objective(**json.loads(json.dumps(settings)))
    torch.testing.assert_close(again.betas, torch.from_numpy(get_betas("cosine", 500)), rtol=0, atol=0)
    assert build_objective().settings() == {
        "name": "ddpm",
        "noise_schedule": "linear",
        "diffusion_steps": 1000,
        "variance_type": "learned_range",
    }
    with pytest.raises(ValueError, match="unknown objective 'edm'; valid objectives: .*ddpm"):
        build_objective(name="edm")


def test_ddpm_objective_terms_equal_training_losses():
    """The objective's draw + losses are exactly GaussianDiffusion.training_losses on that draw."""
    from dit.training.randomness import SlicedRandom

    d = create_diffusion()
    model = tiny_model()
    x = torch.randn(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 0])
    draw = d.draw(SlicedRandom(0, 5, 0, 1, 0, torch.device("cpu")), x)
    g = SlicedRandom(0, 5, 0, 1, 0, torch.device("cpu"))
    t, noise = g.randint(1000, 4), g.randn(x.shape)
    assert torch.equal(draw["t"], t) and torch.equal(draw["noise"], noise)
    got = d.losses(model, x, draw, {"y": y})
    want = d.training_losses(model, x, t, {"y": y}, noise=noise)
    assert set(got) == set(d.loss_terms) == {"loss", "mse", "vb"}
    for k in got:
        assert torch.equal(got[k], want[k])
    assert create_diffusion(variance_type="fixed_small").loss_terms == ("loss", "mse")


def test_noise_level_spans_zero_to_one():
    d = create_diffusion()
    assert d.noise_level(torch.tensor([999])).item() == 1.0 and d.noise_level(torch.tensor([0])).item() == 0.0


# --- samplers --------------------------------------------------------------------------------


def test_sampler_registry_errors():
    d = create_diffusion()
    with pytest.raises(ValueError, match=r"unknown sampler 'ddpn'; valid samplers: .*ddim.*ddpm"):
        build_sampler(d, SamplingSettings(sampler="ddpn"))
    with pytest.raises(ValueError, match="sampler 'ddim' has no option etta; its options: eta, clip_denoised"):
        build_sampler(d, SamplingSettings(sampler="ddim", options={"etta": 1}))
    with pytest.raises(ValueError, match="steps=0: need at least 1"):
        build_sampler(d, SamplingSettings(steps=0))
    for bad in ([0.5, 0.2], [-0.1, 0.5], [0.2, 1.5]):
        with pytest.raises(ValueError, match="cfg_interval"):
            build_sampler(d, SamplingSettings(cfg_interval=bad))


def test_sampler_refuses_an_objective_it_cannot_sample():
    @SAMPLERS.add
    class Other(Sampler):
        name = "_test_only_other"
        objectives = ("not_ddpm",)

    try:
        with pytest.raises(
            ValueError,
            match="cannot sample a model trained with the 'ddpm' objective; valid for it: ddim, ddpm, dpmpp, unipc",
        ):
            build_sampler(create_diffusion(), SamplingSettings(sampler="_test_only_other"))
    finally:
        SAMPLERS.remove("_test_only_other")


def test_sampling_settings_are_checked_and_converted_once():
    s = SamplingSettings(sampler="ddim", steps=np.int64(7), cfg_scale=3, cfg_interval=[0, "0.5"])
    assert (type(s.steps), type(s.cfg_scale), s.cfg_interval) == (int, float, (0.0, 0.5))
    for bad, match in [
        ({"steps": 2.5}, r"steps=2.5: need at least 1 sampling step \(an integer\)"),
        ({"steps": True}, "steps=True"),
        ({"cfg_scale": "4"}, "cfg_scale='4': a number"),
        ({"cfg_interval": [0.1]}, r"cfg_interval=\[0.1\]: a pair"),
        (
            {"sampler": "eulr"},
            r"unknown sampler 'eulr'; valid samplers: ddim, ddpm, dpmpp, euler, euler_maruyama, heun",
        ),
    ]:
        with pytest.raises(ValueError, match=match):
            check_sampling(SamplingSettings(**bad))  # the values when made, the sampler's name beside the registry


def test_sampling_settings_from_a_config_node_keep_only_their_keys():
    from omegaconf import OmegaConf

    node = OmegaConf.create(
        {"sampler": "ddim", "steps": 5, "cfg_interval": [0.2, 0.8], "options": {"eta": 1}, "seed": 3}
    )
    s = SamplingSettings.from_config(node)
    assert s == SamplingSettings(sampler="ddim", steps=5, cfg_interval=(0.2, 0.8), options={"eta": 1})
    assert type(s.options) is dict and SamplingSettings.from_config({"steps": 9}).steps == 9
    with pytest.raises(ValueError, match="steps=0"):
        SamplingSettings.from_config(OmegaConf.create({"steps": 0}))


def test_cfg_interval_guides_only_inside_it():
    """Outside [lo, hi] the step uses the conditional output alone; inside, the guided one."""
    calls = []

    class Recorder(torch.nn.Module):
        num_classes = 3

        def forward(self, x, t, y):
            calls.append((int(t[0]), len(x)))
            return torch.zeros(len(x), 2, *x.shape[2:])

    model = Recorder()
    model.y_embedder = type("Y", (), {"has_null_class": True})()
    d = create_diffusion()
    s = build_sampler(d, SamplingSettings(sampler="ddim", steps=10, cfg_scale=2.0, cfg_interval=[0.3, 0.6]))
    s.sample(model, torch.randn(2, 1, 4, 4), torch.tensor([0, 1]))
    for t, n in calls:
        assert n == (4 if 0.3 <= t / 999 <= 0.6 else 2), (t, n)
    assert {n for _, n in calls} == {2, 4}


def test_guidance_without_a_null_class_is_an_error_everywhere():
    model = tiny_model(class_dropout_prob=0.0)
    s = build_sampler(create_diffusion(), SamplingSettings(steps=2, cfg_scale=1.5))
    with pytest.raises(ValueError, match="needs a null class"):
        s.sample(model, torch.randn(1, 1, 8, 8), torch.tensor([0]))


def test_each_objective_names_its_samplers_for_sample_py_the_grids_and_the_fid():
    """A null sampler means the objective's: default_sampler for sample.py and the grids, eval_sampler for the
    in-training FID (DDPM: ddim, as before; flow: euler, with no override); the settings digest records the
    sampler used, so naming it or leaving it null is the same run, and another sampler is another run."""
    from omegaconf import OmegaConf

    from dit.diffusion import FlowMatching
    from dit.training.config import TrainConfig, training_sampling
    from dit.training.digest import settings_digest
    from dit.training.evaluation import build_training_sampler

    model, cfg = tiny_model(), TrainConfig(fid_every=1)
    for objective, grid, fid in [(create_diffusion(), "ddpm", "ddim"), (FlowMatching(), "euler", "euler")]:
        assert build_sampler(objective, SamplingSettings()).name == grid  # sample.py
        assert build_training_sampler(objective, cfg, "grid_sampling", model).name == grid
        assert build_training_sampler(objective, cfg, "fid_sampling", model).name == fid
        recorded = {"sampler": None, "steps": 10, "cfg_scale": 2.0, "options": {}}  # a run's config.yaml
        assert training_sampling("fid_sampling", recorded, objective.name) == SamplingSettings(fid, 10, 2.0)

    def digest(*overrides):
        return settings_digest(
            OmegaConf.to_container(compose_config("train", ["experiment=smoke", *overrides]), resolve=True)
        )

    assert digest() == digest("training.fid_sampling.sampler=ddim", "training.grid_sampling.sampler=ddpm")
    assert digest() != digest("training.fid_sampling.sampler=dpmpp")
    flow = digest("diffusion=flow")
    assert flow == digest(
        "diffusion=flow", "training.fid_sampling.sampler=euler", "training.grid_sampling.sampler=euler"
    )
    assert flow != digest("diffusion=flow", "training.fid_sampling.sampler=heun")
    with pytest.raises(ValueError, match="training.fid_sampling: sampler 'ddim' cannot sample .* 'flow' objective"):
        build_training_sampler(
            FlowMatching(), TrainConfig(fid_sampling=SamplingSettings(sampler="ddim")), "fid_sampling", model
        )


def test_no_recorded_objective_means_dits_ddpm():
    from dit.hub import objective_of, objective_settings

    ddpm = {"name": "ddpm", "noise_schedule": "linear", "diffusion_steps": 1000, "variance_type": "learned_range"}
    assert objective_settings({}) == objective_settings({"objective": {}}) == ddpm
    flow = {"name": "flow", "time_sampling": "uniform", "logit_mean": 0.0, "logit_std": 1.0}
    assert objective_settings({"objective": flow}) == flow and objective_of({"objective": flow}).name == "flow"
    assert objective_of({}).settings() == ddpm


# --- settings that travel with the model ----------------------------------------------------


@needs_fmnist
def test_cosine_model_samples_with_its_own_schedule_everywhere(tmp_path):
    """Train with diffusion.noise_schedule=cosine: the export records it, sample.py rebuilds it, and
    sample.py's images equal the training grid's (same sampler, seed, labels) pixel for pixel; the
    linear schedule would give other images."""
    run = tmp_path / "run"
    cfg = compose_config(
        "train",
        ["experiment=smoke", "diffusion.noise_schedule=cosine", "training.grid_sampling.sampler=ddim", *GRID_RUN],
    )
    train.run(cfg, run)
    meta = json.loads((run / "model" / "config.json").read_text())
    assert meta["objective"] == {
        "name": "ddpm",
        "noise_schedule": "cosine",
        "diffusion_steps": 1000,
        "variance_type": "learned_range",
    }
    ckpt_meta = json.loads(next((run / "checkpoints").glob("step_*/config.json")).read_text())
    assert ckpt_meta["objective"]["noise_schedule"] == "cosine"
    _, loaded = load_model(run / "model")
    assert build_objective(**loaded["objective"]).settings()["noise_schedule"] == "cosine"

    def sample_grid(out, objective=None):
        overrides = [
            f"checkpoint={run / 'model'}",
            f"out_dir={out}",
            "per_class=1",
            "sampler=ddim",
            "steps=4",
            "cfg_scale=2.0",
            "seed=0",
            "batch_size=10",
        ]
        if objective is not None:  # pretend the export had not recorded its objective
            cfg_json = json.loads((run / "model" / "config.json").read_text())
            cfg_json["objective"] = objective
            (run / "model" / "config.json").write_text(json.dumps(cfg_json))
        sample.run(compose_config("sample", overrides))
        return np.array(Image.open(Path(out) / "grid.png"))

    grid_train = np.array(Image.open(run / "samples" / "latest.png"))
    assert np.array_equal(sample_grid(tmp_path / "s1"), grid_train)
    assert not np.array_equal(sample_grid(tmp_path / "s2", objective={}), grid_train)  # {} = the linear default


@needs_fmnist
def test_resume_accepts_a_changed_fused_adaln_but_not_a_changed_objective(tmp_path):
    base = ["experiment=smoke", "training.total_steps=3", "training.ckpt_every=3"]
    train.run(compose_config("train", [*base, "model.fused_adaln=false"]), tmp_path)
    result = train.run(
        compose_config("train", ["experiment=smoke", "training.total_steps=4", "model.fused_adaln=auto"]), tmp_path
    )
    assert result["step"] == 4
    with pytest.raises(ValueError, match=r"objective.noise_schedule: checkpoint 'linear' vs config 'cosine'"):
        train.run(
            compose_config("train", ["experiment=smoke", "training.total_steps=5", "diffusion.noise_schedule=cosine"]),
            tmp_path,
        )


@needs_fmnist
def test_grid_guidance_on_a_model_without_null_class_fails_before_training(tmp_path):
    cfg = compose_config(
        "train", ["experiment=smoke", "model.class_dropout_prob=0", "training.grid_sampling.cfg_scale=1.5"]
    )
    with pytest.raises(ValueError, match="needs a null class"):
        train.run(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_training_key_is_a_compose_error():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_config("train", ["training.sample_steps=3"])  # renamed: training.grid_sampling.steps


# --- diffusers solvers for DDPM models ---------------------------------------------------------


def _drive_directly(scheduler, model_fn, noise, steps):
    """The diffusers scheduler driven by hand, as its documentation does."""
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = model_fn(x, torch.full((len(x),), int(t)))
        x = scheduler.step(eps, t, x).prev_sample
    return x


@pytest.mark.parametrize("name", ["dpmpp", "unipc"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_diffusers_solvers_equal_the_scheduler_driven_directly(name, schedule):
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    model = tiny_model()
    y = torch.tensor([0, 2])
    noise = torch.randn(2, 1, 8, 8)
    objective = create_diffusion(noise_schedule=schedule)
    ours = build_sampler(objective, SamplingSettings(sampler=name, steps=10)).sample(model, noise, y)
    beta_schedule = {"linear": "linear", "cosine": "squaredcos_cap_v2"}[
        schedule
    ]  # diffusers' names for the same schedules
    if name == "dpmpp":
        scheduler = DPMSolverMultistepScheduler(
            beta_schedule=beta_schedule, algorithm_type="dpmsolver++", solver_order=2
        )
    else:
        scheduler = UniPCMultistepScheduler(beta_schedule=beta_schedule, solver_order=2, solver_type="bh2")
    with torch.no_grad():
        theirs = _drive_directly(scheduler, lambda x, t: model(x, t, y)[:, :1], noise, 10)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, noise)


class Counting(torch.nn.Module):
    """A model that reports each call, record(x, t), and answers as `inner` (guidance sees its null class)."""

    def __init__(self, inner, record):
        super().__init__()
        self.inner, self.num_classes, self.y_embedder, self.record = inner, inner.num_classes, inner.y_embedder, record

    def forward(self, x, t, y):
        self.record(x, t)
        return self.inner(x, t, y)


def test_solvers_follow_guidance_and_steps():
    """cfg through the solvers: the scheduler sees the guided epsilon; steps = model calls."""
    calls = []
    model = Counting(tiny_model(), lambda x, t: calls.append(len(x)))
    s = build_sampler(create_diffusion(), SamplingSettings(sampler="dpmpp", steps=7, cfg_scale=3.0))
    s.sample(model, torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))
    assert calls == [4] * 7


# --- DPM-Solver++ for flow models ------------------------------------------------------------------


def _gaussian_velocity(mu, s):
    """The exact flow-matching velocity E[x1 - x0 | x_t] for data x1 ~ N(mu, s^2 I) and noise x0 ~ N(0, I) on
    x_t = t x1 + (1 - t) x0: x_t ~ N(t mu, var_t I), var_t = t^2 s^2 + (1 - t)^2, Cov(x1, x_t) = t s^2 and
    Cov(x0, x_t) = 1 - t give v = mu + (t s^2 - (1 - t)) / var_t (x - t mu) = mu + var_t' / (2 var_t) (x - t mu),
    affine in x. Along the ODE (x - t mu) / sqrt(var_t) is constant, so noise z goes to mu + s z at t = 1."""

    def model(x, t, y):
        t = t.reshape(-1, *([1] * (x.dim() - 1)))
        var = t**2 * s**2 + (1 - t) ** 2
        return mu + (t * s**2 - (1 - t)) / var * (x - t * mu)

    return model


def test_flow_dpmpp_follows_the_exact_flow_and_beats_euler_on_a_curved_one():
    """float64. Data a point mu: v = (mu - x) / (1 - t), straight paths x_t = (1 - t) z + t mu, which every call of
    the solver lies on (diffusers' step computes the sample's term in float32: 1e-6). Data N(mu, s^2) with s != 1:
    curved paths, the exact map z -> mu + s z; with as many model calls (16, 32) DPM-Solver++(2M) is 5-9x closer
    than Euler, also on SD3's time-shifted grid, and its error falls ~3.3x a doubling of the steps (Euler's 2x)."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(1, 1, 4, 4, generator=g, dtype=torch.float64)
    z = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    seen = []

    def point(x, t, y):
        seen.append((x, t))
        return (mu - x) / (1 - t.reshape(-1, 1, 1, 1))

    out = build_sampler(FlowMatching(), SamplingSettings(sampler="dpmpp", steps=6)).sample(point, z, y)
    torch.testing.assert_close(out, mu.expand_as(z), rtol=0, atol=1e-12)
    assert [float(t[0]) for _, t in seen] == pytest.approx([i / 6 for i in range(6)], rel=0, abs=1e-15)
    assert torch.equal(seen[0][0], z) and float(seen[0][1][0]) == 0.0  # the first call: at t = 0, on the noise
    for x, t in seen:
        torch.testing.assert_close(x, (1 - t[0]) * z + t[0] * mu, rtol=0, atol=1e-6)

    def error(sampler, steps, time_shift=1.0, s=2.0):
        settings = SamplingSettings(sampler=sampler, steps=steps)
        out = build_sampler(FlowMatching(time_shift=time_shift), settings).sample(_gaussian_velocity(mu, s), z, y)
        return (out - (mu + s * z)).abs().max().item()

    for steps in (16, 32):
        for time_shift in (1.0, 3.0):
            assert error("dpmpp", steps, time_shift) < error("euler", steps, time_shift) / 4
    assert error("dpmpp", 64) < 0.015 < 0.1 < error("euler", 64)
    assert error("dpmpp", 16) / error("dpmpp", 32) > 3 > 2.1 > error("euler", 16) / error("euler", 32)


def test_flow_dpmpp_steps_are_dpm_solver_pp_2m_by_hand():
    """Each step against DPM-Solver++(2M)'s data-prediction update written out (Lu et al. 2022, Alg. 2) in float64:
    alpha = 1 - sigma, lambda = log(alpha / sigma), D = x - sigma * (-v); first order x' = (sigma'/sigma) x -
    alpha' (e^-h - 1) D, then x' = (sigma'/sigma) x - alpha' (e^-h - 1) (D + (D - D_prev) / (2 r)), r = h_prev / h.
    At sigma = 1 (lambda = -inf) the first step is x + t1 v, an Euler step, and the second step's r is infinite (its
    correction zero); the last, to sigma = 0, is first order (x' = D)."""
    steps, a = 5, 2.0
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    w = torch.randn(1, 1, 4, 4, generator=g, dtype=torch.float64)

    def v(x, t):  # any smooth nonlinear field
        t = t.reshape(-1, 1, 1, 1)
        return torch.tanh(x * w) * (1 + t) - (0.5 + t**2) * x

    seen = []
    sampler = build_sampler(FlowMatching(time_shift=a), SamplingSettings(sampler="dpmpp", steps=steps))
    out = sampler.sample(lambda x, t, y: seen.append((x, t)) or v(x, t), z, torch.zeros(2, dtype=torch.long))

    sig = [a * s / (1 + (a - 1) * s) for s in (1 - i / steps for i in range(steps + 1))]  # SD3's shift, 1 .. 0
    lam = [-math.inf if s == 1 else math.inf if s == 0 else math.log((1 - s) / s) for s in sig]
    assert (sig[0], sig[-1]) == (1.0, 0.0)
    x, prev = z, None
    for i in range(steps):
        t = 1 - sig[i]
        torch.testing.assert_close(seen[i][1], torch.full((2,), t, dtype=torch.float64), rtol=0, atol=1e-15)
        torch.testing.assert_close(seen[i][0], x, rtol=0, atol=1e-6)
        d = x - sig[i] * -v(x, seen[i][1])
        h = lam[i + 1] - lam[i]
        first = (sig[i + 1] / sig[i]) * x - (1 - sig[i + 1]) * (math.exp(-h) - 1) * d
        if prev is None or i == steps - 1:
            x_next = first
        else:
            r = (lam[i] - lam[i - 1]) / h
            x_next = first - (1 - sig[i + 1]) * (math.exp(-h) - 1) * 0.5 * (d - prev) / r
        if i == 0:
            torch.testing.assert_close(x_next, z + (1 - sig[1]) * v(z, seen[0][1]), rtol=0, atol=1e-12)
        x, prev = x_next, d
    assert len(seen) == steps
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("objective", ["flow", "meanflow"])
def test_flow_dpmpp_samples_a_tiny_flow_dit(objective):
    """sample.py's path: build_sampler for a flow model (and a few-step one, at interval 0) gives DPM-Solver++ on its
    flow; `steps` model calls, of 2N images with guidance; finite images. Karras sigmas are a DDPM model's option."""
    from dit.diffusion import FlowDPMSolverPlusPlus

    calls = []
    obj = build_objective(objective)
    model = Counting(tiny_model(interval_input=objective != "flow"), lambda x, t: calls.append((len(x), float(t[0]))))
    s = build_sampler(obj, SamplingSettings(sampler="dpmpp", steps=7, cfg_scale=3.0))
    assert isinstance(s, FlowDPMSolverPlusPlus) and s.name == "dpmpp"
    out = s.sample(model, torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    assert calls == [(4, pytest.approx(i / 7, abs=1e-7)) for i in range(7)]
    with pytest.raises(ValueError, match="use_karras_sigmas: a DDPM model's grid"):
        build_sampler(obj, SamplingSettings(sampler="dpmpp", options={"use_karras_sigmas": True}))
