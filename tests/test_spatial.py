"""Spatial conditions (dit/models/spatial.py) and the SPADE block: the silhouette maps against their definition in
float64 numpy, SPADE's modulation against its formula, the three ways a map enters, label dropout and guidance
dropping the map with the label, the refusals, and the silhouette task end to end through train.py and sample.py."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config, needs_fmnist, smoke_config
from helpers.tiny import conditions, randomize, tiny_dit
from PIL import Image

import sample
import train
from dit.diffusion.sampler import guided_model
from dit.models import DiT, get_block
from dit.models.blocks import AdaLNZeroBlock, SPADEBlock
from dit.models.config import DiTConfig
from dit.models.spatial import MAPS, drop_maps, map_iou
from dit.sampling import GenerationSpec, generate

SILHOUETTE = MAPS["silhouette"]()


def silhouette_reference(images: np.ndarray, size: int) -> np.ndarray:
    """The definition in float64: intensity in [0, 1] above 0.1 is garment; a cell is garment when >= half is."""
    n, _, h, w = images.shape
    garment = ((images.astype(np.float64).mean(1) + 1) / 2 > 0.1).astype(np.float64)  # (n, h, w)
    cells = garment.reshape(n, size, h // size, size, w // size).mean(axis=(2, 4))
    return np.where(cells >= 0.5, 1.0, -1.0)[:, None]


def test_silhouette_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 1, 32, 32, generator=g) * 2 - 1
    images[:3, :, :, :16] = -1.0  # half background: both signs of cells occur
    for size in (8, 4, 16):
        got = SILHOUETTE(images, size)
        assert got.shape == (6, 1, size, size) and set(got.unique().tolist()) == {-1.0, 1.0}
        np.testing.assert_array_equal(got.numpy(), silhouette_reference(images.numpy(), size))


@needs_fmnist
def test_fashion_mnist_silhouettes_look_like_garments():
    from dit.data import FashionMNIST

    data = FashionMNIST(split="test")
    images, labels = data.images[:500], data.labels[:500]
    maps = SILHOUETTE(images, 8)
    np.testing.assert_array_equal(maps.numpy(), silhouette_reference(images.numpy(), 8))
    share = (maps > 0).float().mean(dim=(1, 2, 3))
    assert ((share > 0) & (share < 1)).all()  # every silhouette has garment and background cells
    trousers, bags = share[labels == 1].mean(), share[labels == 8].mean()
    assert 0.1 < trousers < bags < 0.7  # narrow trousers cover fewer cells than bags


def test_map_iou():
    a = torch.tensor([[1, 1], [-1, -1]]).float().view(1, 1, 2, 2)
    b = torch.tensor([[1, -1], [1, -1]]).float().view(1, 1, 2, 2)
    empty = -torch.ones(1, 1, 2, 2)
    got = map_iou(torch.cat([a, a, empty]), torch.cat([b, a, empty]))
    torch.testing.assert_close(got, torch.tensor([1 / 3, 1.0, 1.0]))


# --- the model ---------------------------------------------------------------------------------------------


def map_model(map_input: str, block: str = "adaln_zero", **kw) -> DiT:
    return tiny_dit(block, 4, **{"cond_map": "silhouette", "map_size": 8, "map_input": map_input} | kw)


ARMS = [("channels", "adaln_zero"), ("tokens", "adaln_zero"), ("blocks", "spade"), ("tokens", "in_context")]


@pytest.mark.parametrize(("map_input", "block"), ARMS)
def test_every_way_in_reads_the_map_and_trains(map_input, block):
    model = randomize(map_model(map_input, block), std=0.1, seed=0).train()
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999]), torch.tensor([1, 4, 7])
    kw = conditions(model, 3, seed=1)
    drops = torch.zeros(3, dtype=torch.long)  # no label dropout: the maps all reach the model
    out = model(x, t, y, force_drop_ids=drops, **kw)
    assert out.shape == (3, 6, 16, 16)
    other = model(x, t, y, force_drop_ids=drops, cond_map=-kw["cond_map"])
    assert not torch.allclose(out, other)  # the output depends on the map
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if "embedding_table" not in name:
            assert p.grad.abs().sum() > 0, name


def test_a_dropped_label_drops_its_map():
    model = map_model("channels").eval()
    seen = {}
    model.x_embedder.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([10, 20]), torch.tensor([1, 2])
    m = conditions(model, 2)["cond_map"]
    model(x, t, y, force_drop_ids=torch.tensor([1, 0]), cond_map=m)
    up = F.interpolate(m, size=(16, 16), mode="nearest")
    assert torch.equal(seen["x"][0, 3:], torch.zeros_like(up[0])) and torch.equal(seen["x"][1, 3:], up[1])
    assert torch.equal(drop_maps(m, torch.tensor([0, 1]))[1], torch.zeros_like(m[1]))
    # training without given drops: the embedder's rule draws them, and drops the maps alike
    model.train()
    torch.manual_seed(0)
    model.y_embedder.dropout_prob = 1.0
    model(x, t, y, cond_map=m)
    assert torch.equal(seen["x"][:, 3:], torch.zeros_like(seen["x"][:, 3:]))


def test_guidance_gives_the_unconditional_branch_the_null_map():
    calls = []

    def model(x, t, y, cond_map):
        calls.append((y.clone(), cond_map.clone()))
        return torch.where(cond_map.flatten(1).sum(1, keepdim=True) != 0, 2.0, 1.0).view(-1, 1, 1, 1) * x

    x, t, y = torch.ones(2, 1, 4, 4), torch.tensor([5, 5]), torch.tensor([3, 4])
    m = torch.ones(2, 1, 2, 2)
    out = guided_model(model, 3.0, null_class=10)(x, t, y, cond_map=m)
    ((labels, maps),) = calls
    assert labels.tolist() == [3, 4, 10, 10]
    assert torch.equal(maps[:2], m) and torch.equal(maps[2:], torch.zeros_like(m))
    torch.testing.assert_close(out, 1.0 + 3.0 * (2.0 - 1.0) * x)  # uncond + s (cond - uncond)


def test_spade_block_matches_its_formula_in_float64():
    torch.manual_seed(0)
    spatial = dict(cond_map="silhouette", map_size=8, map_input="blocks")
    config = DiTConfig(size="Debug/4", input_size=16, in_channels=3, num_classes=10, block="spade", **spatial)
    block = randomize(SPADEBlock(config), std=0.2, seed=0).double()
    d = config.hidden_size
    x, c = torch.randn(2, 16, d, dtype=torch.float64), torch.randn(2, d, dtype=torch.float64)
    m = torch.randint(0, 2, (2, 1, 8, 8)).double() * 2 - 1
    # the formula: per token, the six vectors from c plus those of the map's 2x2 cells under the token
    lin = block.adaLN_modulation[1]
    from_c = F.silu(c) @ lin.weight.T + lin.bias  # (N, 6D)
    conv1, conv2 = block.spade.shared[0], block.spade.out
    h = F.relu(F.conv2d(m, conv1.weight, conv1.bias, padding=1))  # (N, 32, 8, 8)
    patches = h.unfold(2, 2, 2).unfold(3, 2, 2)  # (N, 32, 4, 4, 2, 2)
    from_map = torch.einsum("nchwij,ocij->nhwo", patches, conv2.weight) + conv2.bias  # (N, 4, 4, 6D)
    mod = from_c[:, None] + from_map.reshape(2, 16, 6 * d)
    s1, sc1, g1, s2, sc2, g2 = mod.chunk(6, dim=2)

    def ln(v):
        return (v - v.mean(-1, keepdim=True)) / torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + 1e-6)

    ref = x + g1 * block.attn(ln(x) * (1 + sc1) + s1)
    ref = ref + g2 * block.mlp(ln(ref) * (1 + sc2) + s2)
    torch.testing.assert_close(block(x, (c, m)), ref)


def test_spade_starts_as_adaln_zero():
    """With its map convolution at its zero init, a SPADE block computes adaLN-Zero's block (same weights)."""
    spade = randomize(map_model("blocks", "spade"), std=0.1, seed=0).eval()
    spade.blocks[0].spade.initialize_conditioning()
    plain = AdaLNZeroBlock(spade.config)
    missing, unexpected = plain.load_state_dict(spade.blocks[0].state_dict(), strict=False)
    assert not missing and all(k.startswith("spade.") for k in unexpected)
    x, c = torch.randn(2, spade.num_tokens, 64), torch.randn(2, 64)
    m = conditions(spade, 2)["cond_map"]
    torch.testing.assert_close(spade.blocks[0](x, (c, m)), plain(x, c))


