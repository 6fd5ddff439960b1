"""Time to FID: how much sooner, in training FLOPs and in training time, each arm of a study reaches the baseline
arm's final FID (the speedrun's question). dit.analysis.report adds this section to a report when the runs logged their
cost (``train_flops``, ``train_s``: dit/training/loop.py).

The target is the baseline's FID at the end of its curve, on the curve's sample count (FID falls as the count grows,
so a final FID on more samples, training.fid_final_samples, is no target for a curve on fewer; with the speedrun's
1,000 samples throughout the two are one). For one run, the cost of reaching it is read off its FID curve: the first
evaluation at or below the target, linearly interpolated (in steps) from the evaluation before it, and the cost at
that step interpolated from the logged records. A run that never reaches it within its budget counts as "not
reached". Over the seeds of an arm: the mean cost with its Student-t interval, and for each cost the speed-up over
the baseline as the ratio of geometric means, with a 95% interval and a Welch test on log cost (Holm-corrected over
the arms); arms where a seed did not reach the target get no speed-up (it would be a lower bound). Then each arm's
final FID against the baseline's (Welch, Holm over these arms: the family of "does it beat the baseline?") and one
row per run: its FID curve and the costs of its whole budget.
"""

from __future__ import annotations

import math
import statistics

import numpy as np

from dit.analysis.runs import curve
from dit.analysis.significance import ALPHA, fmt, fmt_ci, holm, welch
from dit.eval.metrics import SAMPLE_COUNT
from dit.training.logging import fid_curve

__all__ = ["COSTS", "cost_at", "cost_section", "reach"]

# logged key -> (axis label, scale, unit)
COSTS = {"train_flops": ("training FLOPs", 1e15, "PFLOP"), "train_s": ("training time", 60.0, "min")}


def cost_at(run: dict, key: str, step: float) -> float | None:
    """The logged cost ``key`` of a run at a (fractional) step, linear between its records; 0 at step 0."""
    points = sorted((r["step"], r[key]) for r in run["records"] if key in r)
    if not points:
        return None
    steps, costs = zip(*[(0, 0.0), *points])
    return float(np.interp(step, steps, costs))


def reach(run: dict, target: float, key: str) -> float | None:
    """The cost at which the run's FID curve first reaches ``target`` (None: not within its budget)."""
    previous = None
    for step, fid in sorted(curve(run, "fid").items()):
        if fid <= target:
            if previous is None:
                return cost_at(run, key, step)
            s0, f0 = previous
            return cost_at(run, key, s0 + (f0 - target) / (f0 - fid) * (step - s0))
        previous = (step, fid)
    return None


def budget(run: dict, key: str) -> float | None:
    """The cost of a run's whole FID curve (the baseline reaches its own mean final FID there, by definition)."""
    c = curve(run, "fid")
    return cost_at(run, key, max(c)) if c else None


def _speedup(base: list[float], arm: list[float]) -> tuple[float, float, float, float]:
    """exp(mean log base - mean log arm), its 95% interval, and Welch's p on the log costs."""
    lb, la = [math.log(c) for c in base], [math.log(c) for c in arm]
    if len(lb) < 2 or len(la) < 2:
        d = statistics.fmean(lb) - statistics.fmean(la)
        return math.exp(d), math.nan, math.nan, math.nan
    w = welch(lb, la)
    return math.exp(w["diff"]), math.exp(w["diff"] - w["ci"]), math.exp(w["diff"] + w["ci"]), w["p"]


def target_of(study: dict, baseline: str) -> tuple[float, str] | None:
    """The baseline's mean FID at the end of its curve, and the curves' sample count in words (" on 1000 samples");
    None when the baseline logged no FID curve."""
    runs = study["ok_arms"][baseline]
    curves = [c for c in (curve(run, "fid") for run in runs) if c]
    if not curves:
        return None
    evals = [r for run in runs for r in fid_curve([r for r in run["records"] if "fid" in r])]
    counts = sorted({r[SAMPLE_COUNT] for r in evals if SAMPLE_COUNT in r})
    on = f" on {'/'.join(map(str, counts))} samples" if counts else ""
    return statistics.fmean(c[max(c)] for c in curves), on


def cost_rows(arms: dict[str, list[dict]], baseline: str, target: float) -> tuple[list[tuple], dict[str, dict]]:
    """Per arm: (arm, its cost cells, its speed-up cells); and per cost, the Holm-adjusted p of each arm's speed-up."""
    bases = {key: [c for c in (budget(r, key) for r in arms[baseline]) if c is not None] for key in COSTS}
    rows, tests = [], {key: [] for key in COSTS}
    for arm, runs in arms.items():
        costs = {
            key: [budget(run, key) if arm == baseline else reach(run, target, key) for run in runs] for key in COSTS
        }
        cells, speedups = [], {}
        for key, (_, scale, unit) in COSTS.items():
            reached = [c / scale for c in costs[key] if c is not None]
            cells.append(f"{fmt_ci(reached, '.3g')} {unit} ({len(reached)}/{len(runs)})" if reached else "not reached")
            if arm == baseline:
                speedups[key] = "1x (baseline: its whole budget)"
            elif reached and len(reached) == len(runs) and bases[key]:
                s, lo, hi, p = _speedup(bases[key], costs[key])
                tests[key].append((arm, p))
                speedups[key] = f"{s:.2f}x" + ("" if math.isnan(lo) else f" [{lo:.2f}, {hi:.2f}]")
            else:
                speedups[key] = "-"
        rows.append((arm, cells, speedups))
    adjusted = {
        key: dict(zip([a for a, _ in t], holm([p if not math.isnan(p) else 1.0 for _, p in t])[0]))
        for key, t in tests.items()
    }
    return rows, adjusted


