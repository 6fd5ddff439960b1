"""The normalisation arms (issue 28): cbn, adagn and film share adaLN-Zero's modulation and gates, and differ
from it, and from adain, only in the statistics they normalise with. Checked against float64 formulas written
by loops, torch's own BatchNorm / GroupNorm, two gloo processes, and end to end through train.py."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import needs_fmnist, smoke_config
from helpers.tiny import tiny_dit as tiny
from test_zoo_blocks import adaln_zero_like_formula, block_inputs, build_block, layer_norm, opts, six_modulations

import train
from dit.hub import load_model
from dit.models import DiTConfig, get_block
from dit.models.blocks import BatchNormModulate
from dit.sampling import GenerationSpec, generate

EPS = 1e-6


def batch_norm_over_tokens(x, eps):
    """(N, T, D): channel d normalised by its mean and biased variance over all N x T values, by loops."""
    out = torch.empty_like(x)
    for d in range(x.shape[2]):
        v = x[:, :, d]
        out[:, :, d] = (v - v.mean()) / torch.sqrt(((v - v.mean()) ** 2).mean() + eps)
    return out


def group_norm_per_token(x, groups, eps):
    """(N, T, D): each token's channels in `groups` contiguous groups, each normalised on its own, by loops."""
    out = torch.empty_like(x)
    size = x.shape[2] // groups
    for n in range(x.shape[0]):
        for t in range(x.shape[1]):
            for g in range(groups):
                v = x[n, t, g * size : (g + 1) * size]
                out[n, t, g * size : (g + 1) * size] = (v - v.mean()) / torch.sqrt(((v - v.mean()) ** 2).mean() + eps)
    return out


FORMULAS = {
    "cbn": lambda v: batch_norm_over_tokens(v, EPS),
    "adagn": lambda v: group_norm_per_token(v, 4, EPS),
    "film": lambda v: v,
}


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_block_matches_its_formula(name):
    block = build_block(name, opts({"norm_groups": 4})).train()  # train: cbn takes the batch's statistics
    x, c = block_inputs()
    ref = adaln_zero_like_formula(block, x, six_modulations(block, c), FORMULAS[name])
    torch.testing.assert_close(block(x, c), ref, rtol=1e-10, atol=1e-10)


def test_only_the_statistics_differ_from_adaln_zero():
    """adagn with one group is LayerNorm without affine: with adaLN-Zero's weights it is adaLN-Zero, exactly."""
    zero = build_block("adaln_zero", opts({}))
    one_group = get_block("adagn")(opts({"norm_groups": 1})).double().eval()
    assert one_group.state_dict().keys() == zero.state_dict().keys()
    one_group.load_state_dict(zero.state_dict())
    x, c = block_inputs()
    torch.testing.assert_close(one_group(x, c), zero(x, c), rtol=1e-12, atol=1e-12)
    ref = adaln_zero_like_formula(zero, x, six_modulations(zero, c), lambda v: layer_norm(v, EPS))
    torch.testing.assert_close(zero(x, c), ref, rtol=1e-10, atol=1e-10)


def test_film_does_not_normalise():
    """Scaling the tokens by 10 is normalised away by every norm but film's none."""
    x, shift, scale = torch.randn(2, 9, 32, dtype=torch.float64), torch.zeros(2, 32), torch.zeros(2, 32)
    for name in ("adagn", "adain", "film"):
        norm = get_block(name).make_norm(opts({"norm_groups": 4}), EPS)
        same = torch.allclose(norm(10 * x, shift, scale), norm(x, shift, scale), atol=1e-5)
        assert same == (name != "film"), name


