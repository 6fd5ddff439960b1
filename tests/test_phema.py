"""Post-hoc EMA (dit.phema): the math against NVlabs/edm2's phema.py (numbers it produced, tests/data/) and the
closed forms against numerical integration; the tracking rule against the profile it should give; a tracked
profile reconstructed from the snapshots; training with profiles resumes exactly; the CLI's exports load."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import ROOT, needs_fmnist, smoke_config
from PIL import Image
from scipy import integrate

import train
from dit.hub import load_model
from dit.integrity import load_safetensors
from dit.phema import (
    find_snapshots,
    gamma_to_sigma_rel,
    power_beta,
    power_inner_product,
    reconstruct,
    sigma_rel_to_gamma,
    solve_coefficients,
)
from dit.phema.__main__ import main as phema_main
from dit.training.ema import EMA, PowerProfile

EDM2 = json.loads((ROOT / "tests" / "data" / "edm2_phema_reference.json").read_text())


def test_widths_and_exponents_match_edm2():
    for sigma, gamma in EDM2["std_to_exp"].items():
        assert sigma_rel_to_gamma(float(sigma)) == pytest.approx(gamma, rel=1e-12, abs=1e-10)
        assert gamma_to_sigma_rel(gamma) == pytest.approx(float(sigma), abs=1e-12)
    for gamma, sigma in EDM2["exp_to_std"].items():
        assert gamma_to_sigma_rel(float(gamma)) == pytest.approx(sigma, abs=1e-12)
    for sigma, n, beta in EDM2["beta"]:
        assert power_beta(sigma_rel_to_gamma(sigma), n) == pytest.approx(beta, abs=1e-12)


def test_inner_products_and_coefficients_match_edm2_to_1e_10():
    for a_t, a_s, b_t, b_s, value in EDM2["correlation"]:
        ours = power_inner_product(a_t, sigma_rel_to_gamma(a_s), b_t, sigma_rel_to_gamma(b_s))
        assert abs(ours - value) <= 1e-10 * max(1.0, abs(value)), (a_t, a_s, b_t, b_s)
    for case in EDM2["coefficients"]:
        ours = solve_coefficients(case["in_t"], case["in_sigma"], case["out_t"], case["out_sigma"])
        assert np.abs(ours - np.array(case["x"])).max() <= 1e-10, case["out_sigma"]


@pytest.mark.parametrize(
    "a_t,a_s,b_t,b_s", [(100.0, 0.05, 300.0, 0.1), (500.0, 0.2, 200.0, 0.02), (7.0, 0.1, 7.0, 0.1)]
)
def test_the_inner_product_is_the_integral_of_the_profiles(a_t, a_s, b_t, b_s):
    """Eq. 151 against float64 quadrature of p_a(t) p_b(t), p(t) = (g + 1) / T (t / T)^g on [0, T]."""
    ga, gb = sigma_rel_to_gamma(a_s), sigma_rel_to_gamma(b_s)

    def p(t, T, g):
        return (g + 1) / T * (t / T) ** g if t <= T else 0.0

    numeric, _ = integrate.quad(lambda t: p(t, a_t, ga) * p(t, b_t, gb), 0, min(a_t, b_t), epsabs=1e-14, limit=200)
    assert power_inner_product(a_t, ga, b_t, gb) == pytest.approx(numeric, rel=1e-9)


def test_sigma_rel_is_the_relative_width_of_the_profile():
    """Eq. 123: the standard deviation of the profile's density, over its end time, by quadrature."""
    for sigma in (0.05, 0.1, 0.2):
        g = sigma_rel_to_gamma(sigma)
        mean = integrate.quad(lambda t, g=g: t * (g + 1) * t**g, 0, 1)[0]
        var = integrate.quad(lambda t, g=g, m=mean: (t - m) ** 2 * (g + 1) * t**g, 0, 1)[0]
        assert np.sqrt(var) == pytest.approx(sigma, rel=1e-9)


def test_bad_widths_are_named():
    with pytest.raises(ValueError, match=r"sigma_rel=0\.3: need 0 < sigma_rel < 0\.2886"):
        sigma_rel_to_gamma(0.3)


