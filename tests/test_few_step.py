"""Few-step objectives (issue 48, dit/diffusion/few_step.py): the interval input, MeanFlow's JVP against a float64
central difference and torch.autograd.functional.jvp, its loss against the paper's time convention as
Gsunshine/py-meanflow writes it, guidance folded into the target, the shortcut models' self-consistency target, the
k-step sampler's formula, and training / fine-tuning / sampling end to end, on 1 and 2 processes."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import compose_config, needs_fmnist, smoke_config
from helpers.tiny import records
from torch.nn.attention import SDPBackend, sdpa_kernel

import train
from dit.diffusion import SamplingSettings, build_objective, build_sampler
from dit.diffusion.few_step import _inner
from dit.hub import load_model
from dit.hub.convert import diffusers_obstacle
from dit.models.dit import DiT
from dit.training.init_from import initialize

TINY = dict(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=3)


def tiny(dtype=torch.float32, **fields) -> DiT:
    """A tiny DiT with an interval input and every weight random (adaLN-Zero's zeros would hide the time inputs)."""
    torch.manual_seed(0)
    model = DiT(**{**TINY, "interval_input": True, "learn_sigma": False, **fields})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.to(dtype)


class Rng:
    """A stand-in for the step's SlicedRandom."""

    def __init__(self, seed=0):
        self.g = torch.Generator().manual_seed(seed)

    def rand(self, n):
        return torch.rand(n, generator=self.g)

    def randn(self, shape):
        return torch.randn(shape, generator=self.g)


def test_the_interval_input_starts_as_the_model_without_it_and_is_refused_by_others():
    torch.manual_seed(0)
    with_h = DiT(**TINY, interval_input=True)
    plain = DiT(**TINY)
    missing = plain.load_state_dict(with_h.state_dict(), strict=False)
    assert missing.unexpected_keys and all(k.startswith("h_embedder.") for k in missing.unexpected_keys)
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 1, 2])
    with torch.no_grad():
        for p in with_h.parameters():  # wake adaLN-Zero's zeros, but keep the interval's output layer at its init
            if (
                p.abs().sum() == 0
                and p is not with_h.h_embedder.mlp[2].weight
                and p is not with_h.h_embedder.mlp[2].bias
            ):
                p.normal_(0, 0.1)
        plain.load_state_dict(with_h.state_dict(), strict=False)
        for h in (None, torch.zeros(3), torch.rand(3)):
            assert torch.equal(with_h.eval()(x, t, y, h=h), plain.eval()(x, t, y))
    with pytest.raises(ValueError, match=r"h \(an interval\) given, but this model has no interval input"):
        plain(x, t, y, h=torch.zeros(3))
    with pytest.raises(ValueError, match=r"h must have shape \(3,\)"):
        with_h(x, t, y, h=torch.zeros(2))
    assert "interval_input=True" in diffusers_obstacle(with_h)  # DiTPipeline has no second time


def test_meanflow_jvp_matches_a_float64_central_difference_and_autograd():
    """du/dt along the trajectory (tangents v, 1, 0 for x, t, r = t + h), recovered from the target v + h du/dt."""
    model = tiny(torch.float64).train()
    obj = build_objective("meanflow")
    x, t, h = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0.1, 0.3, 0.5, 0.2]).double(), None
    h = torch.tensor([0.5, 0.2, 0.4, 0.7], dtype=torch.float64)
    noise = torch.randn_like(x)
    xt, v = obj.interpolate(x, t, noise)
    kwargs = {"y": torch.tensor([0, 1, 2, 0]), "force_drop_ids": torch.tensor([0, 0, 1, 0])}
    target = obj.target(model, xt, t, h, v, kwargs)
    dudt = (target - v) / h.view(-1, 1, 1, 1)

    def u(x_, t_, r_):
        return model(x_, t_, h=r_ - t_, **kwargs)

    def along(e):  # u a time step e along the trajectory, the end time r held
        return u(xt + e * v, t + e, t + h)

    e = 1e-4  # the five-point central difference: error O(e^4)
    central = (8 * (along(e) - along(-e)) - (along(2 * e) - along(-2 * e))) / (12 * e)
    torch.testing.assert_close(dudt, central, rtol=1e-8, atol=1e-10)
    with sdpa_kernel(SDPBackend.MATH):  # autograd's double-backward JVP: no flash kernel's backward has a derivative
        _, reference = torch.autograd.functional.jvp(u, (xt, t, t + h), (v, torch.ones_like(t), torch.zeros_like(t)))
    torch.testing.assert_close(dudt, reference, rtol=1e-10, atol=1e-12)


