"""docs/extending.md, "A new objective" and "A new sampler": each is one class plus one registry line, and the
framework has it: sample.py, the training grids, training itself; where it does not fit, a clear error."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import compose_config, needs_fmnist
from helpers.tiny import GRID_RUN, GRID_SAMPLE
from omegaconf import OmegaConf
from PIL import Image

import sample
import train
from dit.diffusion import (
    OBJECTIVES,
    SAMPLERS,
    FlowMatching,
    SamplingSettings,
    build_objective,
    build_sampler,
    check_sampling,
)
from dit.diffusion.flow import FlowSampler
from dit.hub import ModelRecord, save_export
from dit.models import create_model
from dit.training.randomness import SlicedRandom

# --- the examples of docs/extending.md ---------------------------------------------------------


class MidpointSampler(FlowSampler):
    """A new sampler for flow models: the explicit midpoint rule on SiT's ODE grid (2 model calls a step)."""

    name = "midpoint_example"  # objectives = ("flow",), from FlowSampler

    def run(self, denoiser, noise, y, generator):
        x, grid = noise, self.ode_grid()
        for t0, t1 in zip(grid[:-1], grid[1:]):
            h = t1 - t0
            k = self.velocity(denoiser, x, t0, y)
            x = x + h * self.velocity(denoiser, x + 0.5 * h * k, t0 + 0.5 * h, y)
        return x


class XPredictionFlow(FlowMatching):
    """A new objective: SiT's linear path, the network predicting the data x1 instead of the velocity
    (x-prediction); the loss is the MSE to the data. No registered sampler reads its outputs as data, so it
    brings one (below) and names it."""

    name = "x_flow_example"
    default_sampler = eval_sampler = "x_euler_example"

    def losses(self, model, x, draw, model_kwargs):
        t = draw["t"].to(x.device, x.dtype)
        xt, _ = self.interpolate(x, t, draw["noise"].to(x.dtype))
        x1 = model(xt, t, **model_kwargs)[:, : x.shape[1]]
        return {"loss": ((x1 - x) ** 2).mean(dim=(1, 2, 3))}


class XEulerSampler(FlowSampler):
    """Euler steps of the ODE whose velocity is (x1 - x_t) / (1 - t), x1 the model's data prediction."""

    name = "x_euler_example"
    objectives = ("x_flow_example",)

    def run(self, denoiser, noise, y, generator):
        x, grid = noise, self.ode_grid()  # t0 < 1 on every step
        for t0, t1 in zip(grid[:-1], grid[1:]):
            x1 = self.velocity(denoiser, x, t0, y)  # the model's output: here the data
            x = x + (t1 - t0) * (x1 - x) / (1 - t0)
        return x


@pytest.fixture
def midpoint():
    SAMPLERS.add(MidpointSampler)  # the one registry line (in the tree: one entry in the SAMPLERS list)
    yield MidpointSampler
    SAMPLERS.remove(MidpointSampler.name)


@pytest.fixture
def x_flow():
    OBJECTIVES.add(XPredictionFlow)  # the objective's registry line (in the tree: the OBJECTIVES list)
    SAMPLERS.add(XEulerSampler)  # and its sampler's
    yield XPredictionFlow
    OBJECTIVES.remove(XPredictionFlow.name)
    SAMPLERS.remove(XEulerSampler.name)


def tiny_model():
    torch.manual_seed(0)
    model = create_model("DiT-Debug/4", input_size=8, in_channels=1, num_classes=3)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    return model.eval()


def export(path, objective):
    model = tiny_model()
    save_export(path, model, ModelRecord(objective.settings(), {"latent": False}), ema=model)
    return path


# --- a new sampler -----------------------------------------------------------------------------


class Decay(torch.nn.Module):
    """Velocity -x: dx/dt = -x, so x(1) = x(0) / e."""

    def forward(self, x, t, y):
        return -x


def test_a_new_sampler_integrates_as_its_rule_says(midpoint):
    noise, y = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1])
    steps, h = 4, 0.25
    got = build_sampler(FlowMatching(), SamplingSettings(sampler="midpoint_example", steps=steps)).sample(
        Decay(), noise, y
    )
    torch.testing.assert_close(got, noise * (1 - h + h**2 / 2) ** steps, rtol=1e-12, atol=0)
    euler = build_sampler(FlowMatching(), SamplingSettings(sampler="euler", steps=steps)).sample(Decay(), noise, y)
    exact = noise / math.e
    assert (got - exact).abs().max() < (euler - exact).abs().max() / 5  # second order against Euler's first


