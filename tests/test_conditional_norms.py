"""The conditional normalisation layers the token blocks are checked against (helpers/conditional_norms.py), each
against its paper's formula, in float64 on random inputs."""

import pytest
import torch
import torch.nn.functional as F
from helpers.conditional_norms import (
    SPADE,
    AdaIN,
    AdaLN,
    AdaLNZero,
    ConditionalBatchNorm2d,
    ConditionalInstanceNorm2d,
    FiLM,
)
from helpers.tiny import randomize


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def channel_norm(x, eps):
    """(x - mean) / sqrt(var + eps) over H, W of each sample and channel, by explicit loops over (n, c)."""
    out = torch.empty_like(x)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            v = x[n, c]
            out[n, c] = (v - v.mean()) / torch.sqrt(((v - v.mean()) ** 2).mean() + eps)
    return out


def test_adain():
    content, style = torch.randn(2, 3, 5, 7), 3 + 2 * torch.randn(2, 3, 4, 4)
    ref = torch.empty_like(content)
    for n in range(2):
        for c in range(3):
            s = style[n, c]
            s_std = torch.sqrt(((s - s.mean()) ** 2).mean() + 1e-5)
            ref[n, c] = s_std * channel_norm(content, 1e-5)[n, c] + s.mean()
    torch.testing.assert_close(AdaIN()(content, style), ref)


def test_adain_rejects_mismatched_channels():
    with pytest.raises(ValueError, match="differ in"):
        AdaIN()(torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4))


def test_conditional_instance_norm():
    layer = randomize(ConditionalInstanceNorm2d(4, num_styles=5), 0.5)
    x, style = torch.randn(3, 4, 6, 6), torch.tensor([0, 4, 2])
    xn = channel_norm(x, 1e-5)
    ref = torch.stack(
        [
            layer.gamma.weight[s][:, None, None] * xn[i] + layer.beta.weight[s][:, None, None]
            for i, s in enumerate(style.tolist())
        ]
    )
    torch.testing.assert_close(layer(x, style), ref)


def test_conditional_instance_norm_starts_as_plain_instance_norm():
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(ConditionalInstanceNorm2d(4, 3)(x, torch.tensor([1, 2])), channel_norm(x, 1e-5))


def test_film():
    layer = randomize(FiLM(4, cond_dim=6), 0.5)
    x, z = torch.randn(2, 4, 3, 3), torch.randn(2, 6)
    W, b = layer.proj.weight, layer.proj.bias
    gamma = 1 + z @ W[:4].T + b[:4]
    beta = z @ W[4:].T + b[4:]
    torch.testing.assert_close(layer(x, z), gamma[:, :, None, None] * x + beta[:, :, None, None])


def test_film_on_token_features_and_identity_at_init():
    x, z = torch.randn(2, 4, 9), torch.randn(2, 6)  # (N, C, L) works too
    torch.testing.assert_close(FiLM(4, 6)(x, z), x)


def test_conditional_batch_norm():
    layer = randomize(ConditionalBatchNorm2d(3, cond_dim=5), 0.5).train()
    x, z = torch.randn(4, 3, 5, 5), torch.randn(4, 5)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    xn = (x - mean) / torch.sqrt(var + 1e-5)
    W, b = layer.film.proj.weight, layer.film.proj.bias
    gamma, beta = 1 + z @ W[:3].T + b[:3], z @ W[3:].T + b[3:]
    torch.testing.assert_close(layer(x, z), gamma[:, :, None, None] * xn + beta[:, :, None, None])


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_spade(norm):
    layer = randomize(SPADE(3, label_nc=2, hidden=8, norm=norm), 0.5).train()
    x = torch.randn(2, 3, 8, 8)
    mask = (torch.rand(2, 2, 4, 4) > 0.5).double()  # coarser than x: resized inside
    up = mask.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest 4x4 -> 8x8
    h = F.relu(F.conv2d(up, layer.shared[0].weight, layer.shared[0].bias, padding=1))
    gamma = F.conv2d(h, layer.gamma.weight, layer.gamma.bias, padding=1)
    beta = F.conv2d(h, layer.beta.weight, layer.beta.bias, padding=1)
    if norm == "batch":
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        xn = (x - mean) / torch.sqrt(((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True) + 1e-5)
    else:
        xn = channel_norm(x, 1e-5)
    torch.testing.assert_close(layer(x, mask), xn * (1 + gamma) + beta)
    assert gamma.shape == x.shape  # spatially varying


def test_spade_unknown_norm():
    with pytest.raises(ValueError, match="unknown SPADE norm 'group'"):
        SPADE(3, 2, norm="group")


def token_layer_norm(x, eps):
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + eps)


def test_adaln():
    layer = randomize(AdaLN(8, cond_dim=5), 0.5)
    x, c = torch.randn(2, 7, 8), torch.randn(2, 5)
    m = F.silu(c) @ layer.modulation[1].weight.T + layer.modulation[1].bias
    shift, scale = m[:, :8], m[:, 8:]
    torch.testing.assert_close(layer(x, c), token_layer_norm(x, 1e-6) * (1 + scale[:, None]) + shift[:, None])


def test_adaln_zero():
    layer = AdaLNZero(8, cond_dim=5)
    x, c = torch.randn(2, 7, 8), torch.randn(2, 5)
    f = torch.nn.Linear(8, 8)
    torch.testing.assert_close(layer(x, c, f), x)  # gate alpha = 0 at init: identity
    randomize(layer, 0.5)
    m = F.silu(c) @ layer.modulation[1].weight.T + layer.modulation[1].bias
    shift, scale, gate = m[:, :8], m[:, 8:16], m[:, 16:]
    h = token_layer_norm(x, 1e-6) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(layer(x, c, f), x + gate[:, None] * f(h))