def py_meanflow_loss(net, x, e, t_p, r_p, norm_p, norm_eps):
    """Gsunshine/py-meanflow's MeanFlow.forward_with_loss (commit 1f6d72d), transcribed in the paper's time (data at
    t = 0, z = (1 - t) x + t e, v = e - x, u_tgt = v - (t - r) du/dt with tangents (v, 1, 0) for (z, t, r)): per-sample
    losses. net(z, t_p, h_p) is the network in that convention."""
    t, r = t_p.view(-1, 1, 1, 1), r_p.view(-1, 1, 1, 1)
    z = (1 - t) * x + t * e
    v = e - x

    def u_func(z, t, r):
        return net(z, t.view(-1), (t - r).view(-1))

    with sdpa_kernel(SDPBackend.MATH):  # (on a GPU py-meanflow's attention has a forward-mode rule; on CPU only math)
        u_pred, dudt = torch.func.jvp(u_func, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    u_tgt = (v - (t - r) * dudt).detach()
    loss = ((u_pred - u_tgt) ** 2).sum(dim=(1, 2, 3))
    return loss / (loss.detach() + norm_eps) ** norm_p


def test_meanflow_loss_and_gradient_equal_py_meanflows_in_the_papers_time():
    """Our convention (t = 1 data, u the velocity towards the data) against the paper's (t = 0 data): the network in
    the paper's time is u_p(z, t_p, h) = -model(z, 1 - t_p, h); same draws, same loss, same gradient."""
    model = tiny(torch.float64).train()
    obj = build_objective("meanflow", interval_share=0.5, norm_p=0.75)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    draw = obj.draw(Rng(3), x)
    assert (draw["h"] > 0).any() and (draw["h"] == 0).any()
    kwargs = {"y": torch.tensor([0, 1, 2, 0, 1, 2]), "force_drop_ids": torch.tensor([0, 0, 1, 0, 0, 0])}  # as the loop
    ours = obj.losses(model, x, {k: v.double() for k, v in draw.items()}, kwargs)["loss"]
    ours.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    def net(z, t_p, h_p):
        return -model(z, 1 - t_p, h=h_p, **kwargs)

    t_p = 1 - draw["t"].double()
    theirs = py_meanflow_loss(net, x, draw["noise"].double(), t_p, t_p - draw["h"].double(), 0.75, 1e-3)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    theirs.sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-8, atol=1e-12)


def imf_loss(net, x, e, t_p, r_p, norm_p, norm_eps):
    """Improved MeanFlow's loss (Geng et al. 2025b, Algorithm 1) in the paper's time: the network's own instantaneous
    velocity v~ = u(z, t, t) is the JVP's tangent, the compound V = u + (t - r) sg(du/dt) is regressed on v = e - x,
    with MeanFlow's adaptive weight. net(z, t_p, h_p) is the network in that convention."""
    t, r = t_p.view(-1, 1, 1, 1), r_p.view(-1, 1, 1, 1)
    z = (1 - t) * x + t * e

    def u_func(z, t, r):
        return net(z, t.view(-1), (t - r).view(-1))

    with sdpa_kernel(SDPBackend.MATH):
        v_tilde = u_func(z, t, t).detach()
        u_pred, dudt = torch.func.jvp(u_func, (z, t, r), (v_tilde, torch.ones_like(t), torch.zeros_like(r)))
    V = u_pred + (t - r) * dudt.detach()
    loss = ((V - (e - x)) ** 2).sum(dim=(1, 2, 3))
    return loss / (loss.detach() + norm_eps) ** norm_p


