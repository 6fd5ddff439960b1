"""A Markdown report of a Hydra multirun (e.g. the conditioning study): tables with confidence
intervals over seeds, significance tests, PNG curves with seed bands and the sample grids.

    python -m dit.report studies/ablation_conditioning -o docs/ablation.md
    python -m dit.report outputs/studies/ablation_adain_6k          # a sweep directory: its report.md

The argument is a study (studies/<name>/: its runs under runs/, its claims.yaml) or a sweep directory (the
runs directly under it).

Runs are grouped into arms by what differs between their configs apart from the seed (for the
conditioning study: ``model.block``); the seeds of an arm are its replicates. For every figure
(final FID, class consistency and its worst class, final loss, images/s) the table gives the mean
over seeds and a 95% confidence interval (Student's t with n - 1 degrees of freedom). Arms are
compared pairwise on the final FID by Welch's t-test, with Holm's correction for the number of pairs
at a familywise level of 5%; the report says which differences are significant and which are not.
Failed or unfinished runs are listed with the reason and the rest is reported.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
from pathlib import Path

import yaml

from dit.eval.metrics import metric_keys
from dit.training.logging import fid_curve, log_scale_if_positive
from dit.training.run import FAILURE_NOTE, finished_info

# What runs from before the Fashion-MNIST classifier was shipped (issue 27) were measured with: they recorded no
# extractor, and their classifier was trained on each machine (its weights are on none now).
OLD_EXTRACTOR = "fashion-mnist-cnn-v1 (earlier, locally trained; no hash)"
ALPHA = 0.05  # familywise error rate of the pairwise tests; 95% intervals

# What the papers state about the order of arms lives with the study, in <multirun>/claims.yaml: per arm key, a
# list of {better, worse, source} (the arm they find better, i.e. with the lower FID, the worse one, the source and
# its words); checked against this study's tests.
CLAIMS_FILE = "claims.yaml"


def load_claims(multirun: Path) -> dict[str, list[tuple[str, str, str]]]:
    """The study's published claims (claims.yaml next to its runs), or {} when it has none."""
    path = Path(multirun) / CLAIMS_FILE
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    return {key: [(c["better"], c["worse"], c["source"]) for c in claims] for key, claims in data.items()}


def run_config(path: Path) -> dict:
    """A run's composed config, resolved: Hydra saves it with its interpolations (model.size fills the model's
    sizes through ${dit.size:...}, the data's shape fills the model's)."""
    from omegaconf import OmegaConf

    import dit.training.config  # noqa: F401  the ${dit.*} resolvers

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def load_run(job_dir: Path) -> dict:
    """One job directory -> {name, config, records, status, finished} (status 'ok' or why not; finished: its
    finished.json record or None)."""
    config = run_config(job_dir / ".hydra" / "config.yaml")
    metrics = job_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line] if metrics.exists() else []
    total = config["training"]["total_steps"]
    last = max((r["step"] for r in records), default=0)
    note = job_dir / FAILURE_NOTE
    reason = note.read_text().strip() if note.exists() else None
    # finished: its export (weights) is there, or its finished.json (results kept without the weights)
    done = finished_info(job_dir)
    if ((job_dir / "model" / "config.json").exists() or (done and done["step"] == total)) and last >= total:
        status = "ok"
    elif reason:
        status = f"failed at step {last} of {total}: {reason}"
    elif not records:
        status = "failed: no metrics were written"
    else:
        status = f"unfinished: stopped at step {last} of {total}"
    return dict(
        name=job_dir.name, dir=job_dir, config=config, records=records, status=status, last_step=last, finished=done
    )


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True)  # lists and None compare as text
    return out


def arm_keys(runs: list[dict], by: list[str] | None = None) -> list[str]:
    """The config keys that tell the arms apart: ``by``, or those that vary between runs except the seed and where
    a run resumed from (a run continued from a checkpoint trains what a run from step 0 would)."""
    if by:
        return by
    flat = [flatten(r["config"]) for r in runs]
    keys = sorted({k for f in flat for k in f})
    varying = [k for k in keys if k not in ("seed", "resume") and len({f.get(k) for f in flat}) > 1]
    return varying or ["model.block"]


