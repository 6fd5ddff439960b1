"""python -m dit.hub.export: our format and diffusers' DiTPipeline, the model card, --push without a Hub.

Tiny random-weight models with the real layouts; a run directory laid out as train.py writes it (model/,
checkpoints/, metrics.jsonl with the keys the loop logs, samples/, .hydra/); a tiny random VAE. No downloads.
"""

import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, SMOKE, compose_config
from helpers.tiny import randomize, tiny_dit, tiny_vae
from huggingface_hub import ModelCard
from omegaconf import OmegaConf
from PIL import Image

import sample
from dit.data.class_names import FASHION_MNIST_CLASSES
from dit.diffusion import build_objective
from dit.hub import ModelRecord, load_model, save_export
from dit.hub.export import main

EXTRACTOR = "fashion-mnist-cnn-v1@20767b53ac99/fc1-128"
DDPM = build_objective("ddpm").settings()
FLOW = build_objective("flow").settings()


def weights_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def pixel_model(seed):
    """The smoke run's architecture (DiT-Debug/4 on 32x32 Fashion-MNIST), random weights."""
    return randomize(tiny_dit(input_size=32, in_channels=1), 0.05, seed=seed).eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 6-step smoke run: checkpoints at 4 and 6, the EMA export, evaluations at 3 and 6 (at 6 also a
    final FID on more samples), the grid of step 6, the composed config and the overrides."""
    run = tmp_path_factory.mktemp("run") / "fashion_mnist-dit_debug4-adaln_zero"
    data = dict(name="fashion_mnist", class_names=FASHION_MNIST_CLASSES, latent=False, vae=None, image_size=32)
    for step in (4, 6):
        ckpt = run / "checkpoints" / f"step_{step:07d}"
        save_export(ckpt, pixel_model(step), ModelRecord(DDPM, data), ema=pixel_model(100 + step))
        (ckpt / "trainer_state.json").write_text(json.dumps({"step": step, "train_s": 0.1 * step}))
    save_export(run / "model", pixel_model(6), ModelRecord(DDPM, data), ema=pixel_model(106))
    (run / "finished.json").write_text(json.dumps({"step": 6, "settings": "0" * 64}))
    evaluation = dict(class_consistency=0.5, class_consistency_min=0.0, class_consistency_per_class=[0.5] * 10)
    records = [
        {"step": 2, "loss": 1.02, "mse": 1.0, "vb": 0.02, "train_flops": 1.5e9, "train_s": 0.2},
        {"step": 3, "fid": 900.0, **evaluation, "fid_n": 20, "fid_extractor": EXTRACTOR},
        {"step": 4, "loss": 1.01, "mse": 1.0, "vb": 0.01, "train_flops": 2.9e9, "train_s": 0.4},
        {"step": 6, "loss": 1.00, "mse": 1.0, "vb": 0.0, "train_flops": 4.4e9, "train_s": 0.5},
        {"step": 6, "fid": 812.5, **evaluation, "fid_n": 20, "fid_extractor": EXTRACTOR},
        {"step": 6, "fid": 777.25, **evaluation, "fid_n": 40, "fid_extractor": EXTRACTOR},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "samples").mkdir()
    Image.new("RGB", (34, 34), (200, 10, 10)).save(run / "samples" / "step_0000006.png")
    overrides = ["experiment=smoke", "training.fid_every=3", "training.fid_samples=20", "training.fid_final_samples=40"]
    overrides += ["training.fid_metric=fashion_mnist", "training.fid_ref=fashion_mnist:test"]
    (run / ".hydra").mkdir()
    OmegaConf.save(compose_config("train", [*SMOKE, *overrides[1:]]), run / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")
    return run


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "vae"
    randomize(tiny_vae(), 0.05, seed=1).save_pretrained(path)
    return path


def latent_export(path, vae_dir, num_classes=10, objective=DDPM, **kw):
    """Our export of a latent model (4-channel 16x16 latents, patch 2) whose config names the tiny VAE."""
    model = randomize(tiny_dit(patch_size=2, in_channels=4, num_classes=num_classes, **kw), 0.05, seed=0).eval()
    names = FASHION_MNIST_CLASSES if num_classes == 10 else [f"class {i}" for i in range(num_classes)]
    data = dict(name="latents", class_names=names, latent=True, vae=str(vae_dir))
    return save_export(path, model, ModelRecord(objective, data), ema=model), model


def export(capsys, *args):
    """main(args) -> (exit code, stderr lines)."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


def card_of(path):
    card = ModelCard.load(path / "README.md")
    return card, card.data.to_dict()


