"""TREAD token routing (dit/models/routing.py): the mechanism, checked against a per-sample reference, the zoo's
FLOP count checked against the analytic count of a transformer block, and a training run that routes."""

import pytest
import torch
from conftest import compose_config, needs_fmnist
from helpers.tiny import randomize, records

import train
from dit.models import DiT, DiTConfig
from dit.models.blocks import Block
from dit.models.flops import training_flops
from dit.models.routing import Route, TokenRouting
from dit.training.randomness import SlicedRandom
from dit.zoo import count


def tiny(block: str = "adaln_zero", **kw) -> DiT:
    """DiT-Debug/4's width with four blocks, on 16 x 16 single-channel images (16 tokens)."""
    sizes = dict(depth=4, hidden_size=64, num_heads=2, patch_size=4)
    return DiT(**sizes, input_size=16, in_channels=1, num_classes=10, block=block, **kw)


def random_model(block: str, **kw) -> DiT:
    torch.manual_seed(0)
    # adaLN-Zero starts as identity blocks: random weights give every block something to do
    return randomize(tiny(block, **kw), 0.05).eval()


def inputs(n=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 16, 16, generator=g), torch.tensor([3, 400, 999])[:n], torch.tensor([0, 4, 9])[:n]


@pytest.mark.parametrize("block", ["adaln_zero", "in_context", "cross_attn", "adaln_single", "adain"])
def test_routing_nothing_is_the_plain_forward(block):
    model = random_model(block)
    x, t, y = inputs()
    keep = torch.arange(model.num_tokens).expand(len(x), -1)
    with torch.no_grad():  # every token, in order: the same values, up to the order of float sums
        torch.testing.assert_close(model(x, t, y, route=Route(keep, 1, 3)), model(x, t, y), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("block", ["adaln_zero", "in_context", "adaln_single"])
def test_routed_forward_equals_a_per_sample_reference(block):
    """Each sample's kept tokens, run alone through blocks [start, end) and put back, the others unchanged."""
    model = random_model(block)
    x, t, y = inputs()
    start, end, k = 1, 3, 9
    g = torch.Generator().manual_seed(2)
    keep = torch.stack([torch.randperm(model.num_tokens, generator=g)[:k].sort().values for _ in range(len(x))])
    with torch.no_grad():
        routed = model(x, t, y, route=Route(keep, start, end))
        # Reference: the backbone's steps written out, one sample at a time, with index assignment.
        cls, e = model.block_cls, model.block_cls.num_extra_tokens
        for n in range(len(x)):
            xn, tn, yn = x[n : n + 1], t[n : n + 1], y[n : n + 1]
            c = cls.condition(model.t_embedder(tn), model.y_embedder(yn, False))
            cb = model.shared_conditioning(c)
            h = cls.add_tokens(model.x_embedder(xn) + model.pos_embed, c)
            for i, blk in enumerate(model.blocks):
                if i == start:
                    full = h.clone()
                    h = torch.cat([h[:, :e], h[:, e:][:, keep[n]]], dim=1)
                h = blk(h, cb)
                if i == end - 1:
                    full[:, :e] = h[:, :e]
                    full[:, e + keep[n]] = h[:, e:]
                    h = full
            out = model.unpatchify(model.final_layer(cls.remove_tokens(h), c))
            torch.testing.assert_close(routed[n : n + 1], out, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(routed, model(x, t, y))  # routing changes the output


def test_blocks_in_the_span_see_the_kept_tokens_and_extra_tokens_are_never_routed():
    model = random_model("in_context")
    seen = {}
    for i, blk in enumerate(model.blocks):
        blk.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].clone()))
    x, t, y = inputs()
    routing = TokenRouting(ratio=0.75, start=1, end=-1)
    route = routing.draw(SlicedRandom(0, 0, 0, 1, 0, torch.device("cpu")), len(x), model.num_tokens, 4)
    assert route[1:] == (1, 3) and route.keep.shape == (3, routing.kept(model.num_tokens)) == (3, 4)
    with torch.no_grad():
        model(x, t, y, route=route)
    e = model.block_cls.num_extra_tokens
    assert [seen[i].shape[1] for i in range(4)] == [e + 16, e + 4, e + 4, e + 16]
    before, after = seen[0], seen[3]
    routed_out = torch.ones(3, 16, dtype=torch.bool)
    routed_out[torch.arange(3)[:, None], route.keep] = False
    # The routed tokens skip blocks 1 and 2: block 3 sees them as block 1 did (block 0's output).
    block0_out = model.blocks[0](
        before, model.shared_conditioning(model.block_cls.condition(model.t_embedder(t), model.y_embedder(y, False)))
    )
    torch.testing.assert_close(after[:, e:][routed_out], block0_out[:, e:][routed_out])
    # The in-context t and y tokens go through every block: the routed blocks see them first, whole.
    torch.testing.assert_close(seen[1][:, :e], block0_out[:, :e])


