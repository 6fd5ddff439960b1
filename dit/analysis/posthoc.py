"""Evaluate trained runs after training (issue 46's study, docs/guidance_ema.md; issue 48's, docs/few_step.md): the FID
of a run's EMA weights (the fixed EMA it trained with, or a post-hoc width: dit.phema) sampled unguided, with
classifier-free guidance or with autoguidance by a guide (the run's own earlier checkpoint @STEP, or another run's
export), at a scale, with the run's FID sampler or a named sampler and step count.

    python -m dit.analysis.posthoc measure outputs/studies/guidance_ema studies/guidance_ema/plan.yaml \
        --stage select_ema -o studies/guidance_ema/results.jsonl
    python -m dit.analysis.posthoc report studies/guidance_ema/results.jsonl studies/guidance_ema/plan.yaml \
        -o studies/guidance_ema/report.md

The plan (YAML) names the runs (`runs: {seed: run directory}`, or several kinds of run: `runs: {name: directory with
{seed}}`), the guides (`guides: {name: path or @STEP; {seed} is the seed}`), the measurement (`samples`, `steps`; a
stage may set its own) and, per stage, the seeds, sample seeds and evaluations, each a list (ema, guidance, scale
[, run, sampling]) with ema `fixed` or a width, guidance `none`, `cfg`, `auto:<guide name>` or `input` (the scale
as the input of a model trained with one), run a name of `runs` (the only one when runs are by seed) and sampling
`<sampler>:<steps>` (default: the run's FID sampler, the plan's steps). One JSON line per evaluation is appended to
the results as it is measured, with what measured it (the extractor, the sample count, the sampler, its steps and
model calls an image); a re-run measures only what is missing.
The report: every stage's arms with their FID (mean and 95% interval over the training seeds where there are
several), FID against the EMA width or against the model calls as figures, and the plan's `comparisons` as paired
t-tests over the seeds (two runs of one seed, or one run under two settings), Holm-corrected, with the ratio A / B.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import MISSING, asdict, dataclass
from pathlib import Path

import torch
import yaml
from scipy import stats

from dit.analysis.significance import holm, mean_ci
from dit.atomic import append_line, atomic_file
from dit.diffusion import GUIDANCE, SamplingSettings, build_sampler
from dit.eval.evaluator import Evaluator
from dit.eval.extractors import ExtractorSpec
from dit.hub import load_model, objective_of
from dit.integrity import load_state_dict_checked
from dit.phema import find_snapshots, reconstruct
from dit.sampling import GenerationSpec, generate, load_guide, save_grid
from dit.training.evaluation import eval_inputs

MAIN = "main"


@dataclass(frozen=True)
class Arm:
    """One evaluation: a training seed's run, its EMA weights, the guidance and its scale, the samples' seed, the
    sampler and its steps."""

    seed: int
    ema: str  # "fixed" (the run's own EMA) or a post-hoc width such as "0.100"
    guidance: str  # none | cfg | auto:<guide name>
    scale: float
    sample_seed: int
    run: str = MAIN  # the plan's name of the run (MAIN: runs by seed)
    sampling: str = ""  # "<sampler>:<steps>"; "": the run's FID sampler with the plan's steps

    def key(self) -> str:
        """The identity of the evaluation in the results: the fields, those at their default left out (so the results
        of plans without runs by name or samplings keep their keys)."""
        fields = asdict(self)
        for name, f in self.__dataclass_fields__.items():
            if f.default is not MISSING and fields[name] == f.default:
                del fields[name]
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def of(cls, row: dict) -> Arm:
        """The evaluation a results row measured."""
        return cls(**{k: row[k] for k in cls.__dataclass_fields__ if k in row})


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def ema_weights(run: Path, ema: str):
    """The run's model with the EMA weights `ema` names (and its meta), on DEVICE."""
    model, meta = load_model(run / "model")
    if ema != "fixed":
        weights, _, used = reconstruct(find_snapshots(run), [float(ema)])
        load_state_dict_checked(model, next(iter(weights.values())), used[-1].path)
    return model.to(DEVICE).eval(), meta


