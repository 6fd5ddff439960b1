"""The fused LayerNorm / RMSNorm + modulate kernels against float64 references.

Without CUDA the kernels run on CPU tensors under the Triton interpreter (conftest sets
TRITON_INTERPRET=1); with CUDA they are compiled and run on the GPU (unless TRITON_INTERPRET=1 is set).
"""

import os

import pytest
import torch
from helpers.tiny import randomize, tiny_dit

from dit.models import DiTConfig
from dit.models.blocks import AdaLNZeroBlock, set_fused_adaln
from dit.ops import (
    layernorm_modulate,
    layernorm_modulate_fused,
    layernorm_modulate_reference,
    rmsnorm_modulate,
    rmsnorm_modulate_fused,
    rmsnorm_modulate_reference,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
assert INTERPRET or torch.cuda.is_available()  # conftest sets it before triton loads
DEVICES = ["cpu"] if INTERPRET else ["cuda"]  # where the Triton kernels run in this session
# (B, T, D): odd T, D = 1152 (DiT-XL), D not a multiple of the block, T = 1.
SHAPES = [(2, 7, 64), (1, 37, 1152), (3, 5, 200), (2, 1, 96), (2, 64, 384)]
# Relative error ||out - ref|| / ||ref|| against float64: fp32 far under 1e-5; bf16 storage ~4e-3.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(shape, dtype, device, requires_grad=False):
    B, T, D = shape
    x = (torch.randn(B, T, D, device=device) * 3 + 1).to(dtype)
    shift = torch.randn(B, D, device=device).to(dtype)
    scale = (0.5 * torch.randn(B, D, device=device)).to(dtype)
    return [v.requires_grad_(requires_grad) for v in (x, shift, scale)]


def reference64(x, shift, scale, eps=1e-6):
    return layernorm_modulate_reference(x.double(), shift.double(), scale.double(), eps)


def rms_reference64(x, shift, scale, eps=1e-6):
    """x / sqrt(mean(x^2) + eps) * (1 + scale) + shift in float64, written out (not F.rms_norm)."""
    x, shift, scale = x.double(), shift.double(), scale.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * (1 + scale[:, None]) + shift[:, None]


# The two branches of the same kernels: (the Triton kernel, its float64 reference, the dispatcher, the eager op).
KERNELS = {
    "layernorm": (layernorm_modulate_fused, reference64, layernorm_modulate, layernorm_modulate_reference),
    "rmsnorm": (rmsnorm_modulate_fused, rms_reference64, rmsnorm_modulate, rmsnorm_modulate_reference),
}


CASES = [(norm, device, shape) for norm in KERNELS for device in DEVICES for shape in SHAPES]


def dtypes_for(device):
    return [torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])


@pytest.mark.parametrize("norm,device,shape", CASES)
def test_forward_matches_float64(norm, device, shape):
    fused, ref64 = KERNELS[norm][:2]
    for dtype in dtypes_for(device):
        x, shift, scale = inputs(shape, dtype, device)
        out = fused(x, shift, scale)
        assert out.dtype == dtype and out.shape == x.shape
        assert rel(out, ref64(x, shift, scale)) < TOL[dtype], dtype


