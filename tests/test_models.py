"""The DiT backbone and the four conditioning blocks."""

import math

import numpy as np
import pytest
import torch
from helpers.tiny import EACH_SIZE_AND_EACH_BLOCK, conditions, randomize, tiny_dit

from dit.models import BLOCKS, DIT_MODELS, create_model, get_block
from dit.models.embeddings import TimestepEmbedder, sincos_pos_embed_2d


def inputs(n=3, c=3, size=16, num_classes=10):
    return torch.randn(n, c, size, size), torch.randint(0, 1000, (n,)), torch.randint(0, num_classes, (n,))


@pytest.mark.parametrize("block", sorted(BLOCKS))
@pytest.mark.parametrize("patch_size", [2, 4, 8])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_output_shape(block, patch_size, learn_sigma):
    model = tiny_dit(block, patch_size, learn_sigma=learn_sigma)
    out = model(*inputs(), **conditions(model, 3))
    assert out.shape == (3, 6 if learn_sigma else 3, 16, 16)
    assert torch.isfinite(out).all()


def meta_model(name: str, block: str):
    with torch.device("meta"):
        return create_model(name, block=block, input_size=32, in_channels=4, num_classes=1000, **BLOCKS[block].needs)


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_every_size_builds_on_meta(block):
    """The whole size x block product is built (on the meta device: no weights); a forward of each size and of
    each block follows (a block's forward does not depend on the size beyond its widths)."""
    for name in DIT_MODELS:
        model = meta_model(name, block)
        assert (
            len(model.blocks) == DIT_MODELS[name]["depth"]
            and model.config.hidden_size == DIT_MODELS[name]["hidden_size"]
        )