GRID_ROWS = 4  # a grid: the first GRID_ROWS samples of every class, one column a class


def grid_path(grids: Path, stage: str, r: dict) -> Path:
    """Where measure(..., grids) puts an evaluation's sample grid."""
    slug = label(r).replace(", ", "_").replace(" ", "-").replace(":", "")
    return grids / f"{stage}_seed{r['seed']}_sample{r['sample_seed']}_{slug}.png"


def run_dir(plan: dict, sweep: Path, arm: Arm) -> Path:
    """The directory of the arm's run: plan["runs"] by seed, or by name with {seed} in the directory."""
    runs = plan["runs"]
    if arm.run == MAIN and arm.seed in runs:
        return sweep / runs[arm.seed]
    if arm.run not in runs:
        raise KeyError(f"run {arm.run!r} (seed {arm.seed}): not in the plan's runs {sorted(map(str, runs))}")
    return sweep / runs[arm.run].format(seed=arm.seed)


def parse_sampling(sampling: str) -> tuple[str | None, int | None]:
    """ "<sampler>:<steps>" -> (sampler, steps); "" -> (None, None): the run's FID sampler, the plan's steps."""
    name, _, steps = sampling.partition(":")
    if sampling and not (name and steps.isdigit() and int(steps) > 0):
        raise ValueError(f"sampling {sampling!r}: <sampler>:<steps>, e.g. euler:4")
    return name or None, int(steps) if steps else None


def sampling_settings(arm: Arm, plan: dict, kind: str) -> SamplingSettings:
    """The arm's sampler, steps and guidance."""
    name, steps = parse_sampling(arm.sampling)
    return SamplingSettings(
        sampler=name,
        steps=steps or plan["steps"],
        cfg_scale=1.0 if kind == "none" else arm.scale,
        guidance=kind if kind in GUIDANCE.names() else "cfg",  # none: the settings' unguided cfg_scale 1
    )


def measure(arm: Arm, plan: dict, sweep: Path, evaluator: Evaluator, grid: Path | None = None) -> dict:
    """Sample plan["samples"] images of the arm with its sampler and score them (and save the first GRID_ROWS of every
    class as a grid PNG at `grid`)."""
    run = run_dir(plan, sweep, arm)
    model, meta = ema_weights(run, arm.ema)
    kind, _, guide_name = arm.guidance.partition(":")
    guide = None
    if kind == "auto":
        spec = plan["guides"][guide_name].format(seed=arm.seed)
        guide = load_guide(spec if spec.startswith("@") else str(sweep / spec), run / "model", model, meta, DEVICE)
    settings = sampling_settings(arm, plan, kind)
    sampler = build_sampler(objective_of(meta), settings, "eval")
    inputs = eval_inputs(plan["samples"], model.num_classes, arm.sample_seed)
    tic = time.perf_counter()
    images = torch.cat([x for _, x in generate(model, sampler, GenerationSpec(**inputs), device=DEVICE, guide=guide)])
    seconds = time.perf_counter() - tic
    if grid is not None:
        grid.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images[: GRID_ROWS * model.num_classes], model.num_classes, grid)
    values = evaluator.evaluate(images, inputs["labels"])
    return asdict(arm) | {
        "fid": values["fid"],
        "class_consistency": values.get("class_consistency"),
        "fid_n": len(images),
        "sampler": sampler.name,
        "steps": settings.steps,
        "model_calls": sampler.model_calls,
        "extractor": evaluator.extractor.name,
        "sample_s": round(seconds, 1),
    }


def arms(plan: dict, stage: str) -> list[Arm]:
    """The stage's evaluations: every seed it names x (ema, guidance, scale[, run, sampling]) x its sample seeds."""
    spec = plan["stages"][stage]
    found = [
        Arm(int(seed), str(ema), str(guidance), float(scale), int(sample_seed), *map(str, rest))
        for seed in spec["seeds"]
        for ema, guidance, scale, *rest in spec["arms"]
        for sample_seed in spec["sample_seeds"]
    ]
    for arm in found:  # a bad plan fails before anything is measured
        parse_sampling(arm.sampling)
    return found