def toy_run(widths, steps, every, seed=0):
    """A 64-parameter 'model' whose weights follow a random walk; an EMA with profiles of these widths; the
    snapshots every `every` updates as (Snapshot-like records) in memory."""
    from dit.phema import Snapshot

    gen = torch.Generator().manual_seed(seed)
    net = torch.nn.Linear(8, 8, bias=False)
    ema = EMA(net, 0.99, power=widths)
    snaps, states = [], {}
    with torch.no_grad():
        for n in range(1, steps + 1):
            net.weight.add_(torch.randn(net.weight.shape, generator=gen, dtype=torch.float32) * 0.1)
            ema.update(net)
            if n % every == 0:
                for p in ema.profiles:
                    snaps.append(Snapshot(None, n, n, p.sigma_rel))
                    states[(n, p.sigma_rel)] = {k: v.clone() for k, v in p.model.state_dict().items()}
    return ema, snaps, states


def test_the_tracking_rule_gives_the_power_function_profile():
    """After n updates a profile's weight on update k is (1 - beta_k) prod_{j > k} beta_j = (1 - beta_k) (k / n)^(g+1):
    close to the continuous density (g + 1) / n (k / n)^g (Eq. 121), and exact in its total (sum = 1)."""
    n, g = 400, sigma_rel_to_gamma(0.1)
    weights = np.array(
        [(1 - power_beta(g, k)) * np.prod([power_beta(g, j) for j in range(k + 1, n + 1)]) for k in range(1, n + 1)]
    )
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    k = np.arange(1, n + 1)
    continuous = (g + 1) / n * (k / n) ** g
    assert np.abs(weights - continuous).max() < 0.02 * continuous.max()


def test_a_tracked_profile_is_reconstructed_within_float_tolerance():
    """Reconstructing a width that was tracked, at a snapshot's time, picks that snapshot alone."""
    ema, snaps, states = toy_run((0.05, 0.10), steps=400, every=50)
    patched = [s for s in snaps]
    coefficients = solve_coefficients([s.updates for s in patched], [s.sigma_rel for s in patched], 400, [0.05, 0.10])
    own = [i for i, s in enumerate(patched) if s.step == 400]
    for j, i in enumerate(own):
        assert coefficients[i, j] == pytest.approx(1.0, abs=1e-9)
        assert np.abs(np.delete(coefficients[:, j], i)).max() < 1e-9
    mixed = sum(coefficients[i, 0] * states[(s.step, s.sigma_rel)]["weight"].double() for i, s in enumerate(patched))
    assert torch.allclose(mixed.float(), ema.profiles[0].model.weight, atol=1e-6)


def test_an_untracked_width_is_close_to_tracking_it_directly():
    """The point of post-hoc EMA: 0.075, never tracked, reconstructed from the 0.05 and 0.10 snapshots, against a
    profile of 0.075 tracked alongside: the error is a small part of how much 0.05 and 0.10 differ."""
    ema, snaps, states = toy_run((0.05, 0.10, 0.075), steps=2000, every=100, seed=1)
    inputs = [s for s in snaps if s.sigma_rel != 0.075]
    x = solve_coefficients([s.updates for s in inputs], [s.sigma_rel for s in inputs], 2000, [0.075])[:, 0]
    approx = sum(x[i] * states[(s.step, s.sigma_rel)]["weight"].double() for i, s in enumerate(inputs)).float()
    tracked = ema.profiles[2].model.weight
    spread = (ema.profiles[0].model.weight - ema.profiles[1].model.weight).norm()
    assert (approx - tracked).norm() < 0.1 * spread, ((approx - tracked).norm(), spread)


PHEMA = ["training.phema_sigma_rels=[0.05,0.1]", "training.phema_snapshot_every=2"]


@pytest.fixture(scope="module")
def phema_run(tmp_path_factory):
    """A smoke run with two profiles (snapshots at steps 2, 4, 6; checkpoints at 3 and 6), shared."""
    run = tmp_path_factory.mktemp("phema") / "run"
    train.run(smoke_config(*PHEMA), run)
    return run