def test_imf_tangent_is_the_networks_own_velocity_and_its_loss_imfs():
    """tangent="predicted" (iMF): du/dt along the model's own flow (a float64 central difference along x + e u(x, t, 0),
    t + e), and the loss and gradient iMF's compound-V regression transcribed in the paper's time."""
    model = tiny(torch.float64).train()
    obj = build_objective("meanflow", interval_share=0.5, norm_p=0.75, tangent="predicted")
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    draw = {k: v.double() for k, v in obj.draw(Rng(5), x).items()}
    assert (draw["h"] > 0).any() and (draw["h"] == 0).any()
    kwargs = {"y": torch.tensor([0, 1, 2, 0, 1, 2]), "force_drop_ids": torch.tensor([0, 0, 1, 0, 0, 0])}
    t, h = draw["t"], draw["h"]
    xt, v = obj.interpolate(x, t, draw["noise"])
    dudt = (obj.target(model, xt, t, h, v, kwargs) - v) / h.clamp_min(1e-30).view(-1, 1, 1, 1)

    def along(e):  # u a time step e along the model's own velocity field, the end time held
        with torch.no_grad():
            u0 = model(xt, t, h=torch.zeros_like(t), **kwargs)
            return model(xt + e * u0, t + e, h=h - e, **kwargs)

    e = 1e-4
    central = (8 * (along(e) - along(-e)) - (along(2 * e) - along(-2 * e))) / (12 * e)
    far = h > 0
    torch.testing.assert_close(dudt[far], central[far], rtol=1e-7, atol=1e-9)

    ours = obj.losses(model, x, draw, kwargs)["loss"]
    ours.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    def net(z, t_p, h_p):
        return -model(z, 1 - t_p, h=h_p, **kwargs)

    t_p = 1 - t
    theirs = imf_loss(net, x, draw["noise"], t_p, t_p - h, 0.75, 1e-3)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    theirs.sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-8, atol=1e-12)
    assert "tangent" not in build_objective("meanflow").settings()  # runs recorded before the option keep their digest
    with pytest.raises(ValueError, match="tangent='v': one of sample, predicted"):
        build_objective("meanflow", tangent="v")


@pytest.mark.parametrize(
    "name, options",
    [
        ("meanflow", {}),
        ("meanflow", {"omega": 2.0}),
        ("meanflow", {"tangent": "predicted"}),
        ("meanflow", {"tangent": "predicted", "guidance_input": True}),
        ("shortcut", {}),
    ],
)
def test_training_flops_count_the_objectives_own_passes(name, options):
    """The FLOPs an objective adds (the JVP, the guided velocity, the half steps) against torch's FlopCounterMode on
    its loss and backward: the count at the batch's realised share of intervals."""
    from torch.utils.flop_counter import FlopCounterMode

    from dit.diffusion.few_step import forward_flops

    model, flow = tiny(guidance_input=options.get("guidance_input", False)), build_objective("flow")
    obj = build_objective(name, **options)
    x = torch.randn(64, 1, 8, 8)
    kwargs = {"y": torch.randint(3, (64,)), "force_drop_ids": torch.zeros(64, dtype=torch.long)}

    def counted(objective, draw):
        with FlopCounterMode(display=False) as counter:
            objective.losses(model, x, draw, kwargs)["loss"].mean().backward()
        return counter.get_total_flops()

    draw = obj.draw(Rng(0), x)
    share = (draw["h"] > 0).float().mean().item()
    extra = (counted(obj, draw) - counted(flow, flow.draw(Rng(0), x))) / len(x) / forward_flops(model.config)
    setting = "interval_share" if name == "meanflow" else "bootstrap_share"
    at_share = build_objective(name, **options, **{setting: share})
    assert at_share.training_flops(model.config, 0.0) / forward_flops(model.config) == pytest.approx(extra, rel=0.03)