def test_ours_export_of_a_run_dir(run_dir, tmp_path, capsys):
    out = tmp_path / "export"
    assert export(capsys, run_dir, "-o", out) == (0, [])
    for use_ema in (True, False):  # the finished run's model/, EMA and raw weights
        assert weights_equal(load_model(out, use_ema)[0], load_model(run_dir / "model", use_ema)[0])
    assert json.loads((out / "config.json").read_text()) == json.loads((run_dir / "model" / "config.json").read_text())
    assert (out / "samples.png").read_bytes() == (run_dir / "samples" / "step_0000006.png").read_bytes()

    card, meta = card_of(out)
    assert meta["library_name"] == "dit" and meta["datasets"] == ["zalando-datasets/fashion_mnist"]
    assert {"diffusion-transformer", "class-conditional", "image-generation", "adaln-zero", "ddpm"} <= set(meta["tags"])
    assert {"fid", "class_consistency"} <= set(meta["metrics"])
    fid = next(r for r in card.data.eval_results if r.metric_type == "fid")
    assert (fid.metric_value, fid.metric_args, fid.dataset_split) == (777.25, {"samples": 40}, "test")  # the final one
    text = card.text
    assert "| FID | 777.2500 | 40 | " + EXTRACTOR in text and "| FID | 812.5000 | 20 |" in text  # both at step 6
    assert "| steps | 6 |" in text and "| global batch | 16 |" in text and "| images seen | 96 |" in text
    assert "4.4e+09 FLOPs to step 6" in text and "DiT-Debug/4: depth 2, width 64" in text
    assert "python train.py experiment=smoke training.fid_every=3" in text
    assert "![EMA samples at step 6](samples.png)" in text and "Fine-tuned" not in text
    assert f"python sample.py checkpoint={out} sampler=ddpm steps=5 cfg_scale=1.5" in text


def test_ours_export_of_a_checkpoint(run_dir, tmp_path, capsys):
    ckpt, out = run_dir / "checkpoints" / "step_0000004", tmp_path / "export"
    assert export(capsys, ckpt, "-o", out) == (0, [])
    for use_ema in (True, False):
        assert weights_equal(load_model(out, use_ema)[0], load_model(ckpt, use_ema)[0])
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "ema.safetensors", "model.safetensors"]
    card, _ = card_of(out)  # the run's record up to step 4: the evaluation at 3, no grid of step 4
    assert "| steps | 4 |" in card.text and "At step 3," in card.text and "| FID | 900.0000 | 20 |" in card.text
    assert card.data.eval_results[0].metric_value == 900.0 and "samples.png" not in card.text