def test_the_refusals_name_the_key():
    base = dict(size="Debug/4", input_size=16, in_channels=3, num_classes=10)
    cases = {
        "model.block=spade needs a spatial condition: set model.cond_map": dict(block="spade"),
        "model.map_input=tokens needs a spatial condition": dict(map_input="tokens"),
        "model.cond_map=silhouette needs model.map_input": dict(cond_map="silhouette"),
        "model.map_input=blocks: block adaln_zero does not read a map": dict(cond_map="silhouette", map_input="blocks"),
        "model.block=spade reads the map in every block: set model.map_input=blocks": dict(
            block="spade", cond_map="silhouette", map_input="channels"
        ),
        "unknown map kind 'x'; valid map kinds: silhouette": dict(cond_map="x", map_input="channels"),
        "unknown map input 'pixels'": dict(cond_map="silhouette", map_input="pixels"),
        "model.map_size=0": dict(cond_map="silhouette", map_input="channels", map_size=0),
    }
    for message, kw in cases.items():  # the config's own checks, and its block's when the model is built
        with pytest.raises(ValueError, match=message):
            DiT(**base, **kw)
    with pytest.raises(ValueError, match="map_size=6 must be a multiple of the token grid 4"):
        map_model("tokens", map_size=6)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"reads a silhouette map with each image: cond_map of shape \(2, 1, 8, 8\)"):
        map_model("channels")(x, t, y)
    with pytest.raises(ValueError, match="this model takes no spatial condition"):
        tiny_dit("adaln_zero", 4)(x, t, y, cond_map=torch.zeros(2, 1, 8, 8))
    assert get_block("spade").routing_refusal and "spade" in get_block("spade").routing_refusal


