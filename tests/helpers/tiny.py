"""What the test modules build again and again, written once: a tiny DiT, random weights for it, a tiny
diffusers VAE and DiT, and the metrics a run wrote. (Composing configs: conftest.compose_config, smoke_config.)

    from helpers.tiny import randomize, records, tiny_dit, tiny_diffusers_dit, tiny_vae
"""

import json
from pathlib import Path

import torch

from dit.models import BLOCKS, DIT_MODELS, DiT, create_model


def tiny_dit(block: str = "adaln_zero", patch_size: int = 4, **kw) -> DiT:
    """DiT-Debug/<patch_size> (2 blocks, width 64) on 16x16 RGB images with 10 classes; any DiTConfig field
    (block options, in_channels, num_classes, learn_sigma, ...) can be given."""
    kw = dict(input_size=16, in_channels=3, num_classes=10) | BLOCKS[block].needs | kw
    return create_model(f"DiT-Debug/{patch_size}", block=block, **kw)


def conditions(model: DiT, n: int, seed: int = 0) -> dict:
    """forward's conditions beyond y for n images: a random +-1 map for a model with a spatial condition (spade's
    Block.needs), nothing otherwise; on the default device (meta inside ``with torch.device("meta")``)."""
    kw = model.example_conditions(n)
    if "cond_map" in kw and kw["cond_map"].device.type != "meta":
        g = torch.Generator().manual_seed(seed)
        kw["cond_map"] = torch.randint(0, 2, kw["cond_map"].shape, generator=g).float() * 2 - 1
    return kw


def needs_overrides(block: str) -> list[str]:
    """The Hydra overrides of the model settings the block cannot be built without (Block.needs)."""
    return [f"model.{k}={v}" for k, v in BLOCKS[block].needs.items()]


def randomize(module: torch.nn.Module, std: float = 0.1, seed: int | torch.Generator | None = None):
    """Every parameter drawn from N(0, std^2), so that no zero-initialised layer hides a wiring mistake: from
    the global generator, or from ``seed`` (a number, or a generator the caller goes on drawing from)."""
    g = torch.Generator().manual_seed(seed) if isinstance(seed, int) else seed
    with torch.no_grad():
        for p in module.parameters():
            if g is None:
                p.normal_(0, std)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def tiny_vae():
    """A random diffusers AutoencoderKL with SD's layout at toy width: 4 latent channels, 2x downsampling
    (16x16 latents decode to 32x32 images)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )


def tiny_diffusers_dit(**kw):
    """A random diffusers DiTTransformer2DModel (adaLN-Zero, 2 layers, 2 heads of 16) on 4-channel 16x16 latents,
    patch 2, learned sigma, 10 classes; any of its settings can be given."""
    from diffusers import DiTTransformer2DModel

    settings = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2)
    settings |= dict(sample_size=16, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero", norm_eps=1e-6)
    return DiTTransformer2DModel(**settings | kw)


def records(run_dir: Path) -> list[dict]:
    """<run_dir>/metrics.jsonl, one dict a line."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# A two-step smoke run whose final grid has one image of each of the 10 classes, 4 guided sampling steps: what
# the tests that compare sample.py's images with the training grid's train (add "experiment=smoke" and the arm).
GRID_RUN = [
    "training.total_steps=2",
    "training.ckpt_every=0",
    "training.sample_per_class=1",
    "training.sample_max_classes=10",
    "training.grid_sampling.steps=4",
    "training.grid_sampling.cfg_scale=2.0",
]

# sample.py's settings that reproduce GRID_RUN's final grid (seed, batch, sampling); add checkpoint= and out_dir=.
GRID_SAMPLE = ["per_class=1", "steps=4", "cfg_scale=2.0", "seed=0", "batch_size=10"]


# Each zoo size (with adaLN-Zero) and each block (at XL/2): what the tests that build through a path once per size
# and once per block run (tests/test_models.py builds the whole size x block product once, on the meta device).
EACH_SIZE_AND_EACH_BLOCK = [(name, "adaln_zero") for name in DIT_MODELS] + [
    ("DiT-XL/2", block) for block in sorted(BLOCKS) if block != "adaln_zero"
]