def test_cbn_statistics_are_torch_batchnorm_and_sampling_uses_the_running_ones():
    norm, ref = BatchNormModulate(32, EPS), torch.nn.BatchNorm1d(32, eps=EPS, affine=False)
    zeros = torch.zeros(4, 32)
    for _ in range(3):
        x = 3 * torch.randn(4, 9, 32) + 1
        torch.testing.assert_close(norm(x, zeros, zeros), ref(x.transpose(1, 2)).transpose(1, 2), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(norm.running_mean, ref.running_mean)
    torch.testing.assert_close(norm.running_var, ref.running_var)  # unbiased, momentum 0.1, as torch
    norm.eval()
    ref.eval()
    x = torch.randn(4, 9, 32)
    alone = norm(x[:1], zeros[:1], zeros[:1])  # each sample on its own: the batch does not matter
    torch.testing.assert_close(norm(x, zeros, zeros)[:1], alone)
    torch.testing.assert_close(alone, ref(x[:1].transpose(1, 2)).transpose(1, 2), rtol=1e-4, atol=1e-4)


def test_cbn_guidance_does_not_mix_samples():
    """Classifier-free guidance doubles the batch with unconditional copies; with running statistics a sample's
    output does not depend on the other samples or on the copies (sampled together = sampled one by one)."""
    model = tiny("cbn", patch_size=4, in_channels=1, input_size=16)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    model.train()
    for _ in range(3):  # running statistics away from their initial values
        model(torch.randn(8, 1, 16, 16), torch.randint(0, 1000, (8,)), torch.randint(0, 10, (8,)))
    model.eval()
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([10, 500, 900]), torch.tensor([1, 4, 7])
    null = torch.full_like(y, model.num_classes)
    with torch.no_grad():
        guided = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # the doubled batch
        for i in range(3):
            torch.testing.assert_close(guided[i], model(x[i : i + 1], t[i : i + 1], y[i : i + 1])[0])
            torch.testing.assert_close(guided[3 + i], model(x[i : i + 1], t[i : i + 1], null[i : i + 1])[0])


def _sync_worker(rank: int, port: int, x: torch.Tensor, out: dict):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    norm = BatchNormModulate(8, EPS).double()
    half = x[rank * 4 : (rank + 1) * 4].clone().requires_grad_(True)
    y = norm(half, torch.zeros(4, 8), torch.zeros(4, 8))
    (y * torch.arange(8.0)).square().sum().backward()
    out[rank] = (y.detach(), half.grad, norm.running_mean.clone(), norm.running_var.clone())
    dist.destroy_process_group()


@pytest.mark.slow  # ~17 s: two spawned gloo processes
def test_cbn_statistics_are_synchronised_over_processes():
    """2 gloo processes x 4 images normalise, and get gradients, as 1 process x 8 would (statistics of the global
    batch: one differentiable all-reduce). float64, so that any difference is a wrong statistic, not rounding."""
    x = torch.randn(8, 5, 8, dtype=torch.float64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_sync_worker, args=(port, x, out), nprocs=2)
    norm = BatchNormModulate(8, EPS).double()
    whole = x.clone().requires_grad_(True)
    y = norm(whole, torch.zeros(8, 8), torch.zeros(8, 8))
    (y * torch.arange(8.0)).square().sum().backward()
    for rank in (0, 1):
        y_r, g_r, mean_r, var_r = out[rank]
        torch.testing.assert_close(y_r, y.detach()[rank * 4 : (rank + 1) * 4], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(g_r, whole.grad[rank * 4 : (rank + 1) * 4], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(mean_r, norm.running_mean)
        torch.testing.assert_close(var_r, norm.running_var)


def test_groups_must_divide_the_width_and_the_norm_option_is_refused():
    with pytest.raises(ValueError, match="model.norm_groups=5 must divide the width 32"):
        get_block("adagn")(opts({"norm_groups": 5}))
    for name in ("cbn", "adagn", "film"):
        with pytest.raises(ValueError, match=f"block {name} normalises with .*norm='rmsnorm' does not apply"):
            get_block(name)(opts({"norm": "rmsnorm"}))
    assert DiTConfig.defaults()["norm_groups"] == 32  # ADM's


@needs_fmnist
# cbn (the block with state: running statistics) in make test; the stateless adagn and film in the slow tier
@pytest.mark.parametrize("name", ["cbn", *(pytest.param(n, marks=pytest.mark.slow) for n in ("adagn", "film"))])
def test_block_trains_checkpoints_resumes_exactly_and_samples(tmp_path, name):
    overrides = [f"model.block={name}", "model.norm_groups=8"]
    train.run(smoke_config(*overrides, "training.total_steps=3"), tmp_path / "run")
    resumed = train.run(smoke_config(*overrides), tmp_path / "run")  # resume=auto from step 3
    reference = train.run(smoke_config(*overrides), tmp_path / "uninterrupted")
    for which in ("model", "ema"):  # parameters and buffers (cbn's running statistics) alike
        a, b = resumed[which].state_dict(), reference[which].state_dict()
        for key in b:
            assert torch.equal(a[key], b[key]), (which, key)
    if name == "cbn":  # the EMA carries running statistics that moved from their initial values
        stats = resumed["ema"].blocks[0].norm1.running_var
        assert not torch.equal(stats, torch.ones_like(stats))
    model, meta = load_model(tmp_path / "run" / "model")
    assert model.block == name
    from dit.diffusion import build_sampler
    from dit.hub import objective_of
    from dit.sampling import SamplingSettings

    sampler = build_sampler(objective_of(meta), SamplingSettings(steps=2, cfg_scale=2.0))
    spec = GenerationSpec(torch.tensor([0, 9]), batch_size=2, seed=0)
    _, images = next(iter(generate(model.eval(), sampler, spec, device="cpu")))
    assert images.shape == (2, 32, 32, 1) and images.dtype == torch.uint8 and images.float().std() > 0


def test_failure_mode_script_samples_with_batch_statistics_and_restores_the_model():
    """studies/normalisation/cbn_failure_modes.py's switch: inside it a sample depends on the others in its batch
    (the statistics are the batch's), the running statistics stay as trained; after it, sampling is per-sample again."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "studies" / "normalisation" / "cbn_failure_modes.py"
    spec = importlib.util.spec_from_file_location("cbn_failure_modes", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    model = tiny("cbn", patch_size=4, in_channels=1, input_size=16)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    model.train()
    for _ in range(3):
        model(torch.randn(8, 1, 16, 16), torch.randint(0, 1000, (8,)), torch.randint(0, 10, (8,)))
    model.eval()
    running = [b.clone() for n, b in model.named_buffers() if "running" in n]
    x, t, y = torch.randn(4, 1, 16, 16), torch.full((4,), 500), torch.tensor([1, 4, 7, 2])
    with torch.no_grad():
        alone = model(x[:1], t[:1], y[:1])
        with script.batch_statistics(model, True):
            together = model(x, t, y)[:1]
            other_partners = model(torch.cat([x[:1], 3 * x[1:]]), t, y)[:1]
        assert not torch.allclose(together, other_partners, atol=1e-4)  # the partners change the sample
        assert not torch.allclose(together, alone, atol=1e-4)
        torch.testing.assert_close(model(x, t, y)[:1], alone)  # restored: running statistics, per sample
    assert not any(m.training for m in model.modules())
    for before, after in zip(running, [b for n, b in model.named_buffers() if "running" in n], strict=True):
        torch.testing.assert_close(before, after, rtol=0, atol=0)
    with pytest.raises(SystemExit, match="no conditional BatchNorm"):
        with script.batch_statistics(tiny("adaln_zero"), True):
            pass
