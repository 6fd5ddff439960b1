"""The flow objective's training accelerators (configs/diffusion/flow.yaml): SD3's time shift in training and in the
ODE grid, contrastive flow matching, x-prediction with the velocity loss; each checked against its formula."""

import json

import pytest
import torch
from conftest import compose_config, needs_fmnist
from helpers.tiny import GRID_RUN, GRID_SAMPLE

import sample
import train
from dit.diffusion import SamplingSettings, build_objective, build_sampler
from dit.diffusion.flow import X_PREDICTION_EPS, FlowMatching
from dit.training.digest import settings_digest
from dit.training.randomness import SlicedRandom


def rng(step=0):
    return SlicedRandom(3, step, 0, 1, 0, torch.device("cpu"))


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_time_shift_moves_training_times_as_sd3_eq_23(sampling):
    """SD3 (Esser et al. 2024, eq. 23), in its noise-level time s (1 = noise): s_m = a s_n / (1 + (a - 1) s_n)."""
    x = torch.zeros(4096, 1, 2, 2)
    plain = FlowMatching(sampling).draw(rng(), x)
    shifted = FlowMatching(sampling, time_shift=3.0).draw(rng(), x)
    s_n = 1 - plain["t"].double()
    torch.testing.assert_close(1 - shifted["t"].double(), 3 * s_n / (1 + 2 * s_n), rtol=1e-6, atol=1e-7)
    assert torch.equal(plain["noise"], shifted["noise"])  # the same draws, in the same order
    assert (1 - shifted["t"]).mean() > (1 - plain["t"]).mean() + 0.1  # more time at high noise
    assert torch.equal(FlowMatching(sampling, time_shift=1.0).draw(rng(), x)["t"], plain["t"])  # 1: SiT's, bit for bit


class Recorder(torch.nn.Module):
    """Returns a fixed velocity field and records the times it is called at."""

    def __init__(self):
        super().__init__()
        self.times = []

    def forward(self, x, t, y):
        self.times.append(float(t[0]))
        return -x


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_ode_samplers_integrate_on_the_shifted_grid(name):
    objective = FlowMatching(time_shift=3.0)
    sampler = build_sampler(objective, SamplingSettings(sampler=name, steps=4))
    model = Recorder()
    sampler.run(model, torch.ones(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), None)
    grid = [i / 4 for i in range(5)]
    shifted = [1 - 3 * (1 - t) / (1 + 2 * (1 - t)) for t in grid]
    expected = shifted[:-1] if name == "euler" else [t for a, b in zip(shifted[:-1], shifted[1:]) for t in (a, b)]
    assert model.times == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="euler or heun"):
        build_sampler(objective, SamplingSettings(sampler="euler_maruyama", steps=4))