def test_an_unfinished_run_exports_its_latest_checkpoint(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("metrics.jsonl", ".hydra"):
        (run / name).symlink_to(run_dir / name)
    (run / "checkpoints" / "step_0000006").symlink_to(run_dir / "checkpoints" / "step_0000006")
    (run / "model").symlink_to(run_dir / "model")  # an older run's export: no finished.json now
    code, err = export(capsys, run, "-o", tmp_path / "export")
    assert code == 0 and err == [
        f"note: {run} has not finished (no finished.json): exporting its latest checkpoint, step 6"
    ]
    assert weights_equal(load_model(tmp_path / "export")[0], load_model(run_dir / "checkpoints" / "step_0000006")[0])


def test_card_sample_command_runs(run_dir, tmp_path, capsys):
    out = tmp_path / "export"
    assert export(capsys, run_dir, "-o", out)[0] == 0
    (line,) = [x for x in card_of(out)[0].text.splitlines() if x.startswith("python sample.py ")]
    cmd = [sys.executable, str(ROOT / "sample.py"), *shlex.split(line)[2:]]  # as written, from another directory
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Image.open(tmp_path / "samples" / "grid.png").size == (2 * 34 + 2, 10 * 34 + 2)  # as the run's: 10 rows of 2


def test_init_from_is_named(tmp_path, capsys):
    model = pixel_model(0)
    save_export(tmp_path / "ft", model, ModelRecord(DDPM, dict(latent=False)), ema=model)
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    config["init_from"] = {"source": "someone/dit-fmnist", "step": 1000}
    (tmp_path / "ft" / "config.json").write_text(json.dumps(config))
    assert export(capsys, tmp_path / "ft", "-o", tmp_path / "export")[0] == 0
    assert "Fine-tuned from someone/dit-fmnist." in card_of(tmp_path / "export")[0].text
    assert json.loads((tmp_path / "export" / "config.json").read_text())["init_from"]["step"] == 1000


def pipeline_images(pipe, labels, steps, cfg_scale, seed=0):
    """The DiTPipeline's images as sample.py rounds them (uint8 NHWC: round(255 x), x in [0, 1])."""
    out = pipe(
        class_labels=labels,
        num_inference_steps=steps,
        guidance_scale=cfg_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return np.floor(255 * out.images + 0.5).astype(np.uint8)


def sample_py_images(tmp_path, checkpoint, labels, **settings):
    """sample.py's images for labels, one per class in order (batch 0: its noise is seed 0's first draw)."""
    out = tmp_path / f"samples_{len(list(tmp_path.glob('samples_*')))}"
    overrides = dict(checkpoint=checkpoint, out_dir=out, classes=f"[{','.join(map(str, labels))}]", per_class=1)
    overrides |= dict(write_images=True, seed=0, batch_size=64) | settings
    sample.run(compose_config("sample", [f"{k}={v}" for k, v in overrides.items()]))
    return np.load(out / "samples.npz")["arr_0"]


def assert_same_images(a, b):
    # The two compute the same float32 function in a different order (diffusers' attention and q/k/v split, 2N
    # batches through the scheduler): differences of ~1e-6 that can move a value across a rounding boundary,
    # i.e. by one level in 255, never by two (that would need an error of 1/255 ~ 4e-3).
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99, (diff.max(), (diff == 0).mean())
    assert ((a > 0) & (a < 255)).mean() > 0.5  # images, not saturated blanks that would match trivially


@pytest.mark.parametrize("num_classes", [10, 1000])
def test_diffusers_export_samples_as_sample_py(tmp_path, vae_dir, capsys, num_classes):
    from diffusers import DiTPipeline

    src, _ = latent_export(tmp_path / "src", vae_dir, num_classes, timestep_freq_shift=1)
    out = tmp_path / "pipe"
    assert export(capsys, src, "-o", out, "--format", "diffusers") == (0, [])
    pipe = DiTPipeline.from_pretrained(out)
    labels = [1, 7, 3, num_classes - 1]
    theirs = pipeline_images(pipe, labels, steps=4, cfg_scale=3.0)
    ours = sample_py_images(tmp_path, src, labels, sampler="dpmpp", steps=4, cfg_scale=3.0)
    assert_same_images(theirs, ours)
    # sample.py loads the export itself as the same model: K classes again (the padding rows dropped), named.
    model, meta = load_model(out)
    assert weights_equal(model, load_model(src)[0])
    if num_classes == 10:
        assert meta["class_names"] == FASHION_MNIST_CLASSES
        assert pipe.get_label_ids(["Sneaker", "Bag"]) == [7, 8]
        assert pipe.transformer.config.num_embeds_ada_norm == 1000  # the pipeline's null class is 1000


def test_diffusers_card_snippet_and_command_give_the_same_images(tmp_path, vae_dir, capsys, monkeypatch):
    src, _ = latent_export(tmp_path / "src", vae_dir, timestep_freq_shift=1)
    out = tmp_path / "pipe"
    assert export(capsys, src, "-o", out, "--format", "diffusers") == (0, [])
    card, data = card_of(out)
    assert data["library_name"] == "diffusers" and "datasets" not in data and "class-conditional" in data["tags"]
    snippet = card.text.split("```python\n")[1].split("```")[0]
    (line,) = [x for x in card.text.splitlines() if x.startswith("python sample.py ")]
    assert f"DiTPipeline.from_pretrained('{out}')" in snippet and "num_inference_steps=25" in snippet
    assert (
        line == f"python sample.py checkpoint={out} sampler=dpmpp steps=25 cfg_scale=4.0 'classes=[0,1,2,3]' "
        "per_class=1 seed=0"
    )
    # Both as the card has them but for the step count (25 steps take ~15 s each on the 2-core machine).
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(snippet.replace("num_inference_steps=25", "num_inference_steps=3"), scope)
    assert (tmp_path / "sample.png").exists()
    theirs = np.stack([np.asarray(image) for image in scope["images"]])
    overrides = [
        *shlex.split(line.replace("steps=25", "steps=3"))[2:],
        f"out_dir={tmp_path / 's'}",
        "write_images=true",
    ]
    sample.run(compose_config("sample", overrides))
    assert_same_images(theirs, np.load(tmp_path / "s" / "samples.npz")["arr_0"])


def test_a_timestep_frequency_shift_is_measured_and_said(tmp_path, vae_dir, capsys):
    src, _ = latent_export(tmp_path / "src", vae_dir, timestep_freq_shift=0)  # DiT's embedding, our default
    code, err = export(capsys, src, "-o", tmp_path / "pipe", "--format", "diffusers")
    assert code == 0 and len(err) == 1 and err[0].startswith("warning: The DiTPipeline's transformer computes a")
    assert "timestep_freq_shift=0" in err[0] and (tmp_path / "pipe" / "model_index.json").exists()
    assert "downscale_freq_shift=1" in card_of(tmp_path / "pipe")[0].text


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("pixel", "it generates pixels and DiTPipeline always decodes through a VAE"),
        ("flow", "it is a flow-matching model"),
        ("cross_attn", "only has adaLN-Zero blocks, not 'cross_attn'"),
    ],
)
def test_what_cannot_be_a_pipeline_is_written_ours(tmp_path, vae_dir, capsys, kind, reason):
    src = tmp_path / "src"
    if kind == "pixel":
        model = pixel_model(0)
        save_export(src, model, ModelRecord(DDPM, dict(name="fashion_mnist", latent=False)), ema=model)
    else:
        _, model = latent_export(
            src, vae_dir, objective=FLOW if kind == "flow" else DDPM, block="adaln_zero" if kind == "flow" else kind
        )
    out = tmp_path / "export"
    code, err = export(capsys, src, "-o", out, "--format", "diffusers")
    assert code == 0 and len(err) == 1, err
    assert err[0].startswith(f"note: {src} cannot be a diffusers DiTPipeline: ") and reason in err[0]
    assert err[0].endswith("writing --format ours instead")
    assert not (out / "model_index.json").exists() and weights_equal(load_model(out)[0], model)
    card, data = card_of(out)
    assert data["library_name"] == "dit" and "**Not a diffusers DiTPipeline**" in card.text and reason in card.text