@needs_fmnist
def test_training_with_profiles_resumes_exactly_and_the_cli_exports_any_width(phema_run, tmp_path, capsys):
    """A smoke run with two profiles: snapshots at steps 2, 4, 6; a run resumed from the step-3 checkpoint writes the
    same last snapshot, bit for bit; python -m dit.phema exports widths that load, the tracked one equal to its
    profile, and records what they are."""
    full = phema_run
    assert [s.step for s in find_snapshots(full)] == [2, 2, 4, 4, 6, 6]
    resumed = tmp_path / "resumed"
    train.run(smoke_config(*PHEMA, "training.total_steps=3"), resumed)
    shutil.rmtree(resumed / "model")
    (resumed / "finished.json").unlink()
    train.run(smoke_config(*PHEMA), resumed)  # resume=auto from step 3
    a = load_safetensors(full / "phema" / "step_0000006.safetensors")
    b = load_safetensors(resumed / "phema" / "step_0000006.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    capsys.readouterr()
    phema_main([str(full), "--sigma-rel", "0.05", "0.08", "-o", str(tmp_path / "exports")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"out={tmp_path / 'exports' / 'phema-step_0000006-sigma_rel_0.050'}")
    model, meta = load_model(tmp_path / "exports" / "phema-step_0000006-sigma_rel_0.050")
    tracked = {k[len("sigma_rel=0.0500/") :]: v for k, v in a.items() if k.startswith("sigma_rel=0.0500/")}
    for k, v in model.state_dict().items():
        assert torch.allclose(v, tracked[k], atol=1e-6), k
    config = json.loads((tmp_path / "exports" / "phema-step_0000006-sigma_rel_0.080" / "config.json").read_text())
    assert config["ema"] == {"kind": "power", "sigma_rel": 0.08, "step": 6, "snapshots": 3}
    weights, _, used = reconstruct(find_snapshots(full), [0.05], step=4)
    assert max(s.step for s in used) == 4


def test_cli_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="^error: no post-hoc EMA snapshots"):
        phema_main([str(tmp_path), "--sigma-rel", "0.05"])


def test_profiles_survive_a_checkpoint_and_bad_settings_are_named():
    net = torch.nn.Linear(4, 4)
    ema = EMA(net, 0.9, power=(0.05,))
    assert isinstance(ema.profiles[0], PowerProfile)
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    state = ema.power_state()
    other = EMA(torch.nn.Linear(4, 4), 0.9, power=(0.05,))
    other.load_power_state(state, 1)
    assert torch.equal(other.profiles[0].model.weight, ema.profiles[0].model.weight)
    with pytest.raises(ValueError, match=r"training.phema_sigma_rels=\[0.05\] and training.phema_snapshot_every=0"):
        from dit.training.config import TrainConfig, check_settings

        check_settings(TrainConfig(phema_sigma_rels=(0.05,)), 1)


@needs_fmnist
def test_posthoc_measures_widths_and_guides_and_resumes(phema_run, tmp_path, capsys, fmnist_test_stats):
    """dit.analysis.posthoc on a smoke run trained with profiles: a post-hoc width with autoguidance by the run's own
    step-3 checkpoint and the fixed EMA with CFG, each recorded with what measured it; a re-run measures nothing new;
    the report lists both arms."""
    from dit.analysis.posthoc import main as posthoc_main

    plan = tmp_path / "plan.yaml"
    plan.write_text(
        f"runs: {{0: run}}\nguides: {{'@3': '@3'}}\nmetric: fashion_mnist\nref: {fmnist_test_stats}\n"
        "samples: 20\nsteps: 2\n"
        "stages:\n  report:\n    seeds: [0]\n    sample_seeds: [7]\n"
        "    arms: [[0.05, 'auto:@3', 2.0], [fixed, cfg, 2.0]]\n"
    )
    results = tmp_path / "results.jsonl"
    grids = tmp_path / "grids"
    args = ["measure", str(phema_run.parent), str(plan), "--stage", "report", "-o", str(results), "--grids", str(grids)]
    posthoc_main(args)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["ema"], r["guidance"], r["model_calls"], r["fid_n"]) for r in rows] == [
        ("0.05", "auto:@3", 4, 20),
        ("fixed", "cfg", 4, 20),
    ]
    assert all(np.isfinite(r["fid"]) and r["extractor"].startswith("fashion-mnist-cnn") for r in rows)
    posthoc_main(args)
    assert len(results.read_text().splitlines()) == 2  # nothing measured twice
    (tmp_path / "doc").mkdir()
    posthoc_main(["report", str(results), str(plan), "-o", str(tmp_path / "doc/report.md"), "--grids", str(grids)])
    text = (tmp_path / "doc/report.md").read_text()
    assert "| sigma_rel 0.050, auto:@3 2 |" in text and "| fixed EMA, cfg 2 |" in text
    # the sample grids side by side: the first 4 of each class, one column a class (2 px white between images)
    pngs = sorted(grids.glob("*.png"))
    assert [p.name for p in pngs] == [
        "report_seed0_sample7_fixed-EMA_cfg-2.png",
        "report_seed0_sample7_sigma_rel-0.050_auto@3-2.png",
    ]
    width, height = Image.open(pngs[0]).size
    assert (width - 2) / 10 == (height - 2) / 2 > 2  # 20 samples: 2 rows of the 10 classes
    for png in pngs:
        assert f"](../grids/{png.name})" in text
    assert (
        "![FID against the EMA width, report](report_report.png)" in text
        and (tmp_path / "doc/report_report.png").exists()
    )


