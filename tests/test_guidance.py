"""Autoguidance (Karras et al. 2024) in every sampler: the formula on a toy denoiser, equal to classifier-free
guidance when the guide is the model's own unconditional branch, a guide that does not fit refused in one line,
and sample.py guide=<path>|@STEP end to end."""

import json

import pytest
import torch
from conftest import compose_config, needs_fmnist, smoke_config
from helpers.tiny import randomize, tiny_dit

import sample
import train
from dit.diffusion import GUIDANCE, SAMPLERS, SamplingSettings, build_objective, build_sampler
from dit.diffusion.sampler import auto_guided_model
from dit.hub import ModelRecord, save_export
from dit.sampling import check_guide, guide_path


def test_the_formula_on_a_toy_denoiser():
    """D = D_guide + w (D_main - D_guide) on the guided channels, the rest from the main model; outside the
    interval the main model alone."""
    main = lambda x, t, y: torch.cat([2 * x, x + 1], dim=1)  # noqa: E731 (6 channels out: 3 guided, 3 others)
    guide = lambda x, t, y: torch.cat([x - 1, -x], dim=1)  # noqa: E731
    x, t, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.full((4,), 0.5), torch.zeros(4, dtype=torch.long)
    out = auto_guided_model(main, guide, 3.0)(x, t, y)
    assert torch.allclose(out[:, :3], (x - 1) + 3.0 * (2 * x - (x - 1)))
    assert torch.equal(out[:, 3:], x + 1)
    level = lambda t: t  # noqa: E731
    outside = auto_guided_model(main, guide, 3.0, interval=[0.0, 0.4], noise_level=level)(x, t, y)
    assert torch.equal(outside, main(x, t, y))
    inside = auto_guided_model(main, guide, 3.0, interval=[0.4, 0.6], noise_level=level)(x, t, y)
    assert torch.equal(inside, out)


def _objective_for(sampler: str):
    return build_objective(SAMPLERS[sampler].objectives[0])  # (its defaults)


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_autoguidance_by_the_unconditional_branch_is_classifier_free_guidance(name):
    """Every sampler, DDPM and flow alike: guidance=auto with the model's own null-class branch as the guide gives the
    samples of guidance=cfg (and a guidance interval is applied alike)."""
    torch.manual_seed(0)
    objective = _objective_for(name)
    # (with an interval input for few-step samplers; the others leave it at 0)
    model = randomize(tiny_dit(learn_sigma=objective.name == "ddpm", interval_input=True)).eval()
    null = model.num_classes

    def unconditional(x, t, y, **conditions):
        return model(x, t, torch.full_like(y, null), **conditions)

    noise, y = torch.randn(3, 3, 16, 16), torch.tensor([1, 4, 7])
    images = {}
    for guidance in ("cfg", "auto"):
        settings = SamplingSettings(sampler=name, steps=3, cfg_scale=2.5, guidance=guidance, cfg_interval=[0.2, 0.9])
        sampler = build_sampler(objective, settings)
        images[guidance] = sampler.sample(model, noise, y, torch.Generator().manual_seed(1), guide=unconditional)
    assert torch.allclose(images["auto"], images["cfg"], atol=1e-4), (images["auto"] - images["cfg"]).abs().max()


def test_autoguidance_without_a_guide_and_unknown_guidances_are_one_line():
    objective = build_objective("flow")
    sampler = build_sampler(objective, SamplingSettings(sampler="euler", steps=2, cfg_scale=2.0, guidance="auto"))
    with pytest.raises(ValueError, match=r"^guidance=auto \(cfg_scale=2.0\) needs a guide model: guide="):
        sampler.sample(tiny_dit(), torch.randn(1, 3, 16, 16), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"^unknown guidance 'pag'; valid guidances: auto, cfg, input$"):
        build_sampler(objective, SamplingSettings(sampler="euler", guidance="pag"))
    assert GUIDANCE.names() == ("cfg", "auto", "input")


