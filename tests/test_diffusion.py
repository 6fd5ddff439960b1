"""Diffusion maths against independent references: diffusers' schedulers and closed forms, in float64."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from scipy.stats import norm

from dit.diffusion import create_diffusion, get_betas, guided_model, space_timesteps
from dit.diffusion.gaussian_diffusion import discretized_gaussian_log_likelihood

F64 = torch.float64


def float64_tables(scheduler, betas):
    """Run diffusers' own step() in float64: replace its float32 tables by float64 ones."""
    scheduler.betas = torch.from_numpy(betas)
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    scheduler.one = torch.tensor(1.0, dtype=F64)
    scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=F64)
    return scheduler


def ddpm_scheduler(variance_type, betas):
    s = DDPMScheduler(
        num_train_timesteps=len(betas), beta_schedule="linear", variance_type=variance_type, clip_sample=False
    )
    return float64_tables(s, betas)


def test_linear_betas_are_dits():
    betas = get_betas("linear", 1000)
    assert betas[0] == 1e-4 and betas[-1] == pytest.approx(0.02, abs=1e-15) and len(betas) == 1000
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").betas.double().numpy()
    np.testing.assert_allclose(betas, ref, rtol=1e-6)  # diffusers keeps float32 betas


def test_cosine_betas_match_diffusers():
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").betas.double().numpy()
    np.testing.assert_allclose(get_betas("cosine", 1000), ref, rtol=1e-6)


@pytest.mark.parametrize("variance_type", ["learned_range", "fixed_small"])
@pytest.mark.parametrize("respacing", [None, "250", "ddim25"])
def test_step_equals_diffusers_ddpm(variance_type, respacing):
    ours = create_diffusion(respacing, variance_type=variance_type)
    theirs = ddpm_scheduler(variance_type, get_betas("linear", 1000))
    kept = space_timesteps(1000, respacing) if respacing else list(range(1000))
    if respacing:
        theirs.set_timesteps(timesteps=kept[::-1])  # diffusers then steps between the kept timesteps
    C = 3
    for i in sorted({0, 1, 2, len(kept) // 2, len(kept) - 1}):
        t = torch.full((2,), i)
        x = torch.randn(2, C, 4, 4, dtype=F64)
        out = torch.randn(2, 2 * C if variance_type == "learned_range" else C, 4, 4, dtype=F64)
        if variance_type == "learned_range":
            out[:, C:] = out[:, C:].tanh()  # v in [-1, 1]
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i), dtype=F64)
        expected = theirs.step(out, kept[i], x, generator=torch.Generator().manual_seed(i))
        got, pred_x0 = ours.p_sample(out, x, t, noise)
        torch.testing.assert_close(got, expected.prev_sample, rtol=0, atol=1e-6)
        torch.testing.assert_close(pred_x0, expected.pred_original_sample, rtol=0, atol=1e-6)
        if i > 0:  # at t = 0 ADM clips the log variance; no noise is added there by either
            v = out[:, C:] if variance_type == "learned_range" else None
            their_var = theirs._get_variance(kept[i], predicted_variance=v)
            their_log_var = their_var if variance_type == "learned_range" else torch.log(their_var)
            log_var = ours.p_mean_variance(out, x, t)["log_variance"]
            torch.testing.assert_close(log_var, their_log_var.expand_as(log_var), rtol=0, atol=1e-6)


def test_posterior_mean_and_variance_closed_form():
    d = create_diffusion()
    betas = get_betas("linear", 1000)
    ac = np.cumprod(1 - betas)
    x0, xt = torch.randn(1, 2, 3, 3, dtype=F64), torch.randn(1, 2, 3, 3, dtype=F64)
    for t in (1, 10, 500, 999):
        mean, var, _ = d.q_posterior(x0, xt, torch.tensor([t]))
        a_prev = ac[t - 1]
        ref_mean = (math.sqrt(a_prev) * betas[t] * x0 + math.sqrt(1 - betas[t]) * (1 - a_prev) * xt) / (1 - ac[t])
        torch.testing.assert_close(mean, ref_mean, rtol=0, atol=1e-12)
        assert var.item() == pytest.approx((1 - a_prev) / (1 - ac[t]) * betas[t], rel=1e-12)