def test_the_report_pairs_seeds_and_corrects_for_several_comparisons(tmp_path):
    """Comparisons are paired over training seeds (a seed's FID: the mean over its sample seeds) and Holm-corrected
    over the stage's comparisons; scipy's paired t-test is the reference."""
    from scipy import stats

    from dit.analysis.posthoc import report

    fids = {"fixed": [30.0, 32.0, 31.0], "0.1": [27.0, 30.5, 28.0], "0.2": [31.0, 31.5, 32.5]}
    rows = [
        dict(seed=s, ema=ema, guidance="cfg", scale=2.0, sample_seed=k, fid=v[s] + k / 10, fid_n=1000, stage="report",
             extractor="x", sampler="euler", steps=25)
        for ema, v in fids.items() for s in range(3) for k in (0, 1)
    ]  # fmt: skip
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = {
        "comparisons": [["sigma_rel 0.100, cfg 2", "fixed EMA, cfg 2"], ["sigma_rel 0.200, cfg 2", "fixed EMA, cfg 2"]]
    }
    text = report(tmp_path / "r.jsonl", plan)
    p1 = stats.ttest_rel(fids["0.1"], fids["fixed"]).pvalue
    p2 = stats.ttest_rel(fids["0.2"], fids["fixed"]).pvalue
    holm1 = min(1.0, 2 * min(p1, p2)) if p1 < p2 else max(min(1.0, 2 * p2), p1)
    assert (
        f"| sigma_rel 0.100, cfg 2 | fixed EMA, cfg 2 | 3 | {np.mean(np.subtract(fids['0.1'], fids['fixed'])):+.2f}"
        in text
    )
    assert f"| {p1:.3f} | {holm1:.3f} |" in text
    # A / B paired: each seed's ratio of its means over the sample seeds (+0.05 both)
    assert f"| {np.mean([(a + 0.05) / (b + 0.05) for a, b in zip(fids['0.1'], fids['fixed'])]):.3f} ±" in text
    assert "| fixed EMA, cfg 2 | 31.05 ±" in text  # the mean over seeds of each seed's mean over sample seeds