def arm_label(run: dict, keys: list[str]) -> str:
    flat = flatten(run["config"])
    values = [json.loads(flat[k]) if k in flat else None for k in keys]
    if len(keys) == 1:
        return str(values[0])
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(keys, values))


def summarize(run: dict) -> dict:
    """The figures of one finished run. The final FID is the last record with the most samples."""
    import dataclasses

    from dit.models import DiTConfig
    from dit.zoo import count_config

    cfg, recs = run["config"], run["records"]
    m = cfg["model"]
    fields = {f.name for f in dataclasses.fields(DiTConfig)} - {"fused_adaln"}
    size = count_config(DiTConfig(**{k: v for k, v in m.items() if k in fields}))  # as recorded, map inputs too
    losses = [r["loss"] for r in recs if "loss" in r]
    # the final FID: taken at the last step, on the most samples evaluated there
    evals = [r for r in recs if "fid" in r and r["step"] == cfg["training"]["total_steps"]]
    final = max(evals, key=lambda r: r.get("fid_n", 0)) if evals else {}
    speeds = [r["images_per_s"] for r in recs if "images_per_s" in r][1:]  # the first window holds start-up
    return dict(
        seed=cfg.get("seed"),
        block=m["block"],
        model=m["name"],
        params=size["params"],
        gflops=size["gflops"],
        final_loss=statistics.mean(losses[-3:]) if losses else None,
        fid=final.get("fid"),
        fid_n=final.get("fid_n"),
        # runs from before the classifier was shipped did not record it
        fid_extractor=final.get("fid_extractor", OLD_EXTRACTOR) if final else None,
        class_consistency=final.get("class_consistency"),
        class_consistency_min=final.get("class_consistency_min"),
        per_class=final.get("class_consistency_per_class"),
        map_iou=final.get("map_iou"),  # a spatial condition: how well the samples follow their maps
        images_per_s=statistics.median(speeds) if speeds else None,
    )


def mean_ci(values: list[float], level: float = 1 - ALPHA) -> tuple[float, float | None]:
    """Mean and the half-width of its Student-t confidence interval (None from a single value)."""
    from scipy import stats

    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, None
    return mean, stats.t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)


def welch(a: list[float], b: list[float], level: float = 1 - ALPHA) -> dict:
    """Welch's unequal-variance t-test of mean(a) - mean(b): difference, its CI, p (two-sided)."""
    from scipy import stats

    na, nb = len(a), len(b)
    va, vb = statistics.variance(a) / na, statistics.variance(b) / nb
    diff = statistics.fmean(a) - statistics.fmean(b)
    se = math.sqrt(va + vb)
    if se == 0:  # no spread in either arm: nothing to test against
        return dict(diff=diff, ci=math.nan, p=math.nan, df=math.nan)
    df = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))  # Welch-Satterthwaite
    t = diff / se
    return dict(diff=diff, ci=stats.t.ppf(0.5 + level / 2, df) * se, p=float(2 * stats.t.sf(abs(t), df)), df=df)


def holm(pvalues: list[float], alpha: float = ALPHA) -> tuple[list[float], list[bool]]:
    """Holm's step-down adjusted p-values and rejections, in the input order."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted, [p <= alpha for p in adjusted]


def curve(run: dict, key: str) -> dict[int, float]:
    """step -> value of one run; for a metric (FID, ...) only the records with the curve's sample count."""
    recs = [r for r in run["records"] if key in r]
    if key in metric_keys():
        recs = fid_curve(recs)
    return {r["step"]: r[key] for r in recs}