def test_draw_is_uniform_per_sample_deterministic_and_the_same_for_any_number_of_processes():
    routing = TokenRouting(ratio=0.5, start=2, end=-2)
    one = routing.draw(SlicedRandom(7, 11, 0, 1, 0, torch.device("cpu")), 8, 64, 12).keep
    halves = [routing.draw(SlicedRandom(7, 11, 0, 2, r, torch.device("cpu")), 4, 64, 12).keep for r in (0, 1)]
    assert torch.equal(one, torch.cat(halves))  # the global batch routes alike on 1 or 2 processes
    assert torch.equal(one, routing.draw(SlicedRandom(7, 11, 0, 1, 0, torch.device("cpu")), 8, 64, 12).keep)
    assert one.shape == (8, 32) and all(len(set(r.tolist())) == 32 for r in one)
    assert torch.equal(one, one.sort(dim=1).values) and len({tuple(r.tolist()) for r in one}) == 8
    # Uniform: over many draws every token is kept about half the time.
    keeps = torch.cat(
        [routing.draw(SlicedRandom(0, s, 0, 1, 0, torch.device("cpu")), 8, 64, 12).keep for s in range(50)]
    )
    freq = torch.bincount(keeps.flatten(), minlength=64).float() / len(keeps)
    assert (freq - 0.5).abs().max() < 0.12, freq


@pytest.mark.parametrize(
    ("block", "kw", "message"),
    [("diffit", {}, "relative position bias"), ("adaln_zero", {"pos_embed": "rope"}, "pos_embed=rope")],
)
def test_models_that_need_every_token_are_refused_by_name(block, kw, message):
    model = tiny(block, **kw)
    with pytest.raises(ValueError, match=message):
        TokenRouting(ratio=0.5, start=1, end=3).check(model)
    TokenRouting(ratio=0.0).check(model)  # off: nothing to refuse


@pytest.mark.parametrize(
    ("routing", "message"),
    [
        (TokenRouting(ratio=1.0), "ratio"),
        (TokenRouting(ratio=-0.1), "ratio"),
        (TokenRouting(ratio=0.5, start=3, end=2), "start"),
        (TokenRouting(ratio=0.5, start=0, end=9), "depth"),
        (TokenRouting(ratio=0.5, start=0, end=-4), "start"),
        (TokenRouting(ratio=0.99, start=0, end=2), "leaves no token"),
    ],
)
def test_bad_routing_settings_are_named(routing, message):
    with pytest.raises(ValueError, match=message):
        routing.check(tiny())


def test_flop_count_with_routing_matches_the_analytic_block_count():
    """DiT-XL/2 at 256 px, half the tokens routed past blocks 2..25 (the paper's setting). A DiT block on n tokens
    of width D costs 12 D^2 n (qkv, proj, 4x MLP) + 2 n^2 D (q k^T, attention x v) multiply-adds; its adaLN
    modulation does not depend on n."""
    plain = count("DiT-XL/2", "adaln_zero")
    routing = TokenRouting(ratio=0.5, start=2, end=-2)
    routed = count("DiT-XL/2", "adaln_zero", routing=routing)
    d, n, k = 1152, 256, routing.kept(256)

    def block(m):
        return 12 * d * d * m + 2 * m * m * d

    saved = 24 * (block(n) - block(k)) / 1e9
    assert k == 128
    assert routed["gflops"] == pytest.approx(plain["gflops"] - saved, rel=1e-9)
    # 24 of 28 blocks at half their linear cost and a quarter of their attention's n^2 term: below 4/28 + 24/28 / 2
    assert 0.56 < routed["gflops"] / plain["gflops"] < 4 / 28 + 24 / 28 / 2


