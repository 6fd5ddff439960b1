"""A Markdown report of a study (e.g. the conditioning study): tables with confidence intervals over seeds,
significance tests, PNG curves with seed bands and the sample grids, and time to FID where the runs logged their cost.

    python -m dit.analysis.report studies/ablation_conditioning             # studies/<name>/report.md
    python -m dit.analysis.report outputs/studies/ablation_adain_6k          # a sweep directory: its report.md

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
import math
import statistics
from pathlib import Path

from dit.analysis.plots import cost_figures, figures
from dit.analysis.runs import class_names, collect, load_claims
from dit.analysis.significance import ALPHA, comparisons, fmt, fmt_ci, pairwise, published, verdict
from dit.analysis.time_to_fid import cost_section
from dit.atomic import atomic_file


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


def map_iou_section(study: dict) -> list[str]:
    """Models with a spatial condition: pairwise Welch tests on the final map IoU (seeds as replicates, Holm)."""
    ious = {a: [s["map_iou"] for s in ss if s.get("map_iou") is not None] for a, ss in study["summaries"].items()}
    if not any(ious.values()):
        return []
    pairs = pairwise(ious, descending=True)
    if not pairs:
        return ["**Map IoU**: fewer than two arms with two or more seeds: no significance test.", ""]
    testable = sum(1 for p in pairs if not math.isnan(p["p"]))
    return [
        "**Map IoU** (how well the samples follow their maps: the IoU of each sample's own map with the one it was "
        f"given, on the final evaluation's samples; higher is better). Welch's t-test per pair, seeds as replicates, "
        f"Holm's correction over the {testable} pairs, familywise level {ALPHA:.0%}.",
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


def write_report(multirun: Path, out: Path, by: list[str] | None = None, baseline: str = "baseline") -> str:
    """The report's Markdown for a study (or a sweep directory); its figures are written next to `out`. Runs that
    logged their cost get the time-to-FID section against the arm labelled ``baseline`` (dit.analysis.time_to_fid)
    and FID against their costs."""
    study = collect(multirun, by)
    drawn = figures(study["ok_arms"], out)
    costs = cost_section(study, baseline)
    if costs:
        drawn += cost_figures(study["ok_arms"], out)
    text = [*overview(multirun, study), *per_class_section(study), *significance_section(study, load_claims(multirun))]
    return "\n".join(text + map_iou_section(study) + costs + drawn)


def splice(out: Path, body: str) -> None:
    """Write the report to ``out``; a document there with <!-- report --> ... <!-- /report --> markers keeps its
    hand-written text around them, and only what sits between them is replaced."""
    if out.exists() and "<!-- report -->" in out.read_text():
        head, _, rest = out.read_text().partition("<!-- report -->")
        _, _, tail = rest.partition("<!-- /report -->")
        text = f"{head}<!-- report -->\n{body}\n<!-- /report -->{tail}"
    else:
        text = body + "\n"
    atomic_file(out, lambda tmp: Path(tmp).write_text(text))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dit.analysis.report", description=__doc__.split("\n\n")[0])
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
        splice(out, body)
    except OSError as e:  # FileNotFoundError, a full disk (dit.atomic.WriteFailed: the old report is kept)
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