def test_meanflow_draws_as_the_paper_and_folds_guidance_into_the_target():
    obj = build_objective("meanflow")
    d = obj.draw(Rng(1), torch.zeros(20_000, 1, 1, 1))
    t, h = d["t"], d["h"]
    assert (h >= 0).all() and (t + h <= 1).all() and (t >= 0).all()
    assert abs((h > 0).float().mean().item() - 0.25) < 0.015  # the paper's 25% r != t
    # the noisier time t_p = 1 - t is the max of two logit-normal(-0.4, 1) draws: P(t_p < s) = P(draw < s)^2
    s = 0.5
    p = 0.5 * (1 + math.erf((math.log(s / (1 - s)) + 0.4) / math.sqrt(2)))
    assert abs(((1 - t) < s).float().mean().item() - p**2) < 0.015

    model = tiny(torch.float64).train()
    guided = build_objective("meanflow", omega=2.0, kappa=0.25, guidance_interval=[0.0, 0.6])
    xt, v = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randn(4, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.5, 0.5, 0.2, 0.9], dtype=torch.float64)  # noise levels 0.5, 0.5, 0.8 (outside), 0.1
    y = torch.tensor([0, 1, 2, 1])
    kwargs = {"y": y, "force_drop_ids": torch.tensor([0, 1, 0, 0])}  # the second sample's label dropped
    out = guided.guided_velocity(model, xt, t, v, kwargs)
    zero = torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        cond = model(xt, t, y, h=zero, force_drop_ids=torch.zeros(4, dtype=torch.long))
        uncond = model(xt, t, y, h=zero, force_drop_ids=torch.ones(4, dtype=torch.long))
    expected = 2.0 * v + 0.25 * cond + (1 - 2.0 - 0.25) * uncond
    torch.testing.assert_close(out[[0, 3]], expected[[0, 3]])
    assert torch.equal(out[[1, 2]], v[[1, 2]])  # dropped label; outside the interval
    with pytest.raises(ValueError, match="needs the null class"):
        guided.check_model(tiny(class_dropout_prob=0.0))
    with pytest.raises(ValueError, match="model.interval_input=true"):
        build_objective("meanflow").check_model(DiT(**TINY))


def test_shortcut_targets_are_two_half_steps_and_the_rest_flow_matching():
    model = tiny(torch.float64).train()
    obj = build_objective("shortcut", max_steps=8, bootstrap_share=0.5)
    x = torch.randn(8, 1, 8, 8, dtype=torch.float64)
    d = {k: v.double() for k, v in obj.draw(Rng(2), x).items()}
    b = d["h"] > 0
    assert 0 < b.sum() < 8
    two_d = d["h"][b]
    assert set(two_d.tolist()) <= {0.25, 0.5, 1.0} and torch.allclose(torch.remainder(d["t"][b] / two_d, 1), 0 * two_d)
    assert (d["t"][b] + two_d <= 1 + 1e-12).all()
    kwargs = {"y": torch.arange(8) % 3, "force_drop_ids": torch.tensor([0, 1, 0, 0, 0, 0, 1, 0])}
    loss = obj.losses(model, x, d, kwargs)["loss"]
    xt, v = obj.interpolate(x, d["t"], d["noise"])
    with torch.no_grad():
        u = model(xt, d["t"], h=d["h"], **kwargs)
        target = v.clone()
        for i in b.nonzero()[:, 0].tolist():
            half = d["h"][i].item() / 2
            q = torch.tensor([0.0 if half <= 1 / 8 else half]).double()  # the finest step is the flow velocity
            yi = {k: v[i : i + 1] for k, v in kwargs.items()}
            s1 = model(xt[i : i + 1], d["t"][i : i + 1], h=q, **yi)
            s2 = model(xt[i : i + 1] + half * s1, d["t"][i : i + 1] + half, h=q, **yi)
            target[i] = ((s1 + s2) / 2)[0]
    torch.testing.assert_close(loss, ((u - target) ** 2).mean(dim=(1, 2, 3)))


def test_the_k_step_sampler_takes_average_velocity_steps_with_guidance_keeping_the_interval():
    calls = []

    class Toy(torch.nn.Module):
        """u = a x + b t + c h + y: records its inputs."""

        num_classes, h_embedder = 3, object()
        y_embedder = type("Y", (), {"has_null_class": True})()

        def forward(self, x, t, y, h=None):
            calls.append((t.clone(), None if h is None else h.clone(), y.clone()))
            return 0.5 * x + 0.1 * t.view(-1, 1, 1, 1) + 0.3 * h.view(-1, 1, 1, 1) + y.view(-1, 1, 1, 1)

    noise, y = torch.randn(2, 1, 2, 2, dtype=torch.float64), torch.tensor([1, 2])
    toy = Toy()
    mf = build_objective("meanflow")
    one = build_sampler(mf, SamplingSettings(sampler="meanflow", steps=1)).sample(toy, noise, y)
    torch.testing.assert_close(one, noise + toy(noise, torch.zeros(2).double(), y, h=torch.ones(2).double()))
    two = build_sampler(mf, SamplingSettings(sampler="meanflow", steps=2)).sample(toy, noise, y)
    half = torch.full((2,), 0.5, dtype=torch.float64)
    mid = noise + 0.5 * toy(noise, 0 * half, y, h=half)
    torch.testing.assert_close(two, mid + 0.5 * toy(mid, half, y, h=half))
    calls.clear()
    build_sampler(mf, SamplingSettings(sampler="meanflow", steps=2, cfg_scale=3.0)).sample(toy, noise, y)
    (t, h, labels), _ = calls  # one forward of 2N a step: both branches at the step's interval, not a null one
    assert h.tolist() == [0.5] * 4 and labels.tolist() == [1, 2, 3, 3]

    sc = build_objective("shortcut", max_steps=8)
    calls.clear()
    build_sampler(sc, SamplingSettings(sampler="shortcut", steps=8)).sample(toy, noise, y)
    assert [c[1][0].item() for c in calls] == [0.0] * 8  # the finest step: the flow velocity
    for bad in (3, 16):
        with pytest.raises(ValueError, match=f"steps={bad}: a shortcut model trained with max_steps=8"):
            build_sampler(sc, SamplingSettings(sampler="shortcut", steps=bad))
    with pytest.raises(ValueError, match="sampler 'ddim' cannot sample a model trained with the 'meanflow' objective"):
        build_sampler(mf, SamplingSettings(sampler="ddim", steps=2))
    assert build_sampler(mf, SamplingSettings()).name == "meanflow"


