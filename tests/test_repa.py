"""REPA (dit/training/addons/repa.py): the alignment loss against float64 arithmetic, where its gradient goes, the
encoders (a registered one, timm from a local file, a missing file named), and training runs that export a plain
DiT, load, and resume exactly."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import compose_config, needs_fmnist
from helpers.tiny import randomize, records, tiny_dit

import train
from dit.hub import load_model
from dit.models.flops import training_flops
from dit.models.routing import TokenRouting
from dit.training.addons.repa import TEACHERS, REPAConfig, REPAModel, TimmTeacher, repa_loss, teacher_tokens


class ToyTeacher(nn.Module):
    """A fixed random conv encoder: (N, 1, 32, 32) -> 4 x 4 patches of 16 features."""

    name, grid, dim = "toy_teacher_test", 4, 16
    input_shape = (1, 32, 32)

    def __init__(self):
        super().__init__()
        torch.manual_seed(123)
        self.conv = nn.Conv2d(1, 16, kernel_size=8, stride=8)

    def forward(self, images):
        return self.conv(images).flatten(2).transpose(1, 2)  # (N, 16, 16)


@pytest.fixture
def toy_teacher():
    TEACHERS.add(ToyTeacher)
    yield ToyTeacher
    TEACHERS.remove(ToyTeacher.name)


def test_loss_is_minus_the_mean_cosine_similarity():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    an, bn = a.double().numpy(), b.double().numpy()
    cos = (an * bn).sum(-1) / (np.linalg.norm(an, axis=-1) * np.linalg.norm(bn, axis=-1))
    np.testing.assert_allclose(repa_loss(a, b).numpy(), -cos.mean(axis=1), rtol=1e-5)
    assert torch.allclose(repa_loss(a, a), torch.full((3,), -1.0))  # aligned: the minimum, -1


def test_the_alignment_trains_the_projector_and_the_blocks_up_to_the_aligned_one():
    dit = randomize(tiny_dit(in_channels=1, input_size=32), 0.05, seed=0)
    dit.blocks.append(type(dit.blocks[0])(dit.config))  # a third block, after the aligned one
    model = REPAModel(dit, REPAConfig(weight=0.5, block=1, projector_dim=32), teacher_dim=16).train()
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([3, 500]), torch.tensor([1, 2])
    model(x, t, y)
    assert model.projected.shape == (2, 64, 16)  # 8 x 8 tokens, the teacher's width
    repa_loss(model.projected, torch.randn(2, 64, 16)).mean().backward()  # the REPA term alone
    grad = {n: p.grad for n, p in model.named_parameters()}
    assert grad["repa_projector.0.weight"].abs().sum() > 0
    assert grad["dit.blocks.0.attn.qkv.weight"].abs().sum() > 0 and grad["dit.x_embedder.proj.weight"].abs().sum() > 0
    assert all(grad[n] is None for n in grad if n.startswith(("dit.blocks.1.", "dit.blocks.2.", "dit.final_layer")))
    model.eval()
    model(x, t, y)  # sampling-style forwards leave nothing behind
    assert model._hidden is None


def test_teacher_features_follow_the_dits_grid():
    teacher = ToyTeacher()
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    same = teacher_tokens(teacher, images, grid=4)
    assert torch.equal(same, teacher(images))
    finer = teacher_tokens(teacher, images, grid=8)
    assert finer.shape == (2, 64, 16)
    coarse = finer.transpose(1, 2).reshape(2, 16, 8, 8)
    # bilinear 4 -> 8 (align_corners=False): the mean over each 2 x 2 block keeps the teacher's patch means closely
    pooled = torch.nn.functional.avg_pool2d(coarse, 2).flatten(2).transpose(1, 2)
    assert torch.corrcoef(torch.stack([pooled.flatten(), same.flatten()]))[0, 1] > 0.95


def test_timm_encoder_from_a_local_file_and_a_missing_file_named(tmp_path):
    import timm
    from safetensors.torch import save_file

    kw = dict(depth=2, embed_dim=48, num_heads=2, patch_size=8, img_size=32)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **kw)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "vit.safetensors")
    teacher = TimmTeacher("vit_tiny_patch16_224", tmp_path / "vit.safetensors", resolution=32, **kw)
    out = teacher(torch.rand(2, 1, 28, 28) * 2 - 1)  # grey and another size: expanded to RGB, resized
    assert out.shape == (2, 16, 48) and (teacher.grid, teacher.dim) == (4, 48)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        TimmTeacher("vit_base_patch14_dinov2", tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    ("repa", "routing", "latent", "message"),
    [
        (REPAConfig(weight=0.5, block=3), None, False, "block"),
        (REPAConfig(weight=0.5, block=1), None, True, "latents"),
        (REPAConfig(weight=0.5, block=1), TokenRouting(ratio=0.5, start=0, end=2), False, "routing"),
        (REPAConfig(weight=-1.0), None, False, "weight"),
    ],
)
def test_bad_settings_are_named(repa, routing, latent, message):
    dataset = type("Data", (), {"latent": latent})()
    with pytest.raises(ValueError, match=message):
        repa.check(tiny_dit(), dataset, routing)
    if latent:  # latents with their images stored beside them (extract --pixels) are what REPA reads at scale
        with pytest.raises(ValueError, match="--pixels"):
            repa.check(tiny_dit(), dataset, routing)
        repa.check(tiny_dit(), type("Data", (), {"latent": True, "pixels": 224})(), routing)


def _tiny_timm_encoder(path):
    """A 2-block ViT of timm's saved as a local weights file (what a user downloads for DINOv2), and the overrides
    that select it."""
    import timm
    from safetensors.torch import save_file

    kw = dict(depth=2, embed_dim=48, num_heads=2, patch_size=8, img_size=32)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **kw)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    return [
        "training.repa.encoder=timm:vit_tiny_patch16_224",
        f"training.repa.encoder_weights={path}",
        "training.repa.encoder_resolution=32",
        "+training.repa.encoder_kwargs={" + ",".join(f"{k}:{v}" for k, v in kw.items()) + "}",
    ]


def test_latents_extracted_with_their_pixels_give_the_images_flipped_as_their_latents(tmp_path):
    """extract --pixels stores each image exactly (uint8); a batch's images are flipped by the same draw as its
    latents; without --pixels there are none."""
    from helpers.tiny import tiny_vae
    from test_train import image_folder

    from dit.data import ImageFolder, LatentShards, with_images
    from dit.data.extract import main as extract
    from dit.training.randomness import SlicedRandom

    tiny_vae().save_pretrained(tmp_path / "vae")
    root = image_folder(tmp_path / "data", size=16)
    common = ["--root", str(root), "--image-size", "16", "--vae", str(tmp_path / "vae"), "--shard-size", "5"]
    extract([*common, "--out", str(tmp_path / "px"), "--pixels"])
    extract([*common, "--out", str(tmp_path / "small"), "--pixels", "--pixel-size", "12"])
    extract([*common, "--out", str(tmp_path / "bare")])
    with pytest.raises(SystemExit, match="--pixel-size"):
        extract([*common, "--out", str(tmp_path / "no"), "--pixel-size", "12"])
    images = ImageFolder(root, image_size=16, hflip=False)
    ds = LatentShards(tmp_path / "px")
    assert (
        ds.pixels == 16
        and LatentShards(tmp_path / "small").pixels == 12
        and LatentShards(tmp_path / "bare").pixels is None
    )
    for i in (0, 7, 11):  # across shards
        item, label = ds[i]
        assert torch.equal(item["pixels"].float() / 127.5 - 1, images[i][0]) and label == images[i][1]
        assert torch.equal(item["stats"], LatentShards(tmp_path / "bare")[i][0])
    assert LatentShards(tmp_path / "small")[3][0]["pixels"].shape == (3, 12, 12)
    # A batch whose two flips' latents are told apart by their value (std 0): each image follows its latent's flip.
    n = 64
    stats = torch.zeros(n, 2, 2, 4, 8, 8)
    stats[:, 0, 1] = 1.0  # mean of the flipped copy: 1, of the original: 0
    pixels = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8)
    rng = lambda: SlicedRandom(0, 5, 0, 1, 0, torch.device("cpu"))  # noqa: E731
    latents, imgs = with_images(ds, {"stats": stats, "pixels": pixels}, rng())
    flipped = latents.flatten(1).mean(1) > 0
    assert 10 < flipped.sum() < n - 10
    original = pixels.float() / 127.5 - 1
    assert torch.equal(imgs[~flipped], original[~flipped]) and torch.equal(imgs[flipped], original[flipped].flip(-1))
    assert torch.equal(ds.batch_transform({"stats": stats, "pixels": pixels}, rng()), latents)  # the same draw
    bare_latents, none = with_images(LatentShards(tmp_path / "bare"), stats, rng())
    assert none is None and torch.equal(bare_latents, latents)


def test_the_imagenet_recipes_compose_and_train_on_latents_with_pixels_at_tiny_size(tmp_path):
    """configs/experiment/repa_{sit,dit}_xl2_imagenet256: the paper's settings as composed; then REPA on latents
    extracted with --pixels, the encoder a timm ViT from a local file, two steps at CPU size."""
    from helpers.tiny import tiny_vae
    from test_train import image_folder

    from dit.data.extract import main as extract

    for recipe, objective in (("repa_sit_xl2_imagenet256", "flow"), ("repa_dit_xl2_imagenet256", "ddpm")):
        full = compose_config("train", [f"experiment={recipe}"])
        assert (full.model.name, full.data.name, full.diffusion.name) == ("DiT-XL/2", "latents", objective)
        repa = full.training.repa
        assert (repa.weight, repa.block, repa.encoder, repa.encoder_resolution, repa.projector_dim) == (
            0.5,
            8,
            "timm:vit_base_patch14_dinov2",
            224,
            2048,
        )
    tiny_vae().save_pretrained(tmp_path / "vae")
    root = image_folder(tmp_path / "data", size=32)
    extract(
        [
            "--root",
            str(root),
            "--image-size",
            "32",
            "--vae",
            str(tmp_path / "vae"),
            "--out",
            str(tmp_path / "lat"),
            "--pixels",
        ]
    )
    tiny = [
        "model=dit_debug2",
        f"data.dataset.root={tmp_path / 'lat'}",
        "training.total_steps=2",
        "training.global_batch_size=4",
        "training.mixed_precision=no",
        "training.num_workers=0",
        "training.ckpt_every=0",
        "training.sample_every=0",
        "training.grid_sampling.steps=2",
        "model.depth=2",
        "model.size=null",
        "model.name=null",
        "training.repa.block=1",
        "training.repa.projector_dim=32",
    ]
    encoder = _tiny_timm_encoder(tmp_path / "vit.safetensors")
    train.run(compose_config("train", ["experiment=repa_sit_xl2_imagenet256", *tiny, *encoder]), tmp_path / "run")
    recs = records(tmp_path / "run")
    assert recs[-1]["step"] == 2 and all(-1 <= r["repa"] <= 1 for r in recs)
    with pytest.raises(FileNotFoundError, match="dinov2_vitb14.safetensors"):  # the recipe's weights, absent here
        train.run(compose_config("train", ["experiment=repa_sit_xl2_imagenet256", *tiny]), tmp_path / "absent")


@needs_fmnist
def test_training_with_repa_exports_a_plain_dit_and_resumes_exactly(tmp_path, toy_teacher):
    repa = {"weight": 0.5, "block": 1, "encoder": "toy_teacher_test", "projector_dim": 32}
    arm = ["experiment=smoke", *(f"training.repa.{k}={v}" for k, v in repa.items())]
    cfg = compose_config("train", arm)
    full = train.run(cfg, tmp_path / "full")
    assert {"repa", "loss", "mse"} <= set(records(tmp_path / "full")[0])
    # The cost axis counts REPA's work beside the DiT's: the projector's forward and backward on every token (3 x
    # 2 FLOPs per multiply-add of its three layers) and the encoder's forward (its 8x8 convolution, 16 outputs
    # at 4x4 positions), per image of the global batch (16).
    config = full["model"].config
    d, p, e, tokens = config.hidden_size, 32, ToyTeacher.dim, config.grid_size**2
    per_image = training_flops(config) + 3 * 2 * tokens * (d * p + p * p + p * e) + 2 * 16 * 4 * 4 * 8 * 8
    logged = [r for r in records(tmp_path / "full") if "loss" in r]
    assert [r["train_flops"] for r in logged] == [
        r["step"] * per_image * cfg.training.global_batch_size for r in logged
    ]
    assert all(-1 <= r["repa"] <= 1 for r in records(tmp_path / "full") if "repa" in r)
    # The export and the EMA are the DiT's alone, and load as any model; a checkpoint's raw weights too.
    for path, use_ema in (
        (tmp_path / "full" / "model", True),
        (tmp_path / "full" / "checkpoints" / "step_0000006", False),
    ):
        model, _ = load_model(path, use_ema=use_ema)
        assert not any("repa" in k for k in model.state_dict())
    reference = full["model"].state_dict()
    train.run(compose_config("train", [*arm, "training.total_steps=3"]), tmp_path / "half")
    resumed = train.run(compose_config("train", [*arm, "resume=auto"]), tmp_path / "half")
    for k, v in reference.items():
        assert torch.equal(resumed["model"].state_dict()[k], v), k  # the projector's state came back too
    plain = train.run(compose_config("train", ["experiment=smoke"]), tmp_path / "plain")
    w = "blocks.0.attn.qkv.weight"
    assert not torch.equal(plain["model"].state_dict()[w], reference[w])  # the alignment changed the training


@needs_fmnist
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["ddp", "fsdp"])
def test_repa_on_two_processes_matches_one(tmp_path, launcher):
    """A timm encoder from a local file, through train.py's overrides as a user gives them; DDP and FSDP2 keep the
    projector in step across processes: the same losses and REPA terms as one process, and the same export."""
    from safetensors.torch import load_file
    from test_train import HELPER, SMOKE, accelerate_launch, run_all

    repa = ["training.repa.weight=0.5", "training.repa.block=1", "training.repa.projector_dim=32"]
    overrides = [*SMOKE, *repa, *_tiny_timm_encoder(tmp_path / "vit.safetensors")]
    extra = ["--fsdp-on-cpu"] if launcher == "fsdp" else []
    port = {"ddp": "29581", "fsdp": "29582"}[launcher]
    cmd = accelerate_launch(launcher, "--num_processes", "2", "--main_process_port", port, HELPER, *extra)
    run_all([*cmd, str(tmp_path / "two"), *overrides])
    one = train.run(compose_config("train", overrides), tmp_path / "one")
    for key in ("loss", "repa"):
        np.testing.assert_allclose(
            [r[key] for r in records(tmp_path / "two")], [r[key] for r in records(tmp_path / "one")], rtol=1e-4
        )
    exported = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert set(exported) == set(one["model"].state_dict())  # the DiT's tensors only
    for k, v in one["model"].state_dict().items():
        torch.testing.assert_close(exported[k], v, rtol=1e-4, atol=1e-6, msg=k)


@needs_fmnist
def test_the_teacher_trained_here_is_the_default_encoder(tmp_path):
    """training.repa.weight=0.5 alone: the shipped Fashion-MNIST teacher (dit/training/teachers.py), 8 x 8 patches on
    the smoke model's 8 x 8 tokens, no resize."""
    result = train.run(
        compose_config(
            "train",
            ["experiment=smoke", "training.repa.weight=0.5", "training.repa.block=1", "training.repa.projector_dim=32"],
        ),
        tmp_path,
    )
    assert result["step"] == 6
    assert all(-1 <= r["repa"] <= 1 for r in records(tmp_path) if "repa" in r)