def test_push_without_token_or_network_says_so_and_keeps_the_export(run_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # no stored token either
    out = tmp_path / "export"
    cmd = [sys.executable, "-m", "dit.hub.export", str(run_dir), "-o", str(out), "--push", "someone/dit-test"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "not pushed to someone/dit-test: no Hugging Face token (`hf auth login` or HF_TOKEN) and offline mode is on "
        f"(HF_HUB_OFFLINE=1); the export is at {out}"
    )
    assert weights_equal(load_model(out)[0], load_model(run_dir / "model")[0])
    text = card_of(out)[0].text  # the card tells how to get it from the Hub
    assert "hf download someone/dit-test --local-dir dit-test" in text and "checkpoint=dit-test " in text


def test_push_with_a_token_offline(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")  # conftest sets HF_HUB_OFFLINE=1: nothing is sent
    code, err = export(capsys, run_dir, "-o", tmp_path / "export", "--push", "someone/dit-test")
    assert code == 2 and err == [
        f"not pushed to someone/dit-test: offline mode is on (HF_HUB_OFFLINE=1); the export is at {tmp_path / 'export'}"
    ]


def test_an_existing_output_is_refused(run_dir, tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = export(capsys, run_dir, "-o", out)
    assert code == 1 and err == [
        f"error: {out} already exists; pass --overwrite to replace it (only by a complete export)"
    ]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert export(capsys, run_dir, "-o", out, "--overwrite")[0] == 0
    assert not (out / "keep.txt").exists() and (out / "README.md").exists()


def test_bad_input_is_one_line(run_dir, tmp_path, capsys):
    missing = f"error: {tmp_path / 'nowhere'} not found (a run directory, a checkpoint or an export)"
    assert export(capsys, tmp_path / "nowhere", "-o", tmp_path / "a") == (1, [missing])
    model = pixel_model(0)
    save_export(tmp_path / "damaged", model, ModelRecord(DDPM), ema=model)
    weights = tmp_path / "damaged" / "ema.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, err = export(capsys, tmp_path / "damaged", "-o", tmp_path / "b")
    assert code == 1 and len(err) == 1 and err[0].startswith(f"error: {weights} is damaged: truncated")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_post_hoc_ema_export_says_so_in_its_card(run_dir, tmp_path, capsys):
    """An export of python -m dit.phema records which EMA it holds; the export keeps that record and the card says
    it in a sentence."""
    import shutil

    src, out = tmp_path / "phema-step_0000006-sigma_rel_0.100", tmp_path / "export"
    shutil.copytree(run_dir / "model", src)
    config = json.loads((src / "config.json").read_text())
    config["ema"] = {"kind": "power", "sigma_rel": 0.1, "step": 6, "snapshots": 3}
    (src / "config.json").write_text(json.dumps(config))
    assert export(capsys, src, "-o", out) == (0, [])
    assert json.loads((out / "config.json").read_text())["ema"] == config["ema"]
    text = card_of(out)[0].text
    assert "EDM2's post-hoc EMA of relative width 0.1 at step 6, reconstructed from 3 snapshots" in text