def test_respaced_betas_equal_diffusers_steps():
    kept = space_timesteps(1000, "250")
    ours = create_diffusion("250")
    ac = np.cumprod(1 - get_betas("linear", 1000))
    # diffusers: beta_t = 1 - alpha_bar_t / alpha_bar_prev(t) between consecutive kept timesteps.
    for i in range(1, 250):
        assert ours.betas[i].item() == pytest.approx(1 - ac[kept[i]] / ac[kept[i - 1]], rel=1e-12)
    torch.testing.assert_close(ours.alphas_cumprod, torch.from_numpy(ac[kept]), rtol=1e-12, atol=0)
    assert kept[0] == 0 and kept[-1] == 999 and len(kept) == 250


def test_ddim_equals_diffusers_eta0():
    ours = create_diffusion("ddim50", variance_type="fixed_small")
    theirs = float64_tables(
        DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True),
        get_betas("linear", 1000),
    )
    theirs.set_timesteps(50)
    assert theirs.timesteps.tolist() == space_timesteps(1000, "ddim50")[::-1]
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    for i, t_orig in enumerate(theirs.timesteps.tolist()):
        index = 49 - i
        eps = torch.randn_like(x)
        expected = theirs.step(eps, t_orig, x, eta=0.0).prev_sample
        got, _ = ours.ddim_sample(eps, x, torch.full((2,), index), torch.randn_like(x), eta=0.0)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        x = expected


def approx_cdf(x):
    return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def test_vb_term_closed_form():
    d = create_diffusion()
    betas = get_betas("linear", 1000)
    ac = np.cumprod(1 - betas)
    C = 2
    x0 = torch.rand(3, C, 4, 4, dtype=F64) * 2 - 1
    xt = torch.randn(3, C, 4, 4, dtype=F64)
    out = torch.randn(3, 2 * C, 4, 4, dtype=F64)
    out[:, C:] = out[:, C:].tanh()
    t = torch.tensor([0, 7, 600])
    vb = d.vb_terms_bpd(out, x0, xt, t)
    for n, tn in enumerate(t.tolist()):
        eps, v = out[n, :C].numpy(), out[n, C:].numpy()
        x0n, xtn = x0[n].numpy(), xt[n].numpy()
        a, a_prev = ac[tn], (ac[tn - 1] if tn > 0 else 1.0)
        post_var = (1 - a_prev) / (1 - a) * betas[tn]
        min_log = np.log(post_var if tn > 0 else (1 - ac[0]) / (1 - ac[1]) * betas[1])
        log_var = (v + 1) / 2 * np.log(betas[tn]) + (1 - v) / 2 * min_log
        pred_x0 = (xtn - np.sqrt(1 - a) * eps) / np.sqrt(a)
        coef1, coef2 = np.sqrt(a_prev) * betas[tn] / (1 - a), np.sqrt(1 - betas[tn]) * (1 - a_prev) / (1 - a)
        model_mean = coef1 * pred_x0 + coef2 * xtn
        if tn > 0:
            true_mean = coef1 * x0n + coef2 * xtn
            kl = 0.5 * (
                log_var
                - np.log(post_var)
                + post_var / np.exp(log_var)
                + (true_mean - model_mean) ** 2 / np.exp(log_var)
                - 1
            )
            ref = kl.mean() / np.log(2)
        else:
            std = np.exp(0.5 * log_var)
            upper = np.where(x0n > 0.999, 1.0, approx_cdf((x0n - model_mean + 1 / 255) / std))
            lower = np.where(x0n < -0.999, 0.0, approx_cdf((x0n - model_mean - 1 / 255) / std))
            ref = -np.log(np.maximum(upper - lower, 1e-12)).mean() / np.log(2)
        assert vb[n].item() == pytest.approx(ref, rel=1e-9), tn