def test_the_loss_sees_ddps_forward_and_the_jvp_the_inner_module():
    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    m = tiny()
    assert _inner(Wrapper(m)) is m and _inner(m) is m


@needs_fmnist
@pytest.mark.parametrize("objective", ["meanflow", pytest.param("shortcut", marks=pytest.mark.slow)])  # (+6 s)
def test_train_then_sample_in_one_call_and_fine_tune_from_a_flow_model(objective, tmp_path):
    """train.py diffusion=<objective> model.interval_input=true trains (its FID sampler the few-step one), sample.py
    samples it in one call; init_from a flow run starts as that flow model at h = 0."""
    import sample

    run = train.run(
        smoke_config(
            f"diffusion={objective}",
            "model.interval_input=true",
            "training.total_steps=2",
            "training.grid_sampling.steps=4",
        ),
        tmp_path / "few",
    )
    assert run["model"].h_embedder is not None
    record = json.loads((tmp_path / "few" / "model" / "config.json").read_text())
    assert record["objective"]["name"] == objective
    out = tmp_path / "samples"
    args = [f"checkpoint={tmp_path / 'few' / 'model'}", "num_images=4", "batch_size=4", "steps=1", f"out_dir={out}"]
    sample.run(compose_config("sample", args))
    assert np.load(out / "samples.npz")["arr_0"].shape[0] == 4

    train.run(smoke_config("diffusion=flow", "training.total_steps=2"), tmp_path / "flow")
    flow, _ = load_model(tmp_path / "flow" / "model")  # the export's EMA weights: what init_from loads
    tuned = train.build(smoke_config(f"diffusion={objective}", "model.interval_input=true").model)
    done = initialize(tuned, str(tmp_path / "flow" / "model"))
    assert {r.key.split(".")[0] for r in done.rows} == {"h_embedder"}  # every other tensor kept
    size = flow.input_size
    x, t, y = torch.randn(2, flow.in_channels, size, size), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad():
        for h in (None, torch.rand(2)):
            torch.testing.assert_close(tuned.eval()(x, t, y, h=h), flow.eval()(x, t, y))


