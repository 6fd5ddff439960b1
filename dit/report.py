"""A Markdown report of a Hydra multirun (e.g. the conditioning ablation): table and PNG plots.

    python -m dit.report multirun/ablate_conditioning -o docs/ablation.md

Table: block, parameters, GFLOPs (of the run's own input size), final training loss, FID and class
consistency (the last evaluation), training images/s. Plots: loss against step and FID against step
for every run on one axis each, and the runs' final sample grids side by side. Failed or unfinished
runs are listed with the reason and the rest is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml


def load_run(job_dir: Path) -> dict:
    """One job directory -> {name, config, records, status} (status 'ok' or why not)."""
    config = yaml.safe_load((job_dir / ".hydra" / "config.yaml").read_text())
    metrics = job_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line] if metrics.exists() else []
    total = config["training"]["total_steps"]
    last = max((r["step"] for r in records), default=0)
    if not records:
        status = "failed: no metrics were written"
    elif not (job_dir / "model" / "config.json").exists():
        status = f"unfinished: stopped at step {last} of {total}"
    else:
        status = "ok"
    return dict(name=job_dir.name, dir=job_dir, config=config, records=records, status=status, last_step=last)


def summarize(run: dict) -> dict:
    from dit.zoo import count

    cfg, recs = run["config"], run["records"]
    m, d = cfg["model"], cfg["data"]
    size = count(m["name"], m["block"], input_size=d["input_size"], in_channels=d["in_channels"], num_classes=d["num_classes"])
    losses = [r["loss"] for r in recs if "loss" in r]
    evals = [r for r in recs if "fid" in r]
    speeds = [r["images_per_s"] for r in recs if "images_per_s" in r][1:]  # the first window holds start-up
    return dict(
        block=m["block"],
        model=m["name"],
        params=size["params"],
        gflops=size["gflops"],
        final_loss=statistics.mean(losses[-3:]) if losses else None,
        fid=evals[-1]["fid"] if evals else None,
        class_consistency=evals[-1].get("class_consistency") if evals else None,
        images_per_s=statistics.median(speeds) if speeds else None,
    )


def plot_curves(runs: list[dict], key: str, ylabel: str, path: Path, log: bool = False) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    drawn = False
    for run in runs:
        pts = [(r["step"], r[key]) for r in run["records"] if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o" if key == "fid" else None, ms=4, label=run["config"]["model"]["block"])
            drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
    plt.close(fig)
    return drawn


def plot_grids(runs: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    grids = [(r["config"]["model"]["block"], r["dir"] / "samples" / "latest.png") for r in runs]
    grids = [(b, p) for b, p in grids if p.exists()]
    if not grids:
        return False
    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 4.2), dpi=120, squeeze=False)
    for ax, (block, png) in zip(axes[0], grids):
        ax.imshow(Image.open(png))
        ax.set_title(block)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def write_report(multirun: Path, out: Path) -> str:
    jobs = sorted(p.parent.parent for p in multirun.glob("*/.hydra/config.yaml"))
    if not jobs:
        raise FileNotFoundError(f"{multirun}: no Hydra job directories (*/.hydra/config.yaml)")
    runs = [load_run(j) for j in jobs]
    ok = [r for r in runs if r["status"] == "ok"]
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.stem
    images = {
        "loss": plot_curves(runs, "loss", "training loss", out.with_name(f"{stem}_loss.png"), log=True),
        "fid": plot_curves(runs, "fid", "FID", out.with_name(f"{stem}_fid.png")),
        "grids": plot_grids(ok, out.with_name(f"{stem}_samples.png")),
    }
    lines = ["| block | params (M) | GFLOPs | final loss | FID | class consistency | images/s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in ok:
        s = summarize(r)
        lines.append(
            f"| {s['block']} | {s['params'] / 1e6:.2f} | {fmt(s['gflops'], '.3f')} | {fmt(s['final_loss'], '.4f')} | "
            f"{fmt(s['fid'], '.1f')} | {fmt(s['class_consistency'], '.1%')} | {fmt(s['images_per_s'], '.1f')} |"
        )
    model = ok[0]["config"]["model"]["name"] if ok else "?"
    text = [f"Runs in `{multirun}` ({model}, {len(ok)} of {len(runs)} finished).", "", *lines, ""]
    bad = [r for r in runs if r["status"] != "ok"]
    if bad:
        text += ["Not reported:", *[f"- `{r['name']}`: {r['status']}" for r in bad], ""]
    for key, title in (("loss", "Training loss"), ("fid", "FID during training"), ("grids", "Final EMA samples (one row per class)")):
        if images[key]:
            name = {"loss": f"{stem}_loss.png", "fid": f"{stem}_fid.png", "grids": f"{stem}_samples.png"}[key]
            text += [f"**{title}**", "", f"![{title}]({name})", ""]
    return "\n".join(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dit.report", description=__doc__.split("\n\n")[0])
    p.add_argument("multirun", type=Path)
    p.add_argument("-o", "--out", type=Path, default=None, help="Markdown file (default: <multirun>/report.md)")
    args = p.parse_args(argv)
    out = args.out or args.multirun / "report.md"
    try:
        body = write_report(args.multirun, out)
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