def label(r: dict) -> str:
    ema = "fixed EMA" if r["ema"] == "fixed" else f"sigma_rel {float(r['ema']):.3f}"
    guidance = r["guidance"] + ("" if r["guidance"] == "none" else f" {r['scale']:g}")
    text = f"{ema}, {guidance}"
    if r.get("sampling"):  # the sampling first; the EMA only where it is not the run's own
        text = f"{r['sampling']}, {guidance}" + ("" if r["ema"] == "fixed" else f", {ema}")
    return text if r.get("run", MAIN) == MAIN else f"{r['run']}, {text}"


def per_seed(rows: list[dict]) -> dict[str, dict[int, float]]:
    """{arm: {training seed: FID}}, a seed's FID the mean over its sample seeds."""
    found: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        found.setdefault(label(r), {}).setdefault(r["seed"], []).append(r["fid"])
    return {arm: {seed: statistics.fmean(v) for seed, v in by_seed.items()} for arm, by_seed in found.items()}


def comparisons(arms: dict[str, dict[int, float]], pairs: list, stage: str) -> list[str]:
    """The plan's comparisons [A, B] that the stage measured on two or more common seeds: FID A - B and A / B paired
    over the seeds (mean, 95% interval), the paired t-test's p and Holm's over the stage's comparisons."""
    tests = []
    for a, b in pairs:
        fa, fb = arms.get(a, {}), arms.get(b, {})
        seeds = sorted(set(fa) & set(fb))
        if len(seeds) < 2:
            continue
        mean, half = mean_ci([fa[s] - fb[s] for s in seeds])
        ratio, ratio_half = mean_ci([fa[s] / fb[s] for s in seeds])
        p = float(stats.ttest_rel([fa[s] for s in seeds], [fb[s] for s in seeds]).pvalue)
        tests.append(dict(a=a, b=b, diff=mean, ci=half, ratio=ratio, ratio_ci=ratio_half, p=p, n=len(seeds)))
    if not tests:
        return []
    adjusted, reject = holm([t["p"] for t in tests])
    lines = [
        f"### {stage}: comparisons (paired over training seeds, Holm-corrected)",
        "",
        "| A | B | seeds | FID A - B (95% interval) | A / B (95% interval) | p | p (Holm) | significant |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t, adj, rej in zip(tests, adjusted, reject):
        lines.append(
            f"| {t['a']} | {t['b']} | {t['n']} | {t['diff']:+.2f} ± {t['ci']:.2f} | {t['ratio']:.3f} ± "
            f"{t['ratio_ci']:.3f} | {t['p']:.3f} | {adj:.3f} | {'yes' if rej else 'no'} |"
        )
    return [*lines, ""]


def width_figure(rows: list[dict], path: Path) -> bool:
    """FID against the post-hoc EMA width, one line per guidance (and run and sampling where the rows name them; mean
    over seeds, the seeds' range as a band); the fixed EMA of each as a dashed level. False when the rows hold no
    post-hoc width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, dict] = {}
    for r in rows:
        kind = r["guidance"] + ("" if r["guidance"] == "none" else f" {r['scale']:g}")
        kind = kind if r.get("run", MAIN) == MAIN else f"{r['run']}, {r.get('sampling') or 'its sampler'}, {kind}"
        curves.setdefault(kind, {}).setdefault(r["ema"], {}).setdefault(r["seed"], []).append(r["fid"])
    if not any(ema != "fixed" for c in curves.values() for ema in c):
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for i, (kind, by_ema) in enumerate(sorted(curves.items())):
        seeds = {e: [statistics.fmean(v) for v in by_seed.values()] for e, by_seed in by_ema.items()}
        widths = sorted((float(e), v) for e, v in seeds.items() if e != "fixed")
        if widths:
            xs = [w for w, _ in widths]
            ax.plot(xs, [statistics.fmean(v) for _, v in widths], "o-", color=f"C{i}", label=kind)
            ax.fill_between(xs, [min(v) for _, v in widths], [max(v) for _, v in widths], color=f"C{i}", alpha=0.15)
        if "fixed" in seeds:
            ax.axhline(statistics.fmean(seeds["fixed"]), color=f"C{i}", ls="--", lw=1, label=f"{kind}, fixed EMA")
    ax.set_xlabel("post-hoc EMA width (sigma_rel)")
    ax.set_ylabel("FID")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_file(path, fig.savefig, suffix=".png")
    plt.close(fig)
    return True


def calls_figure(rows: list[dict], path: Path) -> bool:
    """FID against the model calls an image (both log scale), one line per run and sampler with its guidance (mean over
    seeds, the 95% interval as error bars). False when the rows name no sampling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, dict[int, dict[int, list[float]]]] = {}
    for r in rows:
        if r.get("sampling"):
            kind = f"{r.get('run', MAIN)}, {r['sampler']}" + ("" if r["guidance"] == "none" else f", {r['guidance']}")
            by_calls = curves.setdefault(kind, {}).setdefault(r["model_calls"], {})
            by_calls.setdefault(r["seed"], []).append(r["fid"])
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for i, (kind, by_calls) in enumerate(sorted(curves.items())):
        calls = sorted(by_calls)
        stats_ = [mean_ci([statistics.fmean(v) for v in by_calls[c].values()]) for c in calls]
        ax.errorbar(
            calls,
            [m for m, _ in stats_],
            yerr=[h or 0 for _, h in stats_],
            marker="o",
            capsize=3,
            color=f"C{i % 10}",
            ls="-" if i < 10 else "--",
            label=kind,
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("model calls an image")
    ax.set_ylabel("FID")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    atomic_file(path, fig.savefig, suffix=".png")
    plt.close(fig)
    return True


def grid_table(rows: list[dict], stage: str, grids: Path, base: Path, order: list[str] | None = None) -> list[str]:
    """A Markdown table of the stage's sample grids side by side (the lowest training seed's, one column an arm): the
    arms `order` names in that order, else every arm, best FID first."""
    seed = min(r["seed"] for r in rows)
    found = [(label(r), grid_path(grids, stage, r)) for r in sorted(rows, key=lambda r: r["fid"]) if r["seed"] == seed]
    found = [(name, png) for name, png in dict(found).items() if png.exists()]
    if order is not None:
        found = sorted((f for f in found if f[0] in order), key=lambda f: order.index(f[0]))
    if not found:
        return []
    rel = [os.path.relpath(png, base) for _, png in found]
    return [
        f"Samples of training seed {seed} (the first {GRID_ROWS} of every class, one column a class)"
        + (":" if order is not None else ", best FID first:"),
        "",
        "| " + " | ".join(name for name, _ in found) + " |",
        "|" + "---|" * len(found),
        "| " + " | ".join(f"![{name}]({r})" for (name, _), r in zip(found, rel)) + " |",
        "",
    ]


def report(results: Path, plan: dict, figures: Path | None = None, grids: Path | None = None) -> str:
    """Markdown: per stage, each arm's FID over its seeds (and FID against the EMA width as figures/<stage>.png,
    beside the report; the sample grids side by side where `grids` holds them); then the plan's comparisons,
    paired over seeds."""
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    lines = []
    for stage in dict.fromkeys(r["stage"] for r in rows):
        arms = per_seed([r for r in rows if r["stage"] == stage])
        first = next(r for r in rows if r["stage"] == stage)
        staged = [r for r in rows if r["stage"] == stage]
        png = None if figures is None else figures.parent / f"{figures.stem}_{stage}.png"
        # FID against the calls where the stage's arms differ in calls (a post-hoc width among them or not), else
        # against the EMA width where it has post-hoc widths
        several = len({r.get("model_calls") for r in staged if r.get("sampling")}) > 1
        calls = png is not None and several and calls_figure(staged, png)
        width = png is not None and not calls and width_figure(staged, png)
        samplers = sorted({f"{r['sampler']} {r['steps']} steps" for r in staged})
        model_calls = {label(r): r.get("model_calls", "") for r in staged}
        lines += [
            f"### {stage}",
            "",
            *([f"![FID against the EMA width, {stage}]({png.name})", ""] if width else []),
            *([f"![FID against the model calls an image, {stage}]({png.name})", ""] if calls else []),
            f"{first['fid_n']} samples a FID ({first['extractor']}), "
            + (f"{samplers[0]}; " if len(samplers) == 1 else "the arm's sampler and steps; ")
            + f"sample seeds {sorted({r['sample_seed'] for r in staged})}.",
            "",
            "| arm | FID (mean, 95% interval) | seeds | model calls an image |",
            "|---|---|---|---|",
        ]
        for name, by_seed in sorted(arms.items(), key=lambda kv: statistics.fmean(kv[1].values())):
            mean, half = mean_ci(list(by_seed.values()))
            lines.append(
                f"| {name} | {mean:.2f}"
                + (f" ± {half:.2f}" if half is not None else "")
                + f" | {len(by_seed)} | {model_calls[name]} |"
            )
        lines.append("")
        if grids is not None and figures is not None:
            order = plan.get("grids", {}).get(stage)
            lines += grid_table(staged, stage, grids, figures.parent, order)
    for stage in dict.fromkeys(r["stage"] for r in rows):
        lines += comparisons(per_seed([r for r in rows if r["stage"] == stage]), plan.get("comparisons", []), stage)
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dit.analysis.posthoc", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="measure a stage's evaluations that the results lack")
    m.add_argument("sweep", type=Path, help="the directory of the runs the plan names")
    m.add_argument("plan", type=Path, help="the plan (YAML)")
    m.add_argument("--stage", required=True, help="the plan's stage to measure")
    m.add_argument("-o", "--out", type=Path, required=True, help="results, one JSON line per evaluation (appended)")
    m.add_argument("--seed", type=int, default=None, help="only this training seed's runs (processes side by side)")
    m.add_argument("--run", default=None, help="only the arms of this run of the plan's runs (those trained so far)")
    m.add_argument("--grids", type=Path, default=None, help="save each evaluation's sample grid (PNG) here")
    r = sub.add_parser("report", help="the results as a Markdown report")
    r.add_argument("results", type=Path)
    r.add_argument("plan", type=Path)
    r.add_argument("-o", "--out", type=Path, required=True)
    r.add_argument("--grids", type=Path, default=None, help="where measure --grids saved the sample grids")
    args = p.parse_args(argv)
    try:
        plan = yaml.safe_load(args.plan.read_text())
        if args.command == "report":
            text = report(args.results, plan, figures=args.out, grids=args.grids)
            atomic_file(args.out, lambda tmp: Path(tmp).write_text(text))
            print(f"wrote {args.out}")
            return
        done = set()
        if args.out.exists():
            done = {Arm.of(r).key() for r in map(json.loads, args.out.open())}
        todo = [
            a
            for a in arms(plan, args.stage)
            if a.key() not in done and args.seed in (None, a.seed) and args.run in (None, a.run)
        ]
        plan |= {k: plan["stages"][args.stage][k] for k in ("samples", "steps") if k in plan["stages"][args.stage]}
        if not todo:
            print(f"{args.stage}: every evaluation is in {args.out}", file=sys.stderr)
            return
        cache = args.sweep / f"fid_ref_{plan['metric']}.npz"  # the reference's statistics, once for every stage
        evaluator = Evaluator(ExtractorSpec(plan["metric"]), plan["ref"], DEVICE, 250, cache, distributed=False)
        for i, arm in enumerate(todo):
            grid = None if args.grids is None else grid_path(args.grids, args.stage, asdict(arm))
            result = measure(arm, plan, args.sweep, evaluator, grid)
            append_line(args.out, json.dumps(result | {"stage": args.stage}))
            print(f"[{i + 1}/{len(todo)}] {json.dumps(result)}", file=sys.stderr, flush=True)
    except (ValueError, OSError, KeyError, yaml.YAMLError) as e:  # a bad plan or run, a damaged file: one line
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