@needs_fmnist
@pytest.mark.slow  # ~20 s each: gloo processes
@pytest.mark.parametrize("launcher", ["ddp", "fsdp"])
@pytest.mark.parametrize("objective", ["meanflow", "shortcut", "imf"])  # imf: MeanFlow with iMF's guidance input
def test_two_processes_equal_one(objective, launcher, tmp_path):
    """DDP and FSDP2: the same losses as one process and the same weights (the JVP and the targets run on the module
    under the wrapper without gradient; the loss's forward through the wrapper, which synchronises the gradients)."""
    from safetensors.torch import load_file
    from test_train import HELPER, SMOKE, accelerate_launch, run_all

    share = {"shortcut": "diffusion.bootstrap_share=0.5"}.get(objective, "diffusion.interval_share=0.5")
    imf = ["model.guidance_input=true", "diffusion.guidance_input=true", "diffusion.tangent=predicted"]
    chosen = ["diffusion=meanflow", *imf] if objective == "imf" else [f"diffusion={objective}"]
    overrides = [*SMOKE, *chosen, "model.interval_input=true", share, "training.grid_sampling.steps=4"]
    extra = ["--fsdp-on-cpu"] if launcher == "fsdp" else []
    port = {("meanflow", "ddp"): "29591", ("meanflow", "fsdp"): "29592", ("shortcut", "ddp"): "29593"}
    port |= {("shortcut", "fsdp"): "29594", ("imf", "ddp"): "29595", ("imf", "fsdp"): "29596"}
    port = port[(objective, launcher)]
    cmd = accelerate_launch(launcher, "--num_processes", "2", "--main_process_port", port, HELPER, *extra)
    run_all([*cmd, str(tmp_path / "two"), *overrides])
    one = train.run(compose_config("train", overrides), tmp_path / "one")
    losses = [[r["loss"] for r in records(tmp_path / run)] for run in ("two", "one")]
    np.testing.assert_allclose(*losses, rtol=1e-4)
    exported = load_file(tmp_path / "two" / "model" / "model.safetensors")
    for k, v in one["model"].state_dict().items():
        torch.testing.assert_close(exported[k], v, rtol=1e-4, atol=1e-6, msg=k)
    init = train.build(compose_config("train", overrides).model).state_dict()
    for key in ("h_embedder.mlp.2.weight", *(["g_embedder.mlp.2.weight"] if objective == "imf" else [])):
        assert not torch.equal(one["model"].state_dict()[key], init[key])


def imf_guided_loss(net, x, e, t_p, r_p, y, dropped, g, null, norm_p, norm_eps):
    """Improved MeanFlow's loss with the guidance as conditions, transcribed from its official code (imf.py, forward
    and guidance_fn) in the paper's time (z = (1 - t) x + t e, t = 1 noise), the auxiliary v-head replaced by the
    network at h = 0 and interval (0, 1), as ours does. net(z, t_p, h_p, g, y) is the network in that convention; g the
    samples' (omega, t_min, t_max); labels y of the samples `dropped` become the null class after the guidance."""
    t, r = t_p.view(-1, 1, 1, 1), r_p.view(-1, 1, 1, 1)
    z = (1 - t) * x + t * e
    v_t = e - x
    omega, t_min, t_max = g.unbind(1)
    zero, one = torch.zeros_like(t_p), torch.ones_like(t_p)

    def v_head(w, labels):
        return net(z, t_p, zero, torch.stack([w, zero, one], 1), labels)

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        v_u = v_head(one, torch.full_like(y, null))
        w = torch.where((t_p >= t_min) & (t_p <= t_max), omega, one)
        v_c = v_head(w, y)
        v_g = v_t + (1 - 1 / w).view(-1, 1, 1, 1) * (v_c - v_u)
    drop = dropped.bool()
    labels = torch.where(drop, torch.full_like(y, null), y)
    v_g = torch.where(drop.view(-1, 1, 1, 1), v_t, v_g)

    def u_fn(z, t_, r_):
        return net(z, t_, t_ - r_, g, labels)

    with sdpa_kernel(SDPBackend.MATH):
        u, du_dt = torch.func.jvp(u_fn, (z, t_p, r_p), (v_c, torch.ones_like(t_p), torch.zeros_like(r_p)))
    V = u + (t - r) * du_dt.detach()
    loss = ((V - v_g) ** 2).sum(dim=(1, 2, 3))
    return loss / (loss.detach() + norm_eps) ** norm_p


