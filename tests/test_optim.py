"""optim=muon (dit/training/optim.py): which parameters Muon takes, that its updates are orthogonalised and AdamW's
are Adam's, one state dict that resumes exactly, and training on one process, DDP and FSDP2."""

import copy
import json

import numpy as np
import pytest
import torch
from conftest import compose_config, needs_fmnist
from helpers.tiny import randomize, records, tiny_dit
from omegaconf import OmegaConf

import train
from dit.models.flops import training_flops
from dit.training.config import OptimConfig
from dit.training.optim import FullMatrixMuon, MuonWithAdamW, build_optimizer, muon_parameter, optimizer_flops


def model_and_grads(seed=0):
    torch.manual_seed(seed)
    model = randomize(tiny_dit(in_channels=1), 0.05)
    x, t, y = torch.randn(4, 1, 16, 16), torch.tensor([1, 10, 100, 900]), torch.tensor([0, 1, 2, 3])
    model.eval()  # no label dropout: the same loss for the same weights
    return model, lambda m: m(x, t, y).square().mean().backward()


def muon_config(**kw):
    return OmegaConf.to_object(
        compose_config("train", ["optim=muon", *(f"optim.{k}={v}" for k, v in kw.items())]).optim
    )


def test_muon_takes_the_blocks_weight_matrices_and_adamw_the_rest():
    model, _ = model_and_grads()
    opt = build_optimizer(model, muon_config())
    assert isinstance(opt, MuonWithAdamW)
    kinds = {id(p): g["kind"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert set(kinds) == {id(p) for p in named.values()}  # every parameter, once
    muon = {n for n, p in named.items() if kinds[id(p)] == "muon"}
    assert "blocks.0.attn.qkv.weight" in muon and "blocks.1.mlp.fc2.weight" in muon
    assert "blocks.0.adaLN_modulation.1.weight" in muon
    for name in (
        "x_embedder.proj.weight",
        "y_embedder.embedding_table.weight",
        "t_embedder.mlp.0.weight",
        "final_layer.linear.weight",
        "blocks.0.attn.qkv.bias",
    ):
        assert name not in muon and not muon_parameter(name, named[name])
    assert all(named[n].ndim == 2 and n.startswith("blocks.") for n in muon)
    assert type(build_optimizer(model, OptimConfig())) is torch.optim.AdamW  # the default is DiT's AdamW


def test_updates_are_orthogonalised_for_matrices_and_adam_for_the_rest():
    """First step, no weight decay: Muon's update of an m x n matrix is lr * 0.2 * sqrt(max(m, n)) * O with O the
    gradient orthogonalised (singular values pushed towards 1, whatever the gradient's spectrum); AdamW's first update
    is lr * g / (|g| + eps), i.e. lr * sign(g)."""
    model, backward = model_and_grads()
    before = copy.deepcopy(model.state_dict())
    lr = 1e-3
    opt = build_optimizer(model, muon_config(lr=lr))
    backward(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    name = "blocks.0.mlp.fc1.weight"  # (256, 64)
    delta = before[name] - model.state_dict()[name]
    s = torch.linalg.svdvals((delta / (lr * 0.2 * 256**0.5)).double())
    g = torch.linalg.svdvals(grads[name].double())
    # The gradient's singular values span five orders of magnitude; five Newton-Schulz steps bring the update's
    # large ones to about 1 and lift the small ones by orders of magnitude (torch's quintic; exact would be all 1).
    assert g.max() / g.min() > 1e4, g
    assert 0.5 < s.max() < 1.6 and s.max() / s.min() < 50, s
    assert (s > 0.5).sum() >= 8, s
    for name in ("final_layer.linear.weight", "blocks.0.attn.qkv.bias"):
        delta = before[name] - model.state_dict()[name]
        expected = lr * grads[name] / (grads[name].abs() + 1e-8)
        torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-8)  # atol: float32 resolution of the weights


def test_newton_schulz_on_cpu_is_torchs_bfloat16_iteration():
    """On CPU the iteration's products are float32 ones rounded to bfloat16 (CPUs without native bf16 emulate bf16
    products slowly): torch's bfloat16 result to within bfloat16 rounding (the order of the float32 sums differs),
    the gradient's small singular values lifted alike (what bf16 rounding does and five exact iterations would not);
    wide and tall, well and badly conditioned matrices."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    from dit.training.optim import newton_schulz_cpu

    coefficients, steps, eps = (3.4445, -4.7750, 2.0315), 5, 1e-7  # torch's defaults
    gen = torch.Generator().manual_seed(0)
    for shape, spread in (((64, 256), 0), ((192, 576), 5), ((768, 192), 5)):
        g = torch.randn(shape, generator=gen) * torch.logspace(0, -spread, shape[1])  # singular values over 10^spread
        ours = newton_schulz_cpu(g, coefficients, steps, eps)
        torchs = _zeropower_via_newtonschulz(g, coefficients, steps, eps)
        assert ours.dtype == torchs.dtype == torch.bfloat16
        assert (ours.float() - torchs.float()).norm() <= 0.01 * torchs.float().norm(), shape
        s_ours, s_torch = (torch.linalg.svdvals(x.double()) for x in (ours, torchs))
        torch.testing.assert_close(s_ours, s_torch, rtol=0.02, atol=0.01)


def test_one_state_dict_resumes_exactly_and_the_schedule_reaches_both():
    model, backward = model_and_grads()
    opt = build_optimizer(model, muon_config(lr=1e-3))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** (step + 1))
    for _ in range(2):
        backward(model)
        opt.step(), sched.step(), opt.zero_grad()
    assert {g["kind"]: g["lr"] for g in opt.engines["muon"].param_groups + opt.engines["adamw"].param_groups} == {
        "muon": 1e-3 / 8,
        "adamw": 1e-3 / 8,
    }
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert len(saved_opt["state"]) == len(list(model.parameters()))
    backward(model)
    opt.step()
    uninterrupted = copy.deepcopy(model.state_dict())

    fresh, _ = model_and_grads(seed=1)
    fresh.load_state_dict(saved_model)
    opt2 = build_optimizer(fresh, muon_config(lr=1e-3))
    opt2.load_state_dict(saved_opt)
    assert opt2.engines["muon"].state is opt2.state  # the engines see the loaded state
    backward(fresh)
    opt2.step()
    for k, v in uninterrupted.items():
        assert torch.equal(fresh.state_dict()[k], v), k


@needs_fmnist
def test_muon_training_resumes_bit_exact(tmp_path):
    overrides = ["experiment=smoke", "optim=muon", "optim.lr=1e-3"]
    full = train.run(compose_config("train", overrides), tmp_path / "full")
    train.run(compose_config("train", [*overrides, "training.total_steps=3"]), tmp_path / "half")
    resumed = train.run(compose_config("train", [*overrides, "resume=auto"]), tmp_path / "half")
    assert resumed["step"] == full["step"] == 6
    for k, v in full["model"].state_dict().items():
        assert torch.equal(resumed["model"].state_dict()[k], v), k
    # The cost axis: the DiT's forward and backward of the global batch and Muon's Newton-Schulz, every step.
    per_step = training_flops(full["model"].config) * 16 + optimizer_flops(
        build_optimizer(full["model"], muon_config())
    )
    logged = [r for r in records(tmp_path / "full") if "loss" in r]
    assert [r["train_flops"] for r in logged] == [r["step"] * per_step for r in logged]
    adamw = train.run(compose_config("train", ["experiment=smoke", "optim.lr=1e-3"]), tmp_path / "adamw")
    w = "blocks.0.attn.qkv.weight"
    assert not torch.equal(adamw["model"].state_dict()[w], full["model"].state_dict()[w])  # Muon did the steps


@needs_fmnist
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["ddp", "fsdp"])
def test_muon_on_two_processes_matches_one(tmp_path, launcher):
    from test_train import HELPER, SMOKE, accelerate_launch, records, run_all

    overrides = [*SMOKE, "optim=muon", "optim.lr=1e-3", "training.ckpt_every=3"]
    extra = ["--fsdp-on-cpu"] if launcher == "fsdp" else []
    port = {"ddp": "29571", "fsdp": "29572"}[launcher]
    cmd = accelerate_launch(launcher, "--num_processes", "2", "--main_process_port", port, HELPER, *extra)
    run_all([*cmd, str(tmp_path / "two"), *overrides, "training.total_steps=3"])
    run_all([*cmd, str(tmp_path / "two"), *overrides])  # resume=auto from step 3
    one = train.run(compose_config("train", overrides), tmp_path / "one")
    assert [r["step"] for r in records(tmp_path / "two")] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(
        [r["loss"] for r in records(tmp_path / "two")], [r["loss"] for r in records(tmp_path / "one")], rtol=1e-4
    )
    from safetensors.torch import load_file

    # Muon orthogonalises in bfloat16 (torch's Newton-Schulz): gradients that differ in the last float32 bits (a
    # reduction over two processes) give updates that agree to bfloat16 precision, not float32's. So the weights'
    # change over the run is compared, to 2% (bfloat16 eps is 0.8%).
    init = train.build(compose_config("train", overrides).model).state_dict()
    exported = load_file(tmp_path / "two" / "model" / "model.safetensors")
    for k, v in one["model"].state_dict().items():
        moved, reference = exported[k] - init[k], v - init[k]
        assert (moved - reference).norm() <= 0.02 * reference.norm() + 1e-7, (k, (moved - reference).norm())
        assert reference.norm() > 0 or k.endswith("pos_embed"), k  # every trained tensor moved
    assert json.loads((tmp_path / "two" / "model" / "config.json").read_text())["model"]["block"] == "adaln_zero"


def test_full_matrix_muon_is_torchs_muon_on_one_process(monkeypatch):
    """The reference is torch.optim.Muon itself: three steps, bit for bit, given torch's Newton-Schulz function
    (FullMatrixMuon differs for DTensors, and on CPU in how the iteration's bfloat16 products are computed:
    newton_schulz_cpu, checked against torch's function above)."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    import dit.training.optim

    monkeypatch.setattr(dit.training.optim, "newton_schulz_cpu", _zeropower_via_newtonschulz)
    ours, backward = model_and_grads()
    theirs = copy.deepcopy(ours)
    kw = dict(lr=2e-3, weight_decay=0.01, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    a = FullMatrixMuon([p for n, p in ours.named_parameters() if muon_parameter(n, p)], **kw)
    b = torch.optim.Muon([p for n, p in theirs.named_parameters() if muon_parameter(n, p)], **kw)
    for _ in range(3):
        for model, opt in ((ours, a), (theirs, b)):
            backward(model)
            opt.step()
            opt.zero_grad()
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k


def test_muon_step_flops_are_newton_schulz_on_each_matrix_and_adamw_counts_none():
    """Muon's matrix work per step: for each block matrix (m <= n after transposing), ns_steps iterations of
    X X^T (2 m^2 n), a b A + c A A (2 m^3) and B X (2 m^2 n), as torch.optim.Muon's Newton-Schulz runs them."""
    model = tiny_dit(in_channels=1)
    o = muon_config()
    expected = 0
    for name, p in model.named_parameters():
        if muon_parameter(name, p):
            m, n = sorted(p.shape)
            expected += o.muon_ns_steps * (4 * m * m * n + 2 * m**3)
    assert expected > 0 and optimizer_flops(build_optimizer(model, o)) == expected
    adamw = OmegaConf.to_object(compose_config("train", []).optim)
    assert optimizer_flops(build_optimizer(model, adamw)) == 0