# --- the silhouette task end to end -----------------------------------------------------------------------

SILHOUETTE_RUN = ["model.cond_map=silhouette", "model.map_size=8", "training.sample_every=3"]
WAYS = {"spade": ["model.block=spade", "model.map_input=blocks"], "tokens": ["model.map_input=tokens"]}


@needs_fmnist
@pytest.mark.parametrize("way", ["spade", pytest.param("tokens", marks=pytest.mark.slow)])
def test_silhouette_model_trains_evaluates_resumes_exactly_and_samples(tmp_path, way):
    overrides = [*SILHOUETTE_RUN, *WAYS[way]]
    evaluation = [
        "training.fid_every=3",
        "training.fid_samples=20",
        "training.fid_final_samples=30",
        "training.fid_metric=fashion_mnist",
        "training.fid_ref=fashion_mnist:test",
    ]
    train.run(smoke_config(*overrides, *evaluation, "training.total_steps=3"), tmp_path / "run")
    resumed = train.run(smoke_config(*overrides, *evaluation), tmp_path / "run")  # resume=auto from step 3
    reference = train.run(smoke_config(*overrides, *evaluation), tmp_path / "uninterrupted")
    for which in ("model", "ema"):
        a, b = resumed[which].state_dict(), reference[which].state_dict()
        for key in b:
            assert torch.equal(a[key], b[key]), (which, key)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "map_iou" in r]
    # the 3-step run's final evaluation (20 for the curve, 30 final), then the resumed run's at step 6
    assert [(r["step"], r["fid_n"]) for r in evals] == [(3, 20), (3, 30), (6, 20), (6, 30)]
    assert all(0 <= r["map_iou"] <= 1 for r in evals)
    per_sample = next(r["final_map_iou_per_sample"] for r in records if "final_map_iou_per_sample" in r)
    assert len(per_sample) == 30 and np.mean(per_sample) == pytest.approx(evals[-1]["map_iou"], abs=1e-6)
    grid = Image.open(tmp_path / "run" / "samples" / "maps.png")  # the grid's maps: 2 per class, 10 classes
    assert grid.size[1] > grid.size[0] and np.asarray(grid).std() > 0

    # sample.py: maps from the test split (each with its own label), and from a folder of silhouettes (every class)
    out = tmp_path / "samples"
    checkpoint = f"checkpoint={tmp_path / 'run' / 'model'}"
    cfg = compose_config("sample", [checkpoint, "maps=fashion_mnist:test", "per_class=2", "steps=2", f"out_dir={out}"])
    sample.run(cfg)
    record = json.loads((out / "map_iou.json").read_text())
    assert record["n"] == 20 and 0 <= record["map_iou"] <= 1 and record["maps"] == "fashion_mnist:test"
    assert Image.open(out / "maps.png").size == Image.open(out / "grid.png").size
    folder = tmp_path / "drawn"
    folder.mkdir()
    square = np.zeros((28, 28), np.uint8)
    square[6:22, 6:22] = 255
    Image.fromarray(square).save(folder / "square.png")
    Image.fromarray(np.zeros((64, 64), np.uint8) + 200).save(folder / "full.png")  # another size: resized
    from_folder = [checkpoint, f"maps={folder}", "classes=[0,Bag]", "steps=2", f"out_dir={out}", "overwrite=true"]
    cfg = compose_config("sample", from_folder)
    sample.run(cfg)
    assert json.loads((out / "map_iou.json").read_text())["n"] == 4  # 2 maps x 2 classes
    shown = np.asarray(Image.open(out / "maps.png").convert("L"))
    assert shown.shape == (70, 70)  # 2 x 2 cells of 32 pixels, make_grid's 2-pixel padding
    assert np.array_equal(shown[2:34], shown[36:68]) and not np.array_equal(shown[:, 2:34], shown[:, 36:68])
    cfg = compose_config("sample", [checkpoint, "steps=2", f"out_dir={tmp_path / 'x'}"])
    with pytest.raises(ValueError, match="this model reads a silhouette map with each image: give maps="):
        sample.run(cfg)


def test_generate_pairs_each_map_with_its_image():
    """generate() slices the maps with the labels: changing one image's map changes that image only (guided)."""
    from dit.diffusion import SamplingSettings, build_objective, build_sampler

    model = randomize(map_model("channels", in_channels=1), std=0.05, seed=0).eval()
    sampler = build_sampler(build_objective(name="flow"), SamplingSettings(steps=2, cfg_scale=2.0))
    labels = torch.tensor([0, 1, 2, 3])
    maps = conditions(model, 4, seed=3)["cond_map"]

    def images(m):
        return torch.cat([im for _, im in generate(model, sampler, GenerationSpec(labels, 2, 0, maps=m))])

    changed = maps.clone()
    changed[2] = -changed[2]
    a, b = images(maps), images(changed)
    assert a.shape == (4, 16, 16, 1)
    assert torch.equal(a[[0, 1, 3]], b[[0, 1, 3]]) and not torch.equal(a[2], b[2])
    with pytest.raises(ValueError, match="3 maps for 4 labels"):
        generate(model, sampler, GenerationSpec(labels, batch_size=2, seed=0, maps=maps[:3]))