def test_the_guidance_input_draws_as_imfs_code_and_its_loss_is_imfs():
    """diffusion.guidance_input=true: each sample's guidance (scale from the power distribution on [1, 1 + max], the
    interval [lo, hi] in [0, .5] x [.5, 1], [0, 1] without an interval), and the loss and gradient iMF's official
    code's, transcribed in the paper's time (the guided target, the JVP along the network's guided velocity)."""
    n = 40_000
    for beta in (1.0, 2.0):
        obj = build_objective("meanflow", guidance_input=True, guidance_max=7.0, guidance_beta=beta)
        d = obj.draw(Rng(3), torch.zeros(n, 1, 1, 1))
        scale, lo, hi = d["g"].unbind(1)
        assert scale.min() >= 1 and scale.max() <= 8
        # the power distribution's CFD, density ~ s^-beta on [1, 8]: at s = 3
        cdf = math.log(3) / math.log(8) if beta == 1 else (3 ** (1 - beta) - 1) / (8 ** (1 - beta) - 1)
        assert abs((scale < 3).float().mean().item() - cdf) < 0.01
        far = d["h"] > 0
        assert (lo[far] >= 0).all() and (lo[far] <= 0.5).all() and (hi[far] >= 0.5).all() and (hi[far] <= 1).all()
        assert abs(lo[far].mean().item() - 0.25) < 0.01 and abs(hi[far].mean().item() - 0.75) < 0.01
        assert (lo[~far] == 0).all() and (hi[~far] == 1).all()

    model = tiny(torch.float64, guidance_input=True).train()
    obj = build_objective("meanflow", interval_share=0.5, norm_p=0.75, tangent="predicted", guidance_input=True)
    x = torch.randn(8, 1, 8, 8, dtype=torch.float64)
    draw = {k: v.double() for k, v in obj.draw(Rng(5), x).items()}
    draw["g"][0, 1:] = torch.tensor([0.0, 0.4])  # one interval sample outside its interval: unguided there
    draw["h"][0], draw["t"][0] = 0.3, 0.2  # (noise level 0.8)
    assert (draw["h"] > 0).sum() >= 3 and (draw["h"] == 0).sum() >= 2
    y, dropped = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.tensor([0, 0, 1, 0, 0, 0, 1, 0])
    kwargs = {"y": y, "force_drop_ids": dropped}
    ours = obj.losses(model, x, draw, kwargs)["loss"]
    ours.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    def net(z, t_p, h_p, g, labels):
        return -model(z, 1 - t_p, labels, h=h_p, g=g, force_drop_ids=torch.zeros_like(labels))

    t_p = 1 - draw["t"]
    theirs = imf_guided_loss(net, x, draw["noise"], t_p, t_p - draw["h"], y, dropped, draw["g"], 3, 0.75, 1e-3)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    theirs.sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-8, atol=1e-12)
    assert "guidance_input" not in build_objective("meanflow").settings()  # earlier runs keep their digest
    assert build_objective("meanflow", guidance_input=True).settings()["guidance_input"] is True
    with pytest.raises(ValueError, match="guidance_input=true draws the guidance scale"):
        build_objective("meanflow", guidance_input=True, omega=2.0)
    with pytest.raises(ValueError, match="model.guidance_input=true"):
        build_objective("meanflow", guidance_input=True).check_model(tiny())
    for untrained in ("flow", "ddpm", "meanflow", "shortcut"):  # a guidance input no objective trains: refused
        with pytest.raises(ValueError, match="only diffusion=meanflow with diffusion.guidance_input=true trains"):
            build_objective(untrained).check_model(tiny(guidance_input=True))