def test_contrastive_term_is_minus_weight_times_the_mse_to_another_samples_target():
    torch.manual_seed(0)
    x = torch.randn(5, 1, 4, 4)
    draw = {"t": torch.rand(5), "noise": torch.randn(5, 1, 4, 4)}

    def model(xt, t, y=None):
        return torch.tanh(xt) * (1 + t.view(-1, 1, 1, 1))

    objective = FlowMatching(contrastive_weight=0.05)
    terms = objective.losses(model, x, draw, {})
    assert objective.loss_terms == ("loss", "flow_mse", "contrastive_mse")
    # By hand: x_t = t x + (1 - t) noise, target u = x - noise, negative = the previous sample's target.
    t = draw["t"].view(-1, 1, 1, 1)
    xt, u = t * x + (1 - t) * draw["noise"], x - draw["noise"]
    v = model(xt, draw["t"])
    mse = ((v - u) ** 2).mean(dim=(1, 2, 3))
    negative = torch.cat([u[-1:], u[:-1]])
    contrast = ((v - negative) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(terms["flow_mse"], mse)
    torch.testing.assert_close(terms["contrastive_mse"], contrast)
    torch.testing.assert_close(terms["loss"], mse - 0.05 * contrast)
    assert set(FlowMatching().losses(model, x, draw, {})) == {"loss"}  # off: SiT's loss alone
    torch.testing.assert_close(FlowMatching().losses(model, x, draw, {})["loss"], mse)


def test_x_prediction_an_oracle_of_the_data_has_zero_loss_and_samples_the_data():
    """A network that outputs the data x1 itself: its velocity (x1 - x_t) / (1 - t) is the target x1 - x0 wherever
    1 - t >= X_PREDICTION_EPS, and Euler steps with it land on x1."""
    x1 = torch.randn(3, 1, 4, 4)
    objective = FlowMatching(prediction="x")

    def oracle(xt, t, y=None):
        return x1

    draw = {"t": torch.tensor([0.0, 0.5, 1 - 2 * X_PREDICTION_EPS]), "noise": torch.randn(3, 1, 4, 4)}
    assert objective.losses(oracle, x1, draw, {})["loss"].abs().max() < 1e-10
    near_data = {"t": torch.tensor([0.99, 0.99, 0.99]), "noise": draw["noise"]}  # 1 - t clipped at the eps
    assert objective.losses(oracle, x1, near_data, {})["loss"].min() > 0
    sampler = build_sampler(objective, SamplingSettings(sampler="euler", steps=7))
    out = sampler.run(oracle, torch.randn(3, 1, 4, 4), torch.zeros(3, dtype=torch.long), None)
    torch.testing.assert_close(out, x1, rtol=1e-5, atol=1e-5)
    velocity = build_sampler(FlowMatching(), SamplingSettings(sampler="euler", steps=7))
    assert not torch.allclose(velocity.run(oracle, torch.randn(3, 1, 4, 4), None, None), x1)  # read as a velocity


def test_settings_at_their_defaults_are_left_out_of_records_and_digests():
    assert FlowMatching().settings() == {
        "name": "flow",
        "time_sampling": "uniform",
        "logit_mean": 0.0,
        "logit_std": 1.0,
    }
    settings = FlowMatching(time_shift=3.0, contrastive_weight=0.05, prediction="x").settings()
    assert build_objective(**settings).settings() == settings
    assert settings["time_shift"] == 3.0 and settings["prediction"] == "x" and settings["contrastive_weight"] == 0.05
    digest = {o: settings_digest(_resolved(["diffusion=flow", *o])) for o in ((), ("diffusion.time_shift=3",))}
    assert digest[()] != digest[("diffusion.time_shift=3",)]
    assert digest[()] == settings_digest({**_resolved(["diffusion=flow"]), "diffusion": _flow_without_new_keys()})


def _resolved(overrides):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose_config("train", ["experiment=smoke", *overrides]), resolve=True)


def _flow_without_new_keys():
    flow = _resolved(["diffusion=flow"])["diffusion"]
    return {k: v for k, v in flow.items() if k not in FlowMatching.ADDED_SETTINGS}


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("time_shift", 0.0, "time_shift"), ("contrastive_weight", 1.0, "contrastive_weight"), ("prediction", "eps", "x")],
)
def test_bad_values_are_named(key, value, message):
    with pytest.raises(ValueError, match=message):
        FlowMatching(**{key: value})


@needs_fmnist
def test_train_with_all_three_and_sample_with_sample_py(tmp_path):
    run = tmp_path / "run"
    arm = ["diffusion=flow", "diffusion.time_shift=3", "diffusion.contrastive_weight=0.05", "diffusion.prediction=x"]
    cfg = compose_config("train", ["experiment=smoke", *arm, *GRID_RUN])
    assert train.run(cfg, run)["step"] == 2
    meta = json.loads((run / "model" / "config.json").read_text())
    assert {k: meta["objective"][k] for k in FlowMatching.ADDED_SETTINGS} == {
        "time_shift": 3.0,
        "contrastive_weight": 0.05,
        "prediction": "x",
    }
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("contrastive_mse" in r and "flow_mse" in r for r in logged)
    out = sample.run(
        compose_config("sample", [f"checkpoint={run / 'model'}", f"out_dir={tmp_path / 's'}", *GRID_SAMPLE])
    )
    from PIL import Image

    # sample.py samples as the model was trained (shifted grid, x-prediction): the training grid, pixel for pixel
    assert Image.open(out / "grid.png").tobytes() == Image.open(run / "samples" / "latest.png").tobytes()