def test_discretized_likelihood_close_to_exact_normal_cdf():
    x = torch.linspace(-0.99, 0.99, 50, dtype=F64)
    means, log_scales = 0.3 * torch.randn(50, dtype=F64), torch.full((50,), -3.0, dtype=F64)
    ours = discretized_gaussian_log_likelihood(x, means, log_scales).exp().numpy()
    s = np.exp(-3.0)
    exact = norm.cdf((x - means + 1 / 255) / s) - norm.cdf((x - means - 1 / 255) / s)
    np.testing.assert_allclose(ours, exact, atol=2e-3)


def test_training_loss_stop_gradient_on_mean():
    d = create_diffusion()
    C = 2
    head = torch.nn.Conv2d(C, 2 * C, 1).double()

    def model(x, t):
        return head(x)

    x0 = torch.rand(4, C, 4, 4, dtype=F64) * 2 - 1
    t = torch.tensor([0, 5, 500, 999])
    terms = d.training_losses(model, x0, t, noise=torch.randn_like(x0))
    assert set(terms) == {"loss", "mse", "vb"}
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    # The VB term reaches only the variance channels (outputs C..2C-1).
    terms["vb"].sum().backward()
    assert head.weight.grad[:C].abs().max() == 0 and head.weight.grad[C:].abs().max() > 0


def test_fixed_variance_loss_is_mse():
    d = create_diffusion(variance_type="fixed_small")
    x0 = torch.randn(2, 3, 4, 4)
    noise = torch.randn_like(x0)
    terms = d.training_losses(lambda x, t: torch.zeros_like(x), x0, torch.tensor([3, 9]), noise=noise)
    torch.testing.assert_close(terms["loss"], noise.pow(2).mean(dim=(1, 2, 3)))


def test_bad_names():
    with pytest.raises(ValueError, match="unknown noise schedule 'quadratic'"):
        get_betas("quadratic", 10)
    with pytest.raises(ValueError, match="unknown variance_type 'learned'"):
        create_diffusion(variance_type="learned")
    with pytest.raises(ValueError, match="cannot take 300 steps"):
        space_timesteps(100, "300")


# --- sampling loops and guidance ---------------------------------------------------------------


class ToyModel(torch.nn.Module):
    """Label-dependent eps and v, so guidance has something to act on."""

    def __init__(self, C=4, num_classes=5):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(num_classes + 1, 2 * C))

    def forward(self, x, t, y):
        bias = self.table[y][:, :, None, None]
        return torch.cat([0.1 * x, torch.zeros_like(x)], 1) + bias * (t[:, None, None, None] / 1000.0)


def test_cfg_scale_one_equals_unguided():
    model = ToyModel()
    x, t, y = torch.randn(3, 4, 2, 2), torch.tensor([10, 500, 999]), torch.tensor([0, 2, 4])
    torch.testing.assert_close(guided_model(model, 1.0, null_class=5)(x, t, y), model(x, t, y))


@pytest.mark.parametrize("channels", [None, 3])
def test_guidance_formula_and_channels(channels):
    model = ToyModel()
    x, t, y = torch.randn(3, 4, 2, 2), torch.tensor([10, 500, 999]), torch.tensor([0, 2, 4])
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 5))
    got = guided_model(model, 4.0, null_class=5, guidance_channels=channels)(x, t, y)
    g = 4 if channels is None else channels
    torch.testing.assert_close(got[:, :g], uncond[:, :g] + 4.0 * (cond[:, :g] - uncond[:, :g]))
    torch.testing.assert_close(got[:, g:], cond[:, g:])