def test_the_guidance_input_samples_guided_in_one_call_at_the_scale_asked():
    """guidance=input: the scale and the interval go to the model, one call a step (model_calls counts 1); a model
    without the input is refused in one line; a fresh guidance input leaves the model as it was (unguided = no g)."""
    seen = []

    class Toy(torch.nn.Module):
        num_classes, h_embedder, g_embedder = 3, object(), object()
        y_embedder = type("Y", (), {"has_null_class": True})()

        def forward(self, x, t, y, h=None, g=None):
            seen.append((len(x), None if g is None else g.clone()))
            return x * g[:, :1].view(-1, 1, 1, 1) + h.view(-1, 1, 1, 1)

    mf = build_objective("meanflow", guidance_input=True)
    noise, y = torch.randn(2, 1, 2, 2), torch.tensor([1, 2])
    settings = SamplingSettings(sampler="meanflow", steps=2, cfg_scale=3.0, guidance="input", cfg_interval=[0.1, 0.7])
    sampler = build_sampler(mf, settings)
    out = sampler.sample(Toy(), noise, y)
    assert sampler.model_calls == 2 and [n for n, _ in seen] == [2, 2]  # N images a call, no second branch
    assert all(torch.equal(g, torch.tensor([[3.0, 0.1, 0.7]] * 2)) for _, g in seen)
    mid = noise + 0.5 * (3 * noise + 0.5)
    torch.testing.assert_close(out, mid + 0.5 * (3 * mid + 0.5))
    assert build_sampler(mf, SamplingSettings(sampler="meanflow", steps=2, cfg_scale=3.0)).model_calls == 4  # cfg
    with pytest.raises(ValueError, match="guidance=input .* needs a model trained with a guidance input"):
        build_sampler(mf, settings).sample(tiny(), torch.randn(2, 1, 8, 8), y)

    torch.manual_seed(0)
    fresh = DiT(**TINY, interval_input=True, guidance_input=True)
    plain = DiT(**TINY, interval_input=True)
    plain.load_state_dict(fresh.state_dict(), strict=False)
    with torch.no_grad():
        for m in (fresh, plain):  # adaLN-Zero's zeros woken alike, the guidance's output layer kept at zero
            for name, p in m.named_parameters():
                if not name.startswith("g_embedder.mlp.2") and p.abs().sum() == 0:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    x, t, h = torch.randn(2, 1, 8, 8), torch.rand(2), torch.rand(2)
    with torch.no_grad():
        for g in (None, torch.tensor([[4.0, 0.2, 0.9], [1.0, 0.0, 1.0]])):
            torch.testing.assert_close(fresh.eval()(x, t, y, h=h, g=g), plain.eval()(x, t, y, h=h))
        woken = fresh.g_embedder.mlp[2].weight.normal_()
        assert woken.abs().sum() > 0
        unguided = torch.tensor([[1.0, 0.0, 1.0]] * 2)
        torch.testing.assert_close(fresh(x, t, y, h=h), fresh(x, t, y, h=h, g=unguided))
    with pytest.raises(ValueError, match=r"g must have shape \(2, 3\)"):
        fresh(x, t, y, h=h, g=torch.ones(2))
    with pytest.raises(ValueError, match="no guidance input"):
        plain(x, t, y, h=h, g=unguided)


@needs_fmnist
def test_train_with_the_guidance_input_then_sample_and_export_guided_in_one_call(tmp_path):
    """model.guidance_input=true with diffusion.guidance_input=true trains (its grid guided by the input), sample.py
    guidance=input samples it at a scale chosen after training in one call, and the export's card says so."""
    from omegaconf import OmegaConf

    import sample
    from dit.hub.export import main as export_main

    config = smoke_config(
        "diffusion=meanflow",
        "model.interval_input=true",
        "model.guidance_input=true",
        "diffusion.guidance_input=true",
        "diffusion.tangent=predicted",
        "training.total_steps=3",  # adaLN-Zero: the zero-initialised guidance embedding first moves at step 3
        "training.grid_sampling.steps=1",
        "training.grid_sampling.cfg_scale=3",
        "training.grid_sampling.guidance=input",
    )
    run = train.run(config, tmp_path / "imf")
    (tmp_path / "imf" / ".hydra").mkdir()  # what train.py's Hydra records, read by the export's card
    OmegaConf.save(config, tmp_path / "imf" / ".hydra" / "config.yaml")
    assert run["model"].g_embedder is not None
    init = train.build(smoke_config("model.interval_input=true", "model.guidance_input=true").model).state_dict()
    assert not torch.equal(run["model"].state_dict()["g_embedder.mlp.2.weight"], init["g_embedder.mlp.2.weight"])
    record = json.loads((tmp_path / "imf" / "model" / "config.json").read_text())
    assert record["objective"]["guidance_input"] is True
    model, _ = load_model(tmp_path / "imf" / "model", use_ema=False)
    size = model.input_size
    x, t, y, h = torch.randn(2, model.in_channels, size, size), torch.zeros(2), torch.tensor([0, 1]), torch.ones(2)
    with torch.no_grad():  # trained: the scale asked changes the output
        outs = [model.eval()(x, t, y, h=h, g=torch.tensor([[s, 0.0, 1.0]] * 2)) for s in (1.0, 4.0)]
    assert not torch.equal(*outs)
    out = tmp_path / "samples"
    args = [f"checkpoint={tmp_path / 'imf' / 'model'}", "num_images=4", "batch_size=4", "steps=1", "cfg_scale=4",
            "guidance=input", f"out_dir={out}"]  # fmt: skip
    sample.run(compose_config("sample", args))
    assert np.load(out / "samples.npz")["arr_0"].shape[0] == 4
    assert export_main([str(tmp_path / "imf"), "-o", str(tmp_path / "export")]) == 0
    card = (tmp_path / "export" / "README.md").read_text()
    assert "sampler=meanflow steps=1 cfg_scale=3.0" in card and "guidance=input" in card