def cost_section(study: dict, baseline: str = "baseline") -> list[str]:
    """Markdown: the time-to-FID table against the arm labelled ``baseline``; [] when the runs logged no cost."""
    arms = study["ok_arms"]
    if not any("train_flops" in r for runs in arms.values() for run in runs for r in run["records"]):
        return []
    if baseline not in arms:
        return ["## Time to FID", "", f"No finished arm is labelled `{baseline}`: nothing to measure against.", ""]
    found = target_of(study, baseline)
    if found is None:
        return ["## Time to FID", "", f"The baseline `{baseline}` logged no FID curve: nothing to measure against.", ""]
    target, on = found
    rows, adjusted = cost_rows(arms, baseline, target)
    lines = [
        "## Time to FID",
        "",
        f"Target: the baseline's FID at the end of its curve{on}, **{target:.1f}** (mean over its seeds; the curves' "
        "sample count, which a final FID on more samples does not share). Cost of reaching it: mean ± 95% "
        "interval over the seeds that reached it (reached / seeds); the baseline's is its whole budget (it reaches "
        "its own mean final FID at its end, by definition). Speed-up over the baseline, in FLOPs and in training "
        "time: ratio of geometric means [95% interval]; p: Welch's test on the log cost, Holm-corrected over the "
        "arms (for each cost).",
        "",
        f"| {study['header']} | FLOPs to target | training time to target | speed-up (FLOPs) | p (Holm) "
        "| speed-up (time) | p (Holm) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, cells, speedups in rows:
        tail = []
        for key in COSTS:
            p = adjusted[key].get(arm)
            tail += [speedups[key], "-" if p is None else f"{p:.3f}"]
        lines.append(f"| {arm} | " + " | ".join(cells + tail) + " |")
    return [*lines, "", *against_baseline(study, baseline), *runs_table(study, baseline, on)]


def against_baseline(study: dict, baseline: str) -> list[str]:
    """Markdown: each arm's final FID against the baseline's, Welch's test, Holm-corrected over these arms only (the
    family of the question "does it beat the baseline?", smaller than the report's all-pairs family)."""
    finals = {a: [s["fid"] for s in ss if s["fid"] is not None] for a, ss in study["summaries"].items()}
    tested = [a for a in study["ok_arms"] if a != baseline and len(finals.get(a, [])) >= 2]
    if len(finals.get(baseline, [])) < 2 or not tested:
        return []
    tests = {a: welch(finals[a], finals[baseline]) for a in tested}
    adjusted, reject = holm([1.0 if math.isnan(t["p"]) else t["p"] for t in tests.values()])
    lines = [
        f"**Final FID against the baseline**: Welch's test per arm (seeds as replicates), Holm's correction over the "
        f"{len(tested)} arms with two or more seeds, familywise level {ALPHA:.0%}; the intervals are unadjusted.",
        "",
        f"| {study['header']} | difference to baseline (95% CI) | p (Welch) | p (Holm) | significant |",
        "|---|---|---:|---:|---|",
    ]
    for (arm, t), adj, rej in zip(tests.items(), adjusted, reject, strict=True):
        lines.append(
            f"| {arm} | {t['diff']:+.1f} ({t['diff'] - t['ci']:+.1f} to {t['diff'] + t['ci']:+.1f}) | {t['p']:.3g} | "
            f"{adj:.3g} | {'**yes**' if rej else 'no'} |"
        )
    return [*lines, ""]


def runs_table(study: dict, baseline: str, on: str) -> list[str]:
    """Markdown: one row per finished run, its FID at every evaluation and the costs of its whole curve; its FLOPs
    per step as a multiple of the baseline's mean."""
    arms = study["ok_arms"]
    per_step = [f / max(curve(r, "fid")) for r in arms[baseline] if (f := budget(r, "train_flops"))]
    base_per_step = statistics.fmean(per_step) if per_step else None
    steps = sorted({s for runs in arms.values() for run in runs for s in curve(run, "fid")})
    lines = [
        f"**Per run**: FID{on} at steps {' / '.join(f'{s:,}' for s in steps)}, and the costs of the whole curve.",
        "",
        f"| {study['header']} | seed | FID curve | "
        + " | ".join(f"{label} ({unit})" for label, _, unit in COSTS.values())
        + " | FLOPs per step vs baseline |",
        "|---|---:|---|" + "---:|" * (len(COSTS) + 1),
    ]
    for arm, runs in arms.items():
        for run in sorted(runs, key=lambda r: r["summary"]["seed"]):
            c = curve(run, "fid")
            costs = {key: budget(run, key) for key in COSTS}
            flops = costs["train_flops"]
            ratio = flops / max(c) / base_per_step if c and flops and base_per_step else None
            cells = [
                " / ".join(f"{c[s]:.1f}" if s in c else "-" for s in steps),
                *(fmt(v if v is None else v / COSTS[key][1], "#.3g") for key, v in costs.items()),  # 26.0, not 26
                fmt(ratio, ".2f"),
            ]
            lines.append(f"| {arm} | {run['summary']['seed']} | " + " | ".join(cells) + " |")
    return [*lines, ""]