def chain_sampler(name, steps, **options):
    from dit.diffusion import SamplingSettings, build_sampler

    return build_sampler(
        create_diffusion(), SamplingSettings(sampler=name, steps=steps, cfg_scale=2.0, options=options)
    )


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_chain_samplers_are_deterministic_by_seed(sampler):
    s = chain_sampler(sampler, 10, **({"eta": 1.0} if sampler == "ddim" else {}))
    model = ToyModel()
    model.num_classes, model.y_embedder = 5, type("Y", (), {"has_null_class": True})()
    y = torch.tensor([1, 3])

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return s.sample(model, torch.randn(2, 4, 2, 2, generator=g), y, g)

    torch.testing.assert_close(run(0), run(0), rtol=0, atol=0)
    assert not torch.allclose(run(0), run(1))


class Float64Model(torch.nn.Module):
    """A fixed smooth float64 model with eps and v channels and a null class, for whole-chain comparisons."""

    num_classes = 3
    y_embedder = type("Y", (), {"has_null_class": True})()

    def forward(self, x, t, y):
        s = (t.to(F64) / 1000).reshape(-1, 1, 1, 1)
        eps = torch.sin(x * 3 + s) * 0.7 + 0.1 * (y.to(F64).reshape(-1, 1, 1, 1) - 1)
        return torch.cat([eps, torch.tanh(x - s)], dim=1)  # v in [-1, 1]


def test_ddpm_sampler_equals_diffusers_scheduler_driven_over_the_chain():
    """The whole ancestral chain (10 ADM-respaced steps, learned variance) equals diffusers' DDPMScheduler stepped
    between the same timesteps with the same noise: ours draws one normal per step, diffusers one per step
    but the last, both from the generator in the same order."""
    from dit.diffusion import guided_model

    s = chain_sampler("ddpm", 10)
    kept = space_timesteps(1000, "10")
    theirs = ddpm_scheduler("learned_range", get_betas("linear", 1000))
    theirs.set_timesteps(timesteps=kept[::-1])
    model, y = Float64Model(), torch.tensor([0, 2])
    noise = torch.randn(2, 2, 4, 4, dtype=F64)
    got = s.sample(model, noise, y, torch.Generator().manual_seed(5))
    fn, g, x = guided_model(model, 2.0, null_class=3), torch.Generator().manual_seed(5), noise
    for t in kept[::-1]:
        x = theirs.step(fn(x, torch.full((2,), t), y), t, x, generator=g).prev_sample
    torch.testing.assert_close(got, x, rtol=0, atol=1e-6)
    assert not torch.allclose(got, chain_sampler("ddpm", 10).sample(model, noise, y, torch.Generator().manual_seed(6)))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_sampler_follows_eq_12_over_the_chain(eta):
    """DDIM over the respaced chain, against Song et al. (2021) eq. 12 written out on the kept timesteps'
    alpha_bar: x' = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + sigma z, sigma = eta sqrt((1-a')/(1-a)) sqrt(1-a/a')."""
    from dit.diffusion import guided_model

    s = chain_sampler("ddim", 8, eta=eta)
    kept = space_timesteps(1000, "8")
    ac = np.cumprod(1 - get_betas("linear", 1000))[kept]
    model, y = Float64Model(), torch.tensor([1, 0])
    noise = torch.randn(2, 2, 4, 4, dtype=F64)
    got = s.sample(model, noise, y, torch.Generator().manual_seed(1))
    fn, g, x = guided_model(model, 2.0, null_class=3), torch.Generator().manual_seed(1), noise
    for i in reversed(range(len(kept))):
        a, a_prev = ac[i], ac[i - 1] if i > 0 else 1.0
        eps = fn(x, torch.full((2,), kept[i]), y)[:, :2]
        z = torch.randn(x.shape, generator=g, dtype=F64)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps + (sigma * z if i > 0 else 0)
    torch.testing.assert_close(got, x, rtol=0, atol=1e-9)
