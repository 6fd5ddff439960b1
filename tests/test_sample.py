"""sample.py end to end on CPU: tiny models, a tiny random VAE, no downloads."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, compose_config
from diffusers import AutoencoderKL, DDPMScheduler, DiTPipeline
from helpers.tiny import tiny_vae
from PIL import Image

import sample
from dit.data.class_names import FASHION_MNIST_CLASSES
from dit.hub import ModelRecord, save_export, to_diffusers
from dit.models import create_model


def sample_cfg(**overrides):
    return compose_config("sample", [f"{k}={v}" for k, v in overrides.items()])


def randomize(model):
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def pixel_export(tmp_path_factory):
    """A Fashion-MNIST-like pixel model: 1 channel, 16x16, 10 named classes."""
    path = tmp_path_factory.mktemp("pixel") / "export"
    model = randomize(create_model("DiT-Debug/4", input_size=16, in_channels=1, num_classes=10))
    save_export(path, model, ModelRecord(data=dict(class_names=FASHION_MNIST_CLASSES, latent=False)), ema=model)
    return path


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    vae = tiny_vae()
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(path)
    return path


def run(**overrides):
    return sample.run(sample_cfg(steps=4, batch_size=4, **overrides))


def test_grid_one_row_per_class(pixel_export, tmp_path):
    out = run(checkpoint=pixel_export, out_dir=tmp_path / "s", classes="[Sneaker,3,ankle boot]", per_class=5)
    grid = Image.open(out / "grid.png")
    # 3 rows x 5 columns of 16x16 images with 2-pixel padding.
    assert grid.size == (5 * 18 + 2, 3 * 18 + 2) and grid.mode == "RGB"
    assert not (out / "samples.npz").exists()


def test_fid_outputs_exact_n_and_types(pixel_export, tmp_path):
    out = run(checkpoint=pixel_export, out_dir=tmp_path / "s", num_images=11)
    with np.load(out / "samples.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (11, 16, 16, 3) and images.dtype == np.uint8
    assert labels.shape == (11,) and labels.dtype == np.int64 and labels.max() < 10
    pngs = sorted((out / "images").glob("*.png"))
    assert len(pngs) == 11
    first = np.array(Image.open(pngs[0]))
    assert first.shape == (16, 16) and first.dtype == np.uint8  # grey stays grey in PNGs
    np.testing.assert_array_equal(first, images[0, ..., 0])
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_deterministic_by_seed(pixel_export, tmp_path):
    def images(seed, name):
        out = run(checkpoint=pixel_export, out_dir=tmp_path / name, num_images=6, seed=seed)
        return np.load(out / "samples.npz")["arr_0"]

    np.testing.assert_array_equal(images(3, "a"), images(3, "b"))
    assert (images(3, "a2") != images(4, "c")).any()


def test_fewer_images_are_the_first_of_more(pixel_export, tmp_path):
    """With the same seed and batch size, N images are the first N of a larger run (labels drawn in
    sequence, each batch's noise seeded by its index): benchmarks/sampler_study.py --images-from relies on it."""
    small = np.load(run(checkpoint=pixel_export, out_dir=tmp_path / "small", num_images=4, seed=5) / "samples.npz")
    large = np.load(run(checkpoint=pixel_export, out_dir=tmp_path / "large", num_images=12, seed=5) / "samples.npz")
    np.testing.assert_array_equal(small["arr_1"], large["arr_1"][:4])
    np.testing.assert_array_equal(small["arr_0"], large["arr_0"][:4])
    assert (large["arr_0"][4:8] != large["arr_0"][:4]).any()  # the other batches are other images


@pytest.mark.slow  # ~16 s: two gloo processes (two processes training: test_train, in make test)
def test_two_processes_give_exactly_n_and_the_same_images(pixel_export, tmp_path):
    one = run(checkpoint=pixel_export, out_dir=tmp_path / "one", num_images=9)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        str(ROOT / "sample.py"),
        f"checkpoint={pixel_export}",
        f"out_dir={tmp_path / 'two'}",
        "num_images=9",
        "steps=4",
        "batch_size=4",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(2 processes)" in proc.stdout
    a, b = np.load(one / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert len(b["arr_0"]) == 9
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    assert len(list((tmp_path / "two" / "images").glob("*.png"))) == 9


def test_latent_model_decodes_through_the_vae(tiny_vae_dir, tmp_path):
    model = randomize(create_model("DiT-Debug/2", input_size=16, in_channels=4, num_classes=5))
    save_export(tmp_path / "export", model, ModelRecord(data=dict(latent=True, vae=str(tiny_vae_dir))), ema=model)
    out = run(checkpoint=tmp_path / "export", out_dir=tmp_path / "s", num_images=3, cfg_scale=1.5)
    images = np.load(out / "samples.npz")["arr_0"]
    assert images.shape == (3, 32, 32, 3)  # 16x16x4 latents -> 32x32 RGB through the 2x VAE


def test_official_checkpoint_with_imagenet_names(tiny_vae_dir, tmp_path):
    model = randomize(create_model("DiT-Debug/2", input_size=16, in_channels=4, num_classes=1000))
    torch.save(model.state_dict(), tmp_path / "DiT-Debug-2.pt")
    out = run(
        checkpoint=tmp_path / "DiT-Debug-2.pt",
        vae=tiny_vae_dir,
        out_dir=tmp_path / "s",
        classes='["golden retriever",otter]',
        per_class=2,
    )
    assert Image.open(out / "grid.png").size == (2 * 34 + 2, 2 * 34 + 2)


def test_diffusers_pipeline_directory(tiny_vae_dir, tmp_path):
    model = randomize(
        create_model("DiT-Debug/2", input_size=16, in_channels=4, num_classes=1000, timestep_freq_shift=1)
    )
    pipe = DiTPipeline(
        transformer=to_diffusers(model),
        vae=AutoencoderKL.from_pretrained(tiny_vae_dir),
        scheduler=DDPMScheduler(num_train_timesteps=1000),
    )
    pipe.save_pretrained(tmp_path / "pipe")
    out = run(checkpoint=tmp_path / "pipe", out_dir=tmp_path / "s", classes="[1,2]", per_class=1, num_images=2)
    assert np.load(out / "samples.npz")["arr_0"].shape == (2, 32, 32, 3)


# --- bad input --------------------------------------------------------------------------------


def test_unknown_class_name_lists_close_names(pixel_export, tmp_path):
    with pytest.raises(ValueError, match=r"unknown class name 'sneakers'; close names: 'Sneaker'"):
        run(checkpoint=pixel_export, out_dir=tmp_path / "s", classes="[sneakers]")


def test_refuses_to_overwrite_samples(pixel_export, tmp_path):
    out = run(checkpoint=pixel_export, out_dir=tmp_path / "s", num_images=2)
    before = (out / "samples.npz").read_bytes()
    with pytest.raises(SystemExit, match="already holds samples"):
        run(checkpoint=pixel_export, out_dir=tmp_path / "s", num_images=3)
    assert (out / "samples.npz").read_bytes() == before
    run(checkpoint=pixel_export, out_dir=tmp_path / "s", num_images=3, overwrite="true")
    assert len(np.load(out / "samples.npz")["arr_0"]) == 3 and len(list((out / "images").glob("*.png"))) == 3


def test_checkpoint_that_does_not_fit_its_config(pixel_export, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in pixel_export.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "config.json").read_text())
    config["model"]["hidden_size"] = 128
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        run(checkpoint=bad, out_dir=tmp_path / "s")
    assert f"checkpoint {bad / 'ema.safetensors'} does not fit the model config" in str(err.value)
    assert "x_embedder.proj.weight: checkpoint (64, 1, 4, 4) vs model (128, 1, 4, 4)" in str(err.value)


def test_pickled_code_is_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"model": Evil(), "ema": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not a loadable official DiT checkpoint"):
        run(checkpoint=tmp_path / "evil.pt", out_dir=tmp_path / "s")
    assert not (tmp_path / "pwned").exists()


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        run(checkpoint=tmp_path / "nope", out_dir=tmp_path / "s")


def test_cli_error_exits_nonzero(pixel_export, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "sample.py"),
            f"checkpoint={pixel_export}",
            f"out_dir={tmp_path}",
            "classes=[jacket]",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "unknown class name 'jacket'" in proc.stderr


def test_bad_sampling_values_fail_at_composition_or_before_loading(pixel_export, tmp_path):
    """sample.yaml's schema is SampleConfig (SamplingSettings + sample.py's keys): a wrong type or an unknown
    key fails when the config is composed, a bad value before the checkpoint is read."""
    from hydra.errors import ConfigCompositionException

    for bad in ("steps=many", "cfg_scale=strong", "sampler_options={eta:1}", "stepz=4"):
        with pytest.raises(ConfigCompositionException):
            sample_cfg(**dict([bad.split("=", 1)]))
    with pytest.raises(ValueError, match="unknown sampler 'ddmi'; valid samplers: ddim, ddpm"):
        run(checkpoint=tmp_path / "not read", out_dir=tmp_path / "s", sampler="ddmi")
    with pytest.raises(ValueError, match=r"cfg_interval=\[0.9, 0.1\]: need 0 <= lo <= hi <= 1"):
        run(checkpoint=tmp_path / "not read", out_dir=tmp_path / "s", cfg_interval="[0.9,0.1]")
    with pytest.raises(ValueError, match="sampler 'ddim' has no option etta; its options: eta, clip_denoised"):
        run(checkpoint=pixel_export, out_dir=tmp_path / "s", sampler="ddim", **{"+options": "{etta:1}"})


def test_sampler_options_and_the_model_checked_once(pixel_export, tmp_path, monkeypatch):
    """+options={...} reaches the sampler (ddim eta=1 draws noise: other images than eta=0); the model is checked
    against the sampler once per sample.py call, however many batches."""
    from dit.diffusion import Sampler

    calls = []
    check = Sampler.check_model
    monkeypatch.setattr(
        Sampler, "check_model", lambda self, model, guide=None: calls.append(1) or check(self, model, guide)
    )
    grids = {}
    for eta in (0.0, 1.0):
        out = tmp_path / f"eta{eta}"
        options = {"+options": f"{{eta:{eta}}}"}
        sample.run(
            sample_cfg(
                checkpoint=pixel_export, out_dir=out, sampler="ddim", steps=4, batch_size=2, per_class=1, **options
            )
        )
        grids[eta] = np.array(Image.open(out / "grid.png"))
    assert len(calls) == 2  # two sample.py calls of 5 batches each
    assert not np.array_equal(grids[0.0], grids[1.0])