def plot_curves(arms: dict[str, list[dict]], key: str, ylabel: str, path: Path, log: bool = False) -> bool:
    """Mean over the seeds of each arm, with a band from the lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.2), dpi=120)
    drawn = False
    for label, runs in arms.items():
        curves = [c for c in (curve(r, key) for r in runs) if c]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        if not steps:
            continue
        values = [[c[s] for c in curves] for s in steps]
        mean = [statistics.fmean(v) for v in values]
        (line,) = ax.plot(
            steps, mean, marker="o" if key in metric_keys() else None, ms=3, lw=1.2, label=f"{label} (n={len(curves)})"
        )
        if len(curves) > 1:
            ax.fill_between(
                steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.18, lw=0
            )
        drawn = True
    return save_plot(fig, ax, drawn, path, "step", ylabel, ylog=log)


def save_plot(fig, ax, drawn: bool, path: Path, xlabel: str, ylabel: str, xlog=False, ylog=False) -> bool:
    """The report's figures alike: labels, log axes, grid, legend; saved only if something was drawn."""
    import matplotlib.pyplot as plt

    if drawn:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if xlog:
            ax.set_xscale("log")
        if ylog:
            log_scale_if_positive(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(path)
    plt.close(fig)
    return drawn


def final_grid(job_dir: Path) -> Path | None:
    """A run's final sample grid: samples/latest.png, or (published runs keep no copy) its last step_*.png."""
    latest = job_dir / "samples" / "latest.png"
    steps = sorted((job_dir / "samples").glob("step_*.png"))
    return latest if latest.exists() else steps[-1] if steps else None


def plot_grids(arms: dict[str, list[dict]], path: Path) -> bool:
    """The final sample grid of each arm's first seed, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    grids = []
    for label, runs in arms.items():
        for run in sorted(runs, key=lambda r: r["config"].get("seed", 0)):
            png = final_grid(run["dir"])
            if png is not None:
                grids.append((f"{label} (seed {run['config'].get('seed')})", png))
                break
    if not grids:
        return False
    cols = min(len(grids), 4)
    rows = math.ceil(len(grids) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.9 * rows), dpi=120, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, png) in zip(axes.flat, grids):
        ax.imshow(Image.open(png), cmap="gray")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def fmt_ci(values: list, spec: str, scale: float = 1.0, unit: str = "") -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    mean, half = mean_ci(values)
    return f"{format(mean, spec)}{unit}" if half is None else f"{format(mean, spec)} ± {format(half, spec)}{unit}"


def comparisons(arms: dict[str, list[dict]]) -> tuple[list[str], list[dict]]:
    """Pairwise Welch tests on the final FID (arms with >= 2 seeds), Holm-corrected: table and pairs."""
    fids = {label: [s["fid"] for s in summaries if s["fid"] is not None] for label, summaries in arms.items()}
    fids = {k: v for k, v in fids.items() if len(v) >= 2}
    pairs = []
    for a, b in itertools.combinations(sorted(fids, key=lambda k: statistics.fmean(fids[k])), 2):
        pairs.append(dict(a=a, b=b, **welch(fids[a], fids[b])))
    testable = [p for p in pairs if not math.isnan(p["p"])]
    adjusted, reject = holm([p["p"] for p in testable])
    for p in pairs:
        p["p_holm"], p["significant"] = math.nan, False
    for p, adj, rej in zip(testable, adjusted, reject):
        p["p_holm"], p["significant"] = adj, rej
    if not pairs:
        return [], []
    lines = [
        "| lower FID | higher FID | difference (unadjusted 95% CI) | p (Welch) | p (Holm) | significant |",
        "|---|---|---|---:|---:|---|",
        *[
            f"| {p['a']} | {p['b']} | {p['diff']:.1f} ({p['diff'] - p['ci']:.1f} to {p['diff'] + p['ci']:.1f}) | "
            f"{p['p']:.3g} | {p['p_holm']:.3g} | {'**yes**' if p['significant'] else 'no'} |"
            for p in pairs
        ],
    ]
    return lines, pairs


def verdict(order: list[str], pairs: list[dict]) -> list[str]:
    """Plain sentences: which arms are significantly apart, and which are not."""
    tested = {a for p in pairs for a in (p["a"], p["b"])}
    left_out = [a for a in order if a not in tested]
    note = (
        [f"Not tested (fewer than two seeds with a final FID): {', '.join(f'`{a}`' for a in left_out)}."]
        if left_out
        else []
    )
    if not pairs:
        return ["Fewer than two arms with two or more seeds: no significance test.", *note]
    untestable = [p for p in pairs if math.isnan(p["p"])]
    m = len(pairs) - len(untestable)
    sig = [p for p in pairs if p["significant"]]
    text = [
        f"Test: Welch's t-test on the final FID of each pair of arms (seeds as replicates), Holm's correction over "
        f"the {m} pairs, familywise level {ALPHA:.0%}; the differences' intervals in the table are unadjusted.",
        *note,
    ]
    if untestable:
        text.append(
            "- No spread in either arm, not tested: " + ", ".join(f"`{p['a']}` vs `{p['b']}`" for p in untestable) + "."
        )
    if not sig:
        text.append("No difference in final FID between any two arms is significant at this level.")
        return text
    for a in order:
        worse = [p["b"] for p in sig if p["a"] == a]
        if worse:
            text.append(f"- `{a}` has a significantly lower FID than " + ", ".join(f"`{b}`" for b in worse) + ".")
    tied = [f"`{p['a']}` vs `{p['b']}`" for p in pairs if not p["significant"] and not math.isnan(p["p"])]
    if tied:
        text.append(f"- Not significant ({len(tied)} of {m} pairs): " + ", ".join(tied) + ".")
    return text


def published(keys: list[str], arms: list[str], pairs: list[dict], claims: dict | None = None) -> list[str]:
    """A table: each published ordering of two arms of this study, and whether the study agrees with it
    (the papers' settings are not this study's: a significant opposite order holds here, not there)."""
    if len(keys) != 1:
        return []
    found = {frozenset((p["a"], p["b"])): p for p in pairs}
    rows = []
    for better, worse, source in (claims or {}).get(keys[0], []):
        if better not in arms or worse not in arms:
            continue  # the claim is about an arm this study does not have
        p = found.get(frozenset((better, worse)))
        if p is None:
            rows.append(f"| `{better}` < `{worse}` | {source} | - | - | not tested (an arm has fewer than two seeds) |")
            continue
        diff = p["diff"] if p["a"] == better else -p["diff"]  # FID(better) - FID(worse) here
        direction = "same" if diff < 0 else "opposite" if diff > 0 else "no"
        if math.isnan(p["p"]):
            here = "not tested (no spread in either arm)"
        elif p["significant"]:
            here = "**agrees** (significant)" if diff < 0 else "**opposite order here** (significant)"
        else:
            here = f"{direction} direction, not significant" if diff else "no difference"
        p_holm = "-" if math.isnan(p["p_holm"]) else f"{p['p_holm']:.3g}"
        rows.append(f"| `{better}` < `{worse}` | {source} | {diff:+.1f} | {p_holm} | {here} |")
    if not rows:
        return []
    return [
        "| published order (lower FID first) | source | FID difference here | p (Holm) | this study |",
        "|---|---|---:|---:|---|",
        *rows,
    ]


def class_names(run: dict) -> list[str] | None:
    """The class names the run recorded (finished.json, or data.class_names in the export's config.json), if any."""
    done = run.get("finished")
    if done and done.get("class_names"):
        return done["class_names"]
    export = run["dir"] / "model" / "config.json"
    return (json.loads(export.read_text()).get("data") or {}).get("class_names") if export.exists() else None


def per_class_table(
    order: list[str], summaries: dict[str, list[dict]], names: list[str] | None, header: str = "arm"
) -> list[str]:
    """Class consistency per class (mean over seeds), one row per arm; [] when no run logged it."""
    width = max((len(s["per_class"]) for ss in summaries.values() for s in ss if s["per_class"]), default=0)
    if not width:
        return []
    names = names if names and len(names) >= width else [str(k) for k in range(width)]
    rows = [f"| {header} | {' | '.join(names[:width])} |", "|---|" + "---:|" * width]
    for a in order:
        cells = []
        for k in range(width):
            values = [s["per_class"][k] for s in summaries[a] if s["per_class"] and k < len(s["per_class"])]
            values = [v for v in values if v is not None]
            cells.append(f"{100 * statistics.fmean(values):.0f}%" if values else "-")
        rows.append(f"| {a} | {' | '.join(cells)} |")
    return rows


def worst_classes(order: list[str], summaries: dict[str, list[dict]], names: list[str] | None) -> list[str]:
    """Each arm's lowest class share over all its seeds, against chance (1/classes), in words."""
    lines = []
    for a in order:
        worst = [
            (share, k, s["seed"])
            for s in summaries[a]
            if s["per_class"]
            for k, share in enumerate(s["per_class"])
            if share is not None
        ]
        if not worst:
            continue
        share, k, seed = min(worst)
        chance = 1 / len(next(s["per_class"] for s in summaries[a] if s["per_class"]))
        name = names[k] if names and k < len(names) else str(k)
        lines.append(f"`{a}` {share / chance:.1f}x ({100 * share:.0f}%, {name}, seed {seed})")
    if not lines:
        return []
    return ["Lowest share of any class in any seed, as a multiple of chance: " + "; ".join(lines) + "."]


def job_dirs(study: Path) -> list[Path]:
    """A study's run directories (those with a Hydra config): under <study>/runs/ when it has one (the layout of
    studies/<name>/), else directly under <study> (a sweep directory as Hydra writes it)."""
    runs = study / "runs" if (study / "runs").is_dir() else study
    jobs = sorted(p.parent.parent for p in runs.glob("*/.hydra/config.yaml"))
    if not jobs:
        raise FileNotFoundError(f"{study}: no Hydra job directories (*/.hydra/config.yaml)")
    return jobs


def collect(study: Path, by: list[str] | None = None) -> dict:
    """Every run of a study, its arm, and the summaries of the finished ones by arm, arms sorted by mean final FID."""
    runs = [load_run(j) for j in job_dirs(study)]
    keys = arm_keys(runs, by)
    for r in runs:
        r["arm"] = arm_label(r, keys)
    ok = [r for r in runs if r["status"] == "ok"]
    for r in ok:
        r["summary"] = summarize(r)
    summaries: dict[str, list[dict]] = {}
    for r in ok:
        summaries.setdefault(r["arm"], []).append(r["summary"])
    order = sorted(
        summaries,
        key=lambda a: statistics.fmean([s["fid"] for s in summaries[a] if s["fid"] is not None] or [math.inf]),
    )
    ok_arms = {a: [r for r in ok if r["arm"] == a] for a in order}  # curves and grids: finished runs only
    header = keys[0].rsplit(".", 1)[-1] if len(keys) == 1 else "arm"  # one column: the label says "k=v, k=v" itself
    return dict(runs=runs, keys=keys, ok=ok, summaries=summaries, order=order, ok_arms=ok_arms, header=header)


FIGURES = {  # key: (file suffix, title)
    "loss": ("loss", "Training loss"),
    "fid": ("fid", "FID during training"),
    "grids": ("samples", "Final EMA samples (one row per class)"),
}


def draw_figures(ok_arms: dict[str, list[dict]], out: Path) -> list[str]:
    """The curves and the sample grids next to the report (<stem>_loss.png, ...); Markdown for those drawn."""
    out.parent.mkdir(parents=True, exist_ok=True)
    png = {key: out.with_name(f"{out.stem}_{suffix}.png") for key, (suffix, _) in FIGURES.items()}
    band = "(mean over seeds, band: min-max)"
    drawn = {
        "loss": plot_curves(ok_arms, "loss", f"training loss {band}", png["loss"], log=True),
        "fid": plot_curves(ok_arms, "fid", f"FID {band}", png["fid"], log=True),
        "grids": plot_grids(ok_arms, png["grids"]),
    }
    text = []
    for key, (_, title) in FIGURES.items():
        if drawn[key]:
            text += [f"**{title}**", "", f"![{title}]({png[key].name})", ""]
    return text


def main_table(study: dict) -> list[str]:
    """One row per arm: size, final FID, class consistency and its worst class, map IoU (models with a spatial
    condition), final loss, speed (mean ± CI)."""
    iou = any(s.get("map_iou") is not None for ss in study["summaries"].values() for s in ss)
    lines = [
        f"| {study['header']} | seeds | params (M) | GFLOPs | final FID | class consistency | worst class | "
        + ("map IoU | " if iou else "")
        + "final loss | images/s |",
        "|---|---:|---:|---:|---|---|---|" + ("---|" if iou else "") + "---|---|",
    ]
    for a in study["order"]:
        ss = study["summaries"][a]
        lines.append(
            f"| {a} | {len(ss)} | {ss[0]['params'] / 1e6:.2f} | {fmt(ss[0]['gflops'], '.3f')} | "
            f"{fmt_ci([s['fid'] for s in ss], '.1f')} | "
            f"{fmt_ci([s['class_consistency'] for s in ss], '.1f', 100, '%')} | "
            f"{fmt_ci([s['class_consistency_min'] for s in ss], '.1f', 100, '%')} | "
            + (f"{fmt_ci([s['map_iou'] for s in ss], '.3f')} | " if iou else "")
            + f"{fmt_ci([s['final_loss'] for s in ss], '.4f')} | "
            f"{fmt_ci([s['images_per_s'] for s in ss], '.1f')} |"
        )
    return lines


def overview(path: Path, study: dict) -> list[str]:
    """What was run and measured, the main table, and warnings: mixed sample counts or extractors, missing runs."""
    runs, ok, keys = study["runs"], study["ok"], study["keys"]
    summaries = [s for ss in study["summaries"].values() for s in ss]
    fid_n = sorted({s["fid_n"] for s in summaries if s["fid_n"]})
    extractors = sorted({s["fid_extractor"] for s in summaries if s["fid_extractor"]})
    model = ok[0]["config"]["model"]["name"] if ok else "?"
    seeds = sorted({r["config"].get("seed") for r in runs}, key=str)
    text = [
        f"Runs in `{path}` ({model}; arms differ in {', '.join(f'`{k}`' for k in keys)}; "
        f"seeds {', '.join(map(str, seeds))}; "
        f"{len(ok)} of {len(runs)} runs finished).",
        "",
        "Mean ± 95% confidence interval over seeds (Student's t); "
        f"final FID on {'/'.join(map(str, fid_n)) or '?'} samples. "
        "Class consistency: share of class-k samples the domain classifier calls k (chance: 1/classes); worst class: "
        "the lowest share over the classes. Sorted by mean final FID.",
        f"Measured with: {', '.join(f'`{e}`' for e in extractors) or '?'}.",
        "",
        *main_table(study),
        "",
    ]
    if len(fid_n) > 1:
        text += [
            f"**Warning:** the final FIDs use different sample counts ({', '.join(map(str, fid_n))}): not comparable.",
            "",
        ]
    if len(extractors) > 1:
        text += [
            f"**Warning:** the final FIDs use different feature extractors ({', '.join(extractors)}): not comparable.",
            "",
        ]
    no_fid = [f"`{r['name']}`" for r in ok if r["summary"]["fid"] is None]
    if no_fid:
        text += [f"Finished without a FID at the last step: {', '.join(no_fid)}.", ""]
    bad = [r for r in runs if r["status"] != "ok"]
    if bad:
        text += ["Not reported:", *[f"- `{r['name']}`: {r['status']}" for r in bad], ""]
    return text


def per_class_section(study: dict) -> list[str]:
    order, summaries = study["order"], study["summaries"]
    names = class_names(study["ok"][0]) if study["ok"] else None
    table = per_class_table(order, summaries, names, study["header"])
    if not table:
        return []
    return [
        "**Class consistency per class** (mean over seeds; the share of class-k samples of the final evaluation "
        "that the classifier calls k; chance: 1/classes)",
        "",
        *table,
        "",
        *worst_classes(order, summaries, names),
        "",
    ]


def significance_section(study: dict, claims: dict) -> list[str]:
    """The pairwise tests in words and as a table, then the published claims checked against them."""
    test_lines, pairs = comparisons(study["summaries"])
    text = ["**Which differences are significant**", "", *verdict(study["order"], pairs), ""]
    if test_lines:
        text += [*test_lines, ""]
    checked = published(study["keys"], study["order"], pairs, claims)
    if checked:
        text += [
            "**Against the published order** (each claim tested as the pairs above: Welch, Holm-corrected; "
            "'agrees' needs a significant difference in the claimed direction)",
            "",
            *checked,
            "",
        ]
    return text


def write_report(multirun: Path, out: Path, by: list[str] | None = None, baseline: str = "baseline") -> str:
    """The report's Markdown for a study (or a sweep directory); its figures are written next to `out`. Runs that
    logged their cost get the time-to-FID section against the arm labelled ``baseline`` (dit.time_to_fid)."""
    from dit.time_to_fid import COSTS, cost_section, plot_cost

    study = collect(multirun, by)
    figures = draw_figures(study["ok_arms"], out)
    costs = cost_section(study, baseline)
    if costs:  # FID against counted FLOPs and measured training time
        for key, (label, _, _) in COSTS.items():
            png = out.with_name(f"{out.stem}_fid_vs_{key}.png")
            if plot_cost(study["ok_arms"], key, png):
                figures += [f"**FID against {label}**", "", f"![FID against {label}]({png.name})", ""]
    text = [*overview(multirun, study), *per_class_section(study), *significance_section(study, load_claims(multirun))]
    return "\n".join(text + map_iou_section(study) + costs + figures)


def map_iou_section(study: dict) -> list[str]:
    """Models with a spatial condition: pairwise Welch tests on the final map IoU (seeds as replicates, Holm)."""
    ious = {a: [s["map_iou"] for s in ss if s.get("map_iou") is not None] for a, ss in study["summaries"].items()}
    ious = {a: v for a, v in ious.items() if len(v) >= 2}
    if not any(s.get("map_iou") is not None for ss in study["summaries"].values() for s in ss):
        return []
    if len(ious) < 2:
        return ["**Map IoU**: fewer than two arms with two or more seeds: no significance test.", ""]
    pairs = [
        dict(a=a, b=b, **welch(ious[a], ious[b]))
        for a, b in itertools.combinations(sorted(ious, key=lambda k: -statistics.fmean(ious[k])), 2)
    ]
    testable = [p for p in pairs if not math.isnan(p["p"])]
    adjusted, reject = holm([p["p"] for p in testable])
    for p in pairs:
        p["p_holm"], p["significant"] = math.nan, False
    for p, adj, rej in zip(testable, adjusted, reject, strict=True):
        p["p_holm"], p["significant"] = adj, rej
    return [
        "**Map IoU** (how well the samples follow their maps: the IoU of each sample's own map with the one it was "
        f"given, on the final evaluation's samples; higher is better). Welch's t-test per pair, seeds as replicates, "
        f"Holm's correction over the {len(testable)} pairs, familywise level {ALPHA:.0%}.",
        "",
        "| higher IoU | lower IoU | difference (unadjusted 95% CI) | p (Welch) | p (Holm) | significant |",
        "|---|---|---|---:|---:|---|",
        *[
            f"| {p['a']} | {p['b']} | {p['diff']:.3f} ({p['diff'] - p['ci']:.3f} to {p['diff'] + p['ci']:.3f}) | "
            f"{p['p']:.3g} | {p['p_holm']:.3g} | {'**yes**' if p['significant'] else 'no'} |"
            for p in pairs
        ],
        "",
    ]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dit.report", description=__doc__.split("\n\n")[0])
    p.add_argument("multirun", type=Path, help="a study (studies/<name>, runs under runs/) or a sweep directory")
    p.add_argument("-o", "--out", type=Path, default=None, help="Markdown file (default: <multirun>/report.md)")
    p.add_argument(
        "--by", nargs="+", default=None, help="config keys that define an arm (default: what varies apart from seed)"
    )
    p.add_argument("--baseline", default="baseline", help="the arm time to FID is measured against (its label)")
    args = p.parse_args(argv)
    out = args.out or args.multirun / "report.md"
    try:
        body = write_report(args.multirun, out, args.by, args.baseline)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    if out.exists() and "<!-- report -->" in out.read_text():
        # A hand-written document around the generated part: replace only what sits between the markers.
        head, _, rest = out.read_text().partition("<!-- report -->")
        _, _, tail = rest.partition("<!-- /report -->")
        out.write_text(f"{head}<!-- report -->\n{body}\n<!-- /report -->{tail}")
    else:
        out.write_text(body + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