def test_a_new_sampler_in_sample_py_and_the_training_configs(midpoint, tmp_path):
    flow = export(tmp_path / "flow", FlowMatching())
    grids = {}
    for name in ("midpoint_example", "euler"):
        settings = [f"sampler={name}", "steps=3", "cfg_scale=2", "per_class=2"]
        cfg = compose_config("sample", [f"checkpoint={flow}", f"out_dir={tmp_path / name}", *settings])
        grids[name] = np.array(Image.open(sample.run(cfg) / "grid.png"))
    assert grids["midpoint_example"].shape[:2] == (3 * 8 + 4 * 2, 2 * 8 + 3 * 2)  # 3 rows of 2 images of 8x8
    assert not np.array_equal(grids["midpoint_example"], grids["euler"])  # sample.py ran the new one
    training = OmegaConf.to_object(
        compose_config("train", ["training.grid_sampling.sampler=midpoint_example"]).training
    )
    assert training.grid_sampling.sampler == "midpoint_example"
    # Where it does not fit: a DDPM model, with the samplers that fit it; gone when unregistered.
    ddpm = export(tmp_path / "ddpm", build_objective())
    cfg = compose_config("sample", [f"checkpoint={ddpm}", f"out_dir={tmp_path / 's2'}", "sampler=midpoint_example"])
    with pytest.raises(
        ValueError, match="'midpoint_example' cannot sample .* 'ddpm' objective; valid for it: ddim, ddpm"
    ):
        sample.run(cfg)
    SAMPLERS.remove("midpoint_example")
    try:
        with pytest.raises(ValueError, match="unknown sampler 'midpoint_example'; valid samplers: ddim"):
            check_sampling(SamplingSettings(sampler="midpoint_example"))  # what sample.py checks before loading
    finally:
        SAMPLERS.add(MidpointSampler)


# --- a new objective ---------------------------------------------------------------------------


def test_a_new_objective_trains_a_step_and_samples_with_its_sampler(x_flow):
    objective = build_objective("x_flow_example")  # as configs/diffusion/<name>.yaml builds it
    assert objective.settings()["name"] == "x_flow_example"
    model, x, y = tiny_model().train(), torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    draw = objective.draw(SlicedRandom(seed=0, step=0, micro_step=0, world_size=1, rank=0, device="cpu"), x)
    loss = objective.losses(model, x, draw, {"y": y})["loss"]
    assert loss.shape == (4,)
    loss.mean().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0  # the data-prediction loss reaches the model
    sampler = build_sampler(objective, SamplingSettings(steps=4))  # no sampler named: the objective's
    assert isinstance(sampler, XEulerSampler)
    # A model that predicts a fixed image x1: the ODE carries any noise to it exactly, in any number of steps.
    x1 = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    out = sampler.sample(lambda x, t, y: x1.expand_as(x), torch.randn(2, 1, 8, 8, dtype=torch.float64), y[:2])
    torch.testing.assert_close(out, x1.expand(2, -1, -1, -1), rtol=0, atol=1e-12)
    # Where it does not fit: the velocity samplers refuse its models, its sampler refuses the others'.
    with pytest.raises(ValueError, match="'euler' cannot sample .* 'x_flow_example' objective; valid for it: x_euler"):
        build_sampler(objective, SamplingSettings(sampler="euler"))
    with pytest.raises(ValueError, match="'x_euler_example' cannot sample .* 'flow' objective; valid for it: dpmpp, "):
        build_sampler(FlowMatching(), SamplingSettings(sampler="x_euler_example"))


def test_an_unregistered_objective_is_an_error_with_the_valid_names():
    with pytest.raises(ValueError, match="unknown objective 'x_flow_example'; valid objectives: ddpm, flow"):
        build_objective("x_flow_example")


@needs_fmnist
def test_a_new_objective_through_train_py_and_sample_py(x_flow, tmp_path):
    """diffusion.name=x_flow_example (configs/diffusion/flow.yaml's keys fit it): train, the export records
    it, sample.py rebuilds it and samples with its default sampler, the training grid's pixels."""
    run = tmp_path / "run"
    cfg = compose_config("train", ["experiment=smoke", "diffusion=flow", "diffusion.name=x_flow_example", *GRID_RUN])
    assert train.run(cfg, run)["step"] == 2
    assert json.loads((run / "model" / "config.json").read_text())["objective"]["name"] == "x_flow_example"
    out = sample.run(
        compose_config("sample", [f"checkpoint={run / 'model'}", f"out_dir={tmp_path / 's'}", *GRID_SAMPLE])
    )
    assert np.array_equal(np.array(Image.open(out / "grid.png")), np.array(Image.open(run / "samples" / "latest.png")))