@pytest.mark.parametrize("norm,device,shape", CASES)
def test_backward_matches_float64(norm, device, shape):
    fused, ref64 = KERNELS[norm][:2]
    for dtype in dtypes_for(device):
        x, shift, scale = inputs(shape, dtype, device, requires_grad=True)
        dy = torch.randn(x.shape, device=device).to(dtype)
        grads = torch.autograd.grad(fused(x, shift, scale), (x, shift, scale), dy)
        x64, s64, c64 = (v.detach().double().requires_grad_() for v in (x, shift, scale))
        ref = torch.autograd.grad(ref64(x64, s64, c64), (x64, s64, c64), dy.double())
        for name, g, r, v in zip(("dx", "dshift", "dscale"), grads, ref, (x, shift, scale)):
            assert g.dtype == v.dtype and g.shape == v.shape
            assert rel(g, r) < TOL[dtype], (name, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_every_output_element_is_written(device, monkeypatch):
    """Poison the buffers the kernel writes into: any element it skips stays NaN."""
    import dit.ops.triton_adaln as k

    real_empty_like, real_empty = torch.empty_like, torch.empty
    monkeypatch.setattr(k.torch, "empty_like", lambda t, **kw: real_empty_like(t, **kw).fill_(float("nan")))
    monkeypatch.setattr(k.torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    x, shift, scale = inputs((3, 37, 200), torch.float32, device)
    y, mean, rstd = k.forward(x, shift, scale, 1e-6)
    assert torch.isfinite(y).all() and torch.isfinite(mean).all() and torch.isfinite(rstd).all()
    dx, dshift, dscale = k.backward(torch.randn_like(x), x, scale, mean, rstd)
    assert torch.isfinite(dx).all() and torch.isfinite(dshift).all() and torch.isfinite(dscale).all()


@pytest.mark.parametrize("norm", KERNELS)
def test_gradients_are_deterministic(norm):
    fused = KERNELS[norm][0]
    x, shift, scale = inputs((2, 50, 96), torch.float32, DEVICES[0], requires_grad=True)
    dy = torch.randn_like(x)
    first = torch.autograd.grad(fused(x, shift, scale), (x, shift, scale), dy)
    second = torch.autograd.grad(fused(x, shift, scale), (x, shift, scale), dy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("norm", KERNELS)
def test_dispatch_modes(norm):
    dispatch, eager = KERNELS[norm][2:]
    x, shift, scale = inputs((1, 4, 32), torch.float32, "cpu")
    ref = eager(x, shift, scale)
    assert torch.equal(dispatch(x, shift, scale, fused="false"), ref)
    assert torch.equal(dispatch(x, shift, scale, fused="auto"), ref)  # CPU tensors: the reference
    x, shift, scale = (v.to(DEVICES[0]) for v in (x, shift, scale))
    torch.testing.assert_close(dispatch(x, shift, scale, fused="true").cpu(), ref)  # the Triton kernel
    with pytest.raises(ValueError, match="fused_adaln='maybe'"):
        dispatch(x, shift, scale, fused="maybe")


def test_rmsnorm_reference_matches_formula():
    x, shift, scale = inputs((2, 7, 64), torch.float64, "cpu")
    torch.testing.assert_close(rmsnorm_modulate_reference(x, shift, scale), rms_reference64(x, shift, scale))


RMS_OPTIONS = dict(norm="rmsnorm", qk_norm=True, pos_embed="rope")


@pytest.mark.parametrize(
    "block,options",
    [("adaln_zero", {}), ("adaln_zero", RMS_OPTIONS), ("adaln_single", RMS_OPTIONS)],
    ids=["layernorm", "rmsnorm-adaln_zero", "rmsnorm-adaln_single"],
)
def test_fused_model_equals_unfused_and_keeps_the_state_dict(block, options):
    model = randomize(tiny_dit(block, num_classes=5, fused_adaln="false", **options))
    fused = tiny_dit(block, num_classes=5, fused_adaln="true", **options)
    fused.load_state_dict(model.state_dict(), strict=True)
    model.eval(), fused.eval()  # no label dropout: both see the same labels (gradients still flow)
    model, fused = model.to(DEVICES[0]), fused.to(DEVICES[0])
    x, t, y = (v.to(DEVICES[0]) for v in (torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 4])))
    out_ref, out_fused = model(x, t, y), fused(x, t, y)
    torch.testing.assert_close(out_fused, out_ref, rtol=1e-5, atol=1e-5)
    out_ref.square().sum().backward()
    out_fused.square().sum().backward()
    for (name, a), b in zip(model.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow  # ~22 s on CPU (compiling under the Triton interpreter); a GPU runs it in the GPU script
@pytest.mark.parametrize("norm", KERNELS)
def test_torch_compile_of_a_block_with_the_fused_op(norm):
    block = AdaLNZeroBlock(DiTConfig(hidden_size=64, num_heads=2, depth=1, patch_size=2, norm=norm))
    set_fused_adaln(block, "true")
    randomize(block)
    device = DEVICES[0]
    block = block.to(device)
    x, c = torch.randn(2, 9, 64, device=device), torch.randn(2, 64, device=device)
    eager = block(x, c)
    compiled = torch.compile(block, fullgraph=True)(x, c)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_torch_compile_fused_block_on_cuda():
    block = randomize(AdaLNZeroBlock(DiTConfig(size="XL/2")).cuda(), 0.02)
    x, c = torch.randn(4, 256, 1152, device="cuda"), torch.randn(4, 1152, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = block(x, c)
        compiled = torch.compile(block, fullgraph=True)(x, c)
    assert rel(compiled, eager) < 1e-2