@needs_fmnist
def test_training_routes_and_sampling_uses_every_token(tmp_path):
    seen = []

    def record(module, args):
        if isinstance(module, Block) and args[0].device.type != "meta":  # not the FLOP count's meta model
            seen.append((module.training, args[0].shape[1]))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        routing = [
            "training.token_routing.ratio=0.5",
            "training.token_routing.start=1",
            "training.token_routing.end=-1",
        ]
        cfg = compose_config("train", ["experiment=smoke", "model.size=null", "model.depth=4", *routing])
        result = train.run(cfg, tmp_path)
    finally:
        handle.remove()
    assert result["step"] == 6
    depth, tokens = cfg.model.depth, (cfg.model.input_size // cfg.model.patch_size) ** 2
    kept = TokenRouting(ratio=0.5).kept(tokens)
    train_counts = [m for training, m in seen if training]
    assert len(train_counts) == 6 * depth  # one forward per step (global batch 16 on one process)
    per_step = train_counts[:depth]
    assert depth == 4 and per_step == [tokens, kept, kept, tokens]
    assert {m for training, m in seen if not training} == {tokens}  # the grids sample with every token
    # The cost axes: FLOPs counted with routing on, training seconds accumulated.
    logged = [r for r in records(tmp_path) if "loss" in r]
    per_step = training_flops(train.build(cfg.model).config, TokenRouting(ratio=0.5, start=1, end=-1)) * 16
    assert per_step < training_flops(train.build(cfg.model).config) * 16
    assert [r["train_flops"] for r in logged] == [r["step"] * per_step for r in logged]
    assert all(0 < a["train_s"] < b["train_s"] for a, b in zip(logged, logged[1:]))


def test_training_flops_are_forward_and_backward_and_follow_routing():
    """Backward of a linear layer costs twice its forward: a training image costs about 3x the forward (the zoo's
    GFLOPs are multiply-adds, torch's counter counts 2 per multiply-add); routing saves the same share of both."""
    config = DiTConfig(size="XL/2", input_size=32, in_channels=4, num_classes=1000)
    forward = 2e9 * count("DiT-XL/2", "adaln_zero")["gflops"]
    assert 2.9 < training_flops(config) / forward < 3.05
    routing = TokenRouting(ratio=0.5, start=2, end=-2)
    forward_routed = 2e9 * count("DiT-XL/2", "adaln_zero", routing=routing)["gflops"]
    ratio = training_flops(config, routing) / training_flops(config)
    assert ratio == pytest.approx(forward_routed / forward, rel=0.01)


@needs_fmnist
@pytest.mark.parametrize(
    "recipe, objective", [("tread_dit_xl2_imagenet256", "ddpm"), ("tread_sit_xl2_imagenet256", "flow")]
)
def test_imagenet_recipes_compose_and_train_at_tiny_size(tmp_path, recipe, objective):
    """The shipped ImageNet-scale TREAD recipes: their settings (DiT-XL/2, latents, the paper's routing) as composed,
    then two steps with the model and data swapped for CPU sizes."""
    full = compose_config("train", [f"experiment={recipe}"])
    assert (full.model.name, full.data.name, full.diffusion.name) == ("DiT-XL/2", "latents", objective)
    assert dict(full.training.token_routing) == {"ratio": 0.5, "start": 2, "end": -2}
    tiny = [
        "model=dit_debug4",
        "data=fashion_mnist",
        "data.limit=32",
        "training.total_steps=2",
        "training.global_batch_size=8",
        "training.mixed_precision=no",
        "training.num_workers=0",
        "training.ckpt_every=0",
        "training.sample_every=0",
        "training.grid_sampling.steps=2",
        "model.depth=5",
        "model.size=null",
        "model.name=null",
    ]
    cfg = compose_config("train", [f"experiment={recipe}", *tiny])
    assert cfg.training.token_routing.ratio == 0.5 and cfg.diffusion.name == objective
    assert train.run(cfg, tmp_path)["step"] == 2
