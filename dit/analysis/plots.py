"""The report's figures, written next to it as PNG: training curves (mean over the seeds of each arm, with a band
from the lowest to the highest seed), the final sample grid of each arm, and FID against training cost.

Figures are drawn on matplotlib's Figure directly, not through pyplot: no backend to select, no figure left open.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image

from dit.analysis.runs import curve
from dit.analysis.time_to_fid import COSTS, cost_at
from dit.atomic import atomic_file
from dit.eval.metrics import metric_keys
from dit.training.logging import log_scale_if_positive

FIGURES = {  # key: (file suffix, title)
    "loss": ("loss", "Training loss"),
    "fid": ("fid", "FID during training"),
    "grids": ("samples", "Final EMA samples (one row per class)"),
}
SIZE, DPI = (7.2, 4.2), 120  # one curve figure (inches, dots per inch)


def save_plot(ax: Axes, path: Path, xlabel: str, ylabel: str, *, xlog: bool = False, ylog: bool = False) -> None:
    """The report's curve figures alike: labels, log axes, grid, legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if xlog:
        ax.set_xscale("log")
    if ylog:
        log_scale_if_positive(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.figure.tight_layout()
    atomic_file(path, ax.figure.savefig, suffix=".png")


def plot_curves(arms: dict[str, list[dict]], key: str, ylabel: str, path: Path, log: bool = False) -> bool:
    """Mean over the seeds of each arm, with a band from the lowest to the highest seed; False if nothing to draw."""
    ax = Figure(figsize=SIZE, dpi=DPI).subplots()
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
    if drawn:
        save_plot(ax, path, "step", ylabel, ylog=log)
    return drawn


def final_grid(job_dir: Path) -> Path | None:
    """A run's final sample grid: samples/latest.png, or (published runs keep no copy) its last step_*.png."""
    latest = job_dir / "samples" / "latest.png"
    steps = sorted((job_dir / "samples").glob("step_*.png"))
    return latest if latest.exists() else steps[-1] if steps else None


def plot_grids(arms: dict[str, list[dict]], path: Path) -> bool:
    """The final sample grid of each arm's first seed, side by side; False if no run has one."""
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
    fig = Figure(figsize=(3.0 * cols, 3.9 * rows), dpi=DPI)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, png) in zip(axes.flat, grids):
        ax.imshow(Image.open(png), cmap="gray")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    atomic_file(path, fig.savefig, suffix=".png")
    return True


def plot_cost(arms: dict[str, list[dict]], key: str, path: Path) -> bool:
    """FID against the cost ``key`` (mean over seeds at the shared evaluation steps), log-log."""
    label, scale, unit = COSTS[key]
    ax = Figure(figsize=SIZE, dpi=DPI).subplots()
    drawn = False
    for arm, runs in arms.items():
        curves = [curve(r, "fid") for r in runs]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves and all(curves) else []
        points = []
        for s in steps:
            cost = statistics.fmean(cost_at(r, key, s) or math.nan for r in runs) / scale
            if cost > 0 and not math.isnan(cost):
                points.append((cost, statistics.fmean(c[s] for c in curves)))
        if points:
            ax.plot(*zip(*points), marker="o", ms=3, lw=1.2, label=f"{arm} (n={len(runs)})")
            drawn = True
    if drawn:
        save_plot(ax, path, f"{label} ({unit})", "FID (mean over seeds)", xlog=True, ylog=True)
    return drawn


def figures(ok_arms: dict[str, list[dict]], out: Path) -> list[str]:
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


def cost_figures(ok_arms: dict[str, list[dict]], out: Path) -> list[str]:
    """FID against counted FLOPs and measured training time next to the report (<stem>_fid_vs_train_flops.png,
    <stem>_fid_vs_train_s.png); Markdown for those drawn."""
    text = []
    for key, (label, _, _) in COSTS.items():
        png = out.with_name(f"{out.stem}_fid_vs_{key}.png")
        if plot_cost(ok_arms, key, png):
            text += [f"**FID against {label}**", "", f"![FID against {label}]({png.name})", ""]
    return text