@pytest.mark.parametrize(("name", "block"), EACH_SIZE_AND_EACH_BLOCK)
def test_every_size_and_every_block_forward_on_meta(name, block):
    model = meta_model(name, block)
    with torch.device("meta"):
        x, t, y = torch.empty(2, 4, 32, 32), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)
        out = model(x, t, y, **conditions(model, 2))
    assert out.shape == (2, 8, 32, 32)


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_backward_reaches_every_trainable_parameter(block):
    model = randomize(tiny_dit(block, 2)).train()
    x, t, y = inputs()
    model(x, t, y, **conditions(model, 3)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        # The null-class row only gets gradient when a label is dropped.
        if "embedding_table" not in name:
            assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


def test_adaln_zero_blocks_are_identity_at_init():
    model = tiny_dit("adaln_zero", 2)
    x = torch.randn(2, model.num_tokens, 64)
    c = torch.randn(2, 64)
    for block in model.blocks:
        torch.testing.assert_close(block(x, c), x, rtol=0, atol=0)
    out = model(*inputs())
    assert out.abs().max() == 0  # zero-initialised final layer


def test_other_variants_are_not_identity_at_init():
    for block in ("in_context", "cross_attn", "adaln"):
        out = tiny_dit(block, 2).eval()(*inputs())
        assert out.abs().max() > 0, block


def test_null_label_used_when_dropped():
    model = randomize(tiny_dit("adaln_zero", 2)).eval()
    x, t, y = inputs()
    null = torch.full_like(y, 10)
    dropped = model(x, t, y, force_drop_ids=torch.ones_like(y))
    torch.testing.assert_close(dropped, model(x, t, null), rtol=0, atol=0)
    assert not torch.allclose(dropped, model(x, t, y))
    # In training, dropout_prob=1 drops every label.
    always = randomize(tiny_dit("adaln_zero", 2, class_dropout_prob=1.0))
    always.load_state_dict(model.state_dict())
    torch.testing.assert_close(always.train()(x, t, y), model(x, t, null), rtol=0, atol=0)


def test_label_dropout_rate():
    model = tiny_dit("adaln_zero", 2, class_dropout_prob=0.3)
    labels = torch.zeros(20000, dtype=torch.long)
    share = (model.y_embedder.drop_labels(labels) == 10).float().mean().item()
    assert abs(share - 0.3) < 0.02


def test_no_null_class_without_dropout():
    model = tiny_dit("adaln_zero", 2, class_dropout_prob=0.0)
    assert model.y_embedder.embedding_table.num_embeddings == 10
    x, t, _ = inputs()
    with pytest.raises(ValueError, match=r"outside \[0, 9\]"):
        model(x, t, torch.full((3,), 10))


def test_in_context_appends_and_removes_two_tokens():
    cls = get_block("in_context")
    x, c = torch.randn(2, 5, 8), torch.randn(2, 2, 8)
    joined = cls.add_tokens(x, c)
    assert joined.shape == (2, 7, 8)
    torch.testing.assert_close(cls.remove_tokens(joined), x)


def test_cross_attention_reads_the_condition():
    model = randomize(tiny_dit("cross_attn", 2)).eval()
    x, t, y = inputs()
    assert not torch.allclose(model(x, t, y), model(x, t, (y + 1) % 10))


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_gradient_checkpointing_gives_the_same_gradients(block):
    model = randomize(tiny_dit(block, 2, class_dropout_prob=0.0)).train()
    x, t, y = inputs()
    kw = conditions(model, 3)
    model(x, t, y, **kw).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing = True
    model(x, t, y, **kw).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


# --- bad input -------------------------------------------------------------------------------


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown model 'DiT-M/2'.*DiT-XL/2"):
        create_model("DiT-M/2")


def test_unknown_block_lists_valid_names():
    with pytest.raises(
        ValueError,
        match=r"unknown block 'spadex'.*adagn, adain, adaln, adaln_single, adaln_zero, cbn, cross_attn, diffit, film, "
        "in_context, spade",
    ):
        create_model("DiT-Debug/2", block="spadex")


def test_input_size_not_divisible_by_patch():
    with pytest.raises(ValueError, match="input_size 30 is not divisible by patch_size 4"):
        create_model("DiT-Debug/4", input_size=30)


@pytest.mark.parametrize("label", [-1, 11])
def test_label_out_of_range(label):
    model = tiny_dit("adaln", 2)
    x, t, y = inputs()
    y[1] = label
    with pytest.raises(ValueError, match=rf"label\(s\) \[{label}\] outside \[0, 10\]"):
        model(x, t, y)


def test_wrong_input_shape():
    model = tiny_dit("adaln", 2)
    x, t, y = inputs(size=8)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 3, 16, 16\), got \(3, 3, 8, 8\)"):
        model(x, t, y)
    x, t, y = inputs()
    with pytest.raises(ValueError, match=r"t must have shape \(3,\)"):
        model(x, t[:2], y)


# --- embeddings against their formulas (float64, written out independently) -----------------


def test_pos_embed_matches_mae_formula():
    dim, grid = 16, 4
    ours = sincos_pos_embed_2d(dim, grid).numpy()
    ref = np.zeros((grid * grid, dim))
    for row in range(grid):
        for col in range(grid):
            for half, pos in enumerate((col, row)):  # first half: column (x), second half: row (y)
                for i in range(dim // 4):
                    w = 1.0 / 10000 ** (i / (dim / 4))
                    ref[row * grid + col, half * dim // 2 + i] = math.sin(pos * w)
                    ref[row * grid + col, half * dim // 2 + dim // 4 + i] = math.cos(pos * w)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shift", [0, 1])
def test_timestep_embedding_matches_formula(shift):
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    ours = TimestepEmbedder.timestep_embedding(t, 256, freq_shift=shift).double()
    half = 128
    ref = torch.zeros(4, 256, dtype=torch.float64)
    for n, tn in enumerate(t.tolist()):
        for i in range(half):
            f = math.exp(-math.log(10000) * i / (half - shift))
            ref[n, i], ref[n, half + i] = math.cos(tn * f), math.sin(tn * f)
    torch.testing.assert_close(ours, ref, rtol=0, atol=5e-4)  # fp32 arguments up to ~1e3 rad


def test_pos_embed_is_a_frozen_buffer():
    model = tiny_dit("adaln_zero", 2)
    assert "pos_embed" in model.state_dict()
    assert all(name != "pos_embed" for name, _ in model.named_parameters())
