"""Time to FID (dit/analysis/time_to_fid.py): the crossing read off a run's FID curve and cost records, checked by
hand; the report's section against a baseline; and the speedrun study's configs compose with their arms."""

import math

import pytest
import yaml
from conftest import ROOT, compose_config

from dit.analysis.time_to_fid import cost_at, cost_section, reach


def run(fids, per_step=10.0, seconds_per_step=0.5, seed=0):
    """Evaluations at steps 100, 200, ... with these FIDs; cost records every 50 steps."""
    records = [
        {"step": s, "loss": 1.0, "train_flops": s * per_step, "train_s": s * seconds_per_step}
        for s in range(50, 100 * len(fids) + 1, 50)
    ]
    records += [{"step": 100 * (i + 1), "fid": f, "fid_n": 1000} for i, f in enumerate(fids)]
    summary = {"fid": fids[-1], "seed": seed}
    return {"records": records, "summary": summary}


def test_the_crossing_is_interpolated_between_the_evaluations():
    r = run([80.0, 40.0, 20.0])
    # 30 lies between 40 (step 200) and 20 (step 300): half-way, step 250 -> 2,500 FLOPs, 125 s
    assert reach(r, 30.0, "train_flops") == pytest.approx(2500.0)
    assert reach(r, 30.0, "train_s") == pytest.approx(125.0)
    assert reach(r, 90.0, "train_flops") == pytest.approx(1000.0)  # the first evaluation is already below
    assert reach(r, 10.0, "train_flops") is None  # not within the budget
    assert cost_at(r, "train_flops", 75) == pytest.approx(750.0)


def test_section_against_the_baseline():
    base = [run([80, 50, 30.0 + s], seed=s) for s in range(3)]
    fast = [run([40, 30 - s, 25], seconds_per_step=0.25, seed=s) for s in range(3)]  # ~31 between steps 100-200
    slow = [run([90, 80, 60], seed=s) for s in range(3)]  # never
    arms = {"baseline": base, "fast": fast, "slow": slow}
    study = {
        "ok_arms": arms,
        "summaries": {a: [r["summary"] for r in runs] for a, runs in arms.items()},
        "header": "arm",
    }
    text = "\n".join(cost_section(study))
    target = 31.0  # the baseline's mean final FID
    assert f"**{target:.1f}**" in text
    row = next(line for line in text.splitlines() if line.startswith("| fast |"))
    # by hand: seed s crosses 31 between FID 40 (step 100) and 30 - s (step 200)
    flops = [10.0 * (100 + (40 - target) / (40 - (30 - s)) * 100) for s in range(3)]
    assert "(3/3)" in row
    assert math.isclose(flops[0], 1900.0)  # step 190
    mean = sum(flops) / 3
    assert f"{mean:.3g}" in row.replace(" PFLOP", "") or f"{mean / 1e15:.3g}" in row
    assert "| slow | not reached" in text
    assert "x [" in row  # a speed-up with its interval
    # the baseline's cost: its whole budget, 3,000 FLOPs for each seed (whether its own curve crosses 31 or not)
    assert "| baseline | 3e-12 ± 0 PFLOP (3/3) | 2.5 ± 0 min (3/3) | 1x (baseline: its whole budget) |" in text
    speedup = 3000 / math.exp(sum(math.log(f) for f in flops) / 3)  # ratio of geometric means
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3].startswith(f"{speedup:.2f}x [")
    # in time: its steps take half the baseline's seconds (0.25 s against 0.5 s), so twice the speed-up in FLOPs
    assert cells[5].startswith(f"{2 * speedup:.2f}x [")
    assert float(cells[4]) < 0.05 and float(cells[6]) < 0.05  # three seeds each, far apart: significant
    # the final FID against the baseline, Holm over the two arms only: fast (25 vs 30, 31, 32) and slow (60)
    assert "Holm's correction over the 2 arms" in text
    fast_row = next(line for line in text.splitlines() if line.startswith("| fast | -6.0 ("))
    assert fast_row.endswith("| **yes** |")
    # one row per run: its curve, and the costs of its 300 steps (fast: the baseline's FLOPs per step, half its time)
    assert "FID on 1000 samples at steps 100 / 200 / 300" in text
    assert "| fast | 1 | 40.0 / 29.0 / 25.0 | 3.00e-12 | 1.25 | 1.00 |" in text  # 300 x 0.25 s = 1.25 min
    assert "| baseline | 2 | 80.0 / 50.0 / 32.0 | 3.00e-12 | 2.50 | 1.00 |" in text
    assert cost_section({**study, "ok_arms": {"baseline": [{"records": [{"step": 1, "loss": 1.0}]}]}}) == []