def test_a_guide_for_another_task_is_refused_naming_what_differs(tmp_path):
    model, other = tiny_dit(), tiny_dit(num_classes=7, learn_sigma=False)
    meta = {"objective": build_objective("flow").settings()}
    with pytest.raises(ValueError, match=r"^guide g cannot guide this model: num_classes: guide 7 vs model 10; out_ch"):
        check_guide(model, meta, other, meta, "g")
    ddpm = {"objective": build_objective("ddpm").settings()}
    with pytest.raises(ValueError, match=r"objective: guide .*'ddpm'.* vs model .*'flow'"):
        check_guide(model, meta, tiny_dit(), ddpm, "g")
    check_guide(model, meta, tiny_dit(patch_size=2), meta, "g")  # another size of the zoo: fine
    (tmp_path / "run" / "checkpoints" / "step_0000500").mkdir(parents=True)
    for checkpoint in ("run/model", "run/checkpoints/step_0001000", "run", "run/phema_exports/phema-step_0002000-x"):
        assert guide_path("@500", tmp_path / checkpoint) == tmp_path / "run" / "checkpoints" / "step_0000500"
    with pytest.raises(FileNotFoundError, match=r"guide=@250: no checkpoint .*step_0000250; the run has step_0000500"):
        guide_path("@250", tmp_path / "run" / "model")


def test_sample_py_with_a_guide(tmp_path):
    """sample.py guidance=auto guide=<export>: guided images, other than unguided and CFG's; a guide that does not fit
    is refused before anything is written."""
    flow = ModelRecord(objective=build_objective("flow").settings(), data={"latent": False})
    torch.manual_seed(0)
    main, weak = randomize(tiny_dit(in_channels=1)), randomize(tiny_dit(in_channels=1, patch_size=8))
    save_export(tmp_path / "main", main, flow, ema=main)
    save_export(tmp_path / "weak", weak, flow, ema=weak)
    common = dict(checkpoint=tmp_path / "main", steps=3, batch_size=4, num_images=4, seed=0)

    def run(out, **kw):
        cfg = compose_config("sample", [f"{k}={v}" for k, v in (common | kw).items()] + [f"out_dir={tmp_path / out}"])
        sample.run(cfg)
        import numpy as np

        return np.load(tmp_path / out / "samples.npz")["arr_0"]

    auto = run("auto", guidance="auto", guide=tmp_path / "weak", cfg_scale=2.0)
    plain = run("plain", cfg_scale=1.0)
    cfg = run("cfg", cfg_scale=2.0)
    assert (auto != plain).any() and (auto != cfg).any()
    save_export(tmp_path / "other", tiny_dit(in_channels=1, num_classes=3), flow, ema=None)
    with pytest.raises(ValueError, match="cannot guide this model: num_classes: guide 3 vs model 10"):
        run("bad", guidance="auto", guide=tmp_path / "other", cfg_scale=2.0)
    assert not (tmp_path / "bad").exists()


@needs_fmnist
def test_in_training_fid_with_autoguidance_by_an_earlier_checkpoint(tmp_path, fmnist_test_stats):
    """training.fid_sampling.guidance=auto guide=@3: the final FID is measured with the run's own step-3 checkpoint as
    the guide; the grids refuse autoguidance (sample.py draws them) at setup, naming the key."""
    fid = [
        "training.fid_every=6",
        "training.fid_samples=20",
        "training.fid_sampling.steps=2",
        "training.fid_metric=fashion_mnist",
        f"training.fid_ref={fmnist_test_stats}",
        "training.fid_sampling.cfg_scale=2",
        "training.fid_sampling.guidance=auto",
        "training.fid_sampling.guide=@3",
        "training.keep_last=0",
    ]
    with pytest.warns(UserWarning, match="unreliable"):  # 20 samples < 128 dims
        train.run(smoke_config(*fid), tmp_path / "run")
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if "fid" in r] == [6]
    bad = smoke_config("training.grid_sampling.guidance=auto", "training.grid_sampling.guide=@3")
    with pytest.raises(ValueError, match=r"^training.grid_sampling: guidance=auto is for the in-training FID"):
        train.run(bad, tmp_path / "bad")