@needs_fmnist
def test_posthoc_evaluates_named_runs_with_named_samplers(phema_run, tmp_path, fmnist_test_stats):
    """Plans of several kinds of run (runs by name, {seed} in the directory) and arms with their own sampler and steps
    (issue 48's study): model calls an image as the sampler counts them (Heun 2 a step, x2 with guidance), --run keeps
    to one run, the report labels arms by run and sampling and draws FID against the calls; the keys of plans without
    them are unchanged (issue 46's results stay measured)."""
    from dit.analysis.posthoc import Arm
    from dit.analysis.posthoc import main as posthoc_main
    from dit.diffusion import SamplingSettings, build_objective, build_sampler

    assert Arm(0, "fixed", "cfg", 2.0, 0).key() == json.dumps(
        {"seed": 0, "ema": "fixed", "guidance": "cfg", "scale": 2.0, "sample_seed": 0}, sort_keys=True
    )
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        f"runs: {{flow: 'r{{seed}}', other: 'missing{{seed}}'}}\nmetric: fashion_mnist\nref: {fmnist_test_stats}\n"
        "samples: 20\nsteps: 25\n"
        "stages:\n  report:\n    seeds: [0]\n    sample_seeds: [7]\n"
        "    arms: [[fixed, none, 1, flow, 'ddim:2'], [fixed, cfg, 2, flow, 'dpmpp:3'],\n"
        "           [fixed, none, 1, other, 'euler:1']]\n"
        "comparisons: [['flow, dpmpp:3, cfg 2', 'flow, ddim:2, none']]\n"
    )
    (tmp_path / "r0").symlink_to(phema_run)
    results = tmp_path / "results.jsonl"
    posthoc_main(["measure", str(tmp_path), str(plan), "--stage", "report", "-o", str(results), "--run", "flow"])
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["run"], r["sampling"], r["sampler"], r["steps"], r["model_calls"]) for r in rows] == [
        ("flow", "ddim:2", "ddim", 2, 2),
        ("flow", "dpmpp:3", "dpmpp", 3, 6),
    ]
    heun = build_sampler(build_objective("flow"), SamplingSettings(sampler="heun", steps=3, cfg_scale=2.0), "eval")
    assert heun.model_calls == 12  # 2 calls a step, x2 guided
    from dit.analysis.posthoc import sampling_settings

    imf = sampling_settings(Arm(0, "fixed", "input", 3.0, 0, "imf", "meanflow:1"), {"steps": 25}, "input")
    assert (imf.guidance, imf.cfg_scale, imf.steps) == ("input", 3.0, 1)  # the scale as a model's input: one call
    assert build_sampler(build_objective("meanflow", guidance_input=True), imf, "eval").model_calls == 1
    with pytest.raises(SystemExit, match=r"^error: .*missing0"):  # the other run is not there: one line
        posthoc_main(["measure", str(tmp_path), str(plan), "--stage", "report", "-o", str(results)])
    (tmp_path / "doc").mkdir()
    posthoc_main(["report", str(results), str(plan), "-o", str(tmp_path / "doc/report.md")])
    text = (tmp_path / "doc/report.md").read_text()
    assert "| flow, ddim:2, none |" in text and "| 1 | 6 |" in text  # one seed, 6 calls (3 steps with CFG)
    assert "| flow, dpmpp:3, cfg 2 | flow, ddim:2, none |" not in text  # one seed: no paired test
    assert "![FID against the model calls an image, report](report_report.png)" in text
    assert (tmp_path / "doc/report_report.png").exists()
    plan.write_text(plan.read_text().replace("'euler:1'", "'euler'"))
    with pytest.raises(SystemExit, match=r"^error: sampling 'euler': <sampler>:<steps>"):
        posthoc_main(["measure", str(tmp_path), str(plan), "--stage", "report", "-o", str(results)])


def test_the_report_draws_fid_against_calls_where_arms_differ_in_calls_else_against_the_width(tmp_path):
    """A stage of one sampler at several post-hoc widths (issue 48's EMA selection for MeanFlow at 1 call) gets the
    width figure with a line for the run and its sampling; a stage whose arms differ in calls gets the calls figure
    even when a post-hoc width is among them."""
    from dit.analysis.posthoc import report

    def rows(stage, specs):
        return [
            dict(seed=s, ema=ema, guidance="none", scale=1.0, sample_seed=1, fid=30 + s + calls, fid_n=1000,
                 stage=stage, extractor="x", sampler="meanflow", steps=calls, model_calls=calls, run="mf",
                 sampling=f"meanflow:{calls}")
            for ema, calls in specs for s in range(3)
        ]  # fmt: skip

    widths = rows("select", [("fixed", 1), ("0.05", 1), ("0.15", 1)])
    calls = rows("report", [("fixed", 1), ("0.15", 1), ("0.15", 2)])
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in widths + calls))
    (tmp_path / "doc").mkdir()
    text = report(tmp_path / "r.jsonl", {}, figures=tmp_path / "doc/report.md")
    assert "![FID against the EMA width, select](report_select.png)" in text
    assert "![FID against the model calls an image, report](report_report.png)" in text
    assert "| mf, meanflow:1, none, sigma_rel 0.150 | 32.00 ±" in text  # 30 + seed + calls, over seeds 0-2
    assert (tmp_path / "doc/report_select.png").exists() and (tmp_path / "doc/report_report.png").exists()