def test_the_target_is_on_the_curves_sample_count_not_the_final_evaluations():
    """A curve on 250 samples and a final FID on 1,000 (lower: FID falls with the count): the target is the
    baseline's last curve point, which its own curve reaches, not the 1,000-sample figure no curve point can."""
    base = [run([80, 50, 30.0 + s], seed=s) for s in range(2)]
    for r in base:
        for rec in r["records"]:
            if "fid" in rec:
                rec["fid_n"] = 250
        r["records"].append({"step": 300, "fid": r["summary"]["fid"] - 8, "fid_n": 1000})
        r["summary"]["fid"] -= 8  # what the report's table shows: the final evaluation on 1,000
    study = {"ok_arms": {"baseline": base}, "summaries": {"baseline": [r["summary"] for r in base]}, "header": "arm"}
    text = "\n".join(cost_section(study))
    assert "on 250 samples, **30.5**" in text


ARMS = sorted(p.stem for p in (ROOT / "configs" / "speedrun").glob("*.yaml"))


@pytest.mark.parametrize("arm", ARMS)
def test_every_speedrun_arm_composes_with_the_baseline_recipe(arm):
    cfg = compose_config("train", ["experiment=speedrun", f"+speedrun={arm}"])
    base = compose_config("train", ["experiment=fashion_mnist_cpu_2024"])
    assert cfg.arm == arm
    assert cfg.training.total_steps == base.training.total_steps and cfg.optim.lr == base.optim.lr
    assert cfg.training.fid_every == 500 and cfg.training.fid_samples == 1000


def test_the_stack_arm_is_its_arms_composed():
    """The stack names its arms in its defaults list: it carries each arm's settings as that arm's file has them,
    so a change to an arm changes the stack with it, and it is its own arm in the report."""
    stack = compose_config("train", ["experiment=speedrun", "+speedrun=stack"])
    assert stack.arm == "stack"
    repa = compose_config("train", ["experiment=speedrun", "+speedrun=repa"])
    muon = compose_config("train", ["experiment=speedrun", "+speedrun=muon"])
    assert stack.training.repa == repa.training.repa and stack.training.repa.weight > 0
    assert stack.optim == muon.optim and stack.optim.name == "muon"
    assert stack.training.mixed_precision == "bf16"


def test_make_train_is_the_2024_recipe_with_the_stack():
    """make train adopted the speedrun's stack: its model, objective, optimiser and training settings are the stack
    arm's, less what only the study sets (FID every 500 steps on 1,000 samples, no sample grids, so the grids'
    sampler is make train's own) and make train's shorter budget, which the study measured: a step it evaluated,
    under a constant learning rate (so make train's steps are the study's first ones). The 2024 recipe, the
    speedrun's baseline, is still what the study measures."""
    train = compose_config("train", ["experiment=fashion_mnist_cpu"])
    stack = compose_config("train", ["experiment=speedrun", "+speedrun=stack"])
    old = compose_config("train", ["experiment=fashion_mnist_cpu_2024"])
    baseline = compose_config("train", ["experiment=speedrun", "+speedrun=baseline"])
    study_only = {"fid_every", "fid_samples", "fid_ref", "sample_every"}
    own = {"total_steps", "ckpt_every", "grid_sampling"}  # make train's budget and its grids' sampler
    for group in ("model", "data", "diffusion", "optim"):
        assert train[group] == stack[group] and old[group] == baseline[group], group

    def kept(cfg, leave):
        return {k: v for k, v in cfg.training.items() if k not in leave}

    assert kept(train, study_only | own) == kept(stack, study_only | own)
    assert kept(old, study_only) == kept(baseline, study_only)
    assert stack.training.sample_every == 0 and train.training.sample_every == train.training.total_steps
    steps = train.training.total_steps
    assert steps <= stack.training.total_steps and steps % stack.training.fid_every == 0
    assert train.optim.decay == "constant"
    assert train.training.repa.weight > 0 and train.optim.name == "muon" and train.training.mixed_precision == "bf16"
    assert old.training.repa.weight == 0 and old.optim.name == "adamw" and old.training.mixed_precision == "no"


def test_make_speedrun_sweeps_every_arm():
    """An arm file the sweep does not list would never be trained by make speedrun."""
    experiment = yaml.safe_load((ROOT / "configs" / "experiment" / "speedrun.yaml").read_text())
    assert sorted(experiment["hydra"]["sweeper"]["params"]["+speedrun"].split(",")) == ARMS
