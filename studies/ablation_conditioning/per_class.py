"""What the conditioning study's final EMA models draw for each class, and what the classifier calls it.

    python studies/ablation_conditioning/per_class.py studies/ablation_conditioning --blocks adain adaln_zero \\
        --cfg-scale 2 4 -o studies/ablation_conditioning/per_class.md

The study's directory (its runs under runs/) or a sweep directory of it (outputs/studies/ablation_conditioning,
where the weights are).

For every finished run (its EMA export in model/) and guidance scale it draws the samples of the run's
final FID evaluation again (the same labels, seed and batches as the training loop: both take them from
dit.training.evaluation.eval_inputs; the run's sampler and steps), with only the guidance scale changed, and classifies
them with the Fashion-MNIST domain classifier. It reports, per block and scale (mean over seeds), the
share of class-k samples called k, and for each block's worst class what those samples are called
instead. At the run's own scale the overall share must equal the class_consistency the run logged: a
check that these are the very samples of the result. Results per run and scale are cached next to the
run (per_class_cfg<scale>.json, committed), so the report can be rewritten without the weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
import yaml

from dit.analysis.runs import job_dirs, run_config
from dit.diffusion import build_objective, build_sampler
from dit.eval.evaluator import Evaluator, TensorSource
from dit.hub import load_model
from dit.sampling import GenerationSpec, generate
from dit.training.config import training_sampling
from dit.training.evaluation import eval_inputs


def cache_path(run: Path, cfg_scale: float) -> Path:
    return run / f"per_class_cfg{cfg_scale:g}.json"


def per_class(run: Path, cfg_scale: float | None, evaluator) -> dict:
    """The classifier's calls on the run's final-evaluation samples drawn at cfg_scale (None: the run's own)."""
    cfg = run_config(run / ".hydra" / "config.yaml")
    t = cfg["training"]
    own = float(t["fid_sampling"].get("cfg_scale", 1.0))
    scale = own if cfg_scale is None else float(cfg_scale)
    cached = cache_path(run, scale)
    if cached.exists():
        return json.loads(cached.read_text())
    if not (run / "model" / "config.json").exists():
        raise SystemExit(f"error: {run}: no EMA export (model/config.json) to draw samples from, and no {cached.name}")
    n = t.get("fid_final_samples") or t["fid_samples"]
    model, meta = load_model(run / "model")
    model.eval()
    objective = build_objective(**meta["objective"])
    settings = training_sampling("fid_sampling", {**t["fid_sampling"], "cfg_scale": scale}, objective.name)
    sampler = build_sampler(objective, settings)
    spec = GenerationSpec(**eval_inputs(n, model.num_classes, cfg["seed"]))
    labels = spec.labels
    images = torch.cat([imgs for _, imgs in generate(model, sampler, spec)])
    _, logits = evaluator().features(TensorSource(images, labels))
    called, k = np.asarray(logits).argmax(1), labels.numpy()
    classes = model.num_classes
    confusion = np.zeros((classes, classes), dtype=int)  # [asked for, called]
    np.add.at(confusion, (k, called), 1)
    result = {
        "block": cfg["model"]["block"],
        "seed": cfg["seed"],
        "cfg_scale": scale,
        "own_cfg_scale": own,
        "per_class": [float(confusion[j, j] / confusion[j].sum()) for j in range(classes)],
        "confusion": confusion.tolist(),
        "overall": float((called == k).mean()),
        "class_names": meta.get("class_names"),
    }
    if scale == own:
        logged = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("fid_n") == n][
            -1
        ]
        result["logged_overall"] = logged["class_consistency"]
    cached.write_text(json.dumps(result, indent=1) + "\n")
    return result


def report(results: list[dict], real: list[float] | None, command: str) -> list[str]:
    names = results[0]["class_names"] or [str(k) for k in range(len(results[0]["per_class"]))]
    lines = [
        "# What the conditioning study's models draw for each class, by guidance scale",
        "",
        "Share of class-k samples the domain classifier calls k (mean over seeds; the 1,000 samples of each run's "
        "final evaluation, 100 per class, drawn again with the guidance scale shown; chance 10%).",
        f"`{command}`",
        "",
        "| block | guidance | seeds | overall | " + " | ".join(names) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(names),
    ]
    arms = list(dict.fromkeys((r["block"], r["cfg_scale"]) for r in results))
    for b, s in arms:
        rs = [r for r in results if (r["block"], r["cfg_scale"]) == (b, s)]
        cells = [f"{100 * statistics.fmean(r['per_class'][k] for r in rs):.0f}%" for k in range(len(names))]
        overall = 100 * statistics.fmean(r["overall"] for r in rs)
        lines.append(f"| {b} | {s:g} | {len(rs)} | {overall:.1f}% | " + " | ".join(cells) + " |")
    if real:
        lines.append("| *real test images* | - | - | - | " + " | ".join(f"{100 * v:.0f}%" for v in real) + " |")
    lines += ["", "What each arm's worst class (lowest mean share) is called instead (all seeds pooled):"]
    for b, s in arms:
        rs = [r for r in results if (r["block"], r["cfg_scale"]) == (b, s)]
        worst = min(range(len(names)), key=lambda k: statistics.fmean(r["per_class"][k] for r in rs))
        row = np.sum([r["confusion"][worst] for r in rs], axis=0)
        top = [f"{names[j]} {100 * row[j] / row.sum():.0f}%" for j in np.argsort(-row)[:3] if row[j]]
        lines.append(f"- `{b}` at guidance {s:g}: {names[worst]} samples called {', '.join(top)}.")
    checked = [r for r in results if "logged_overall" in r]
    mismatched = [f"{r['block']}_seed{r['seed']}" for r in checked if abs(r["overall"] - r["logged_overall"]) > 1e-9]
    if checked:
        lines += [
            "",
            "At the runs' own guidance the samples are the logged final evaluation's: the overall share equals the "
            f"logged class consistency in {len(checked) - len(mismatched)} of {len(checked)} runs"
            + (f" (not in {', '.join(mismatched)})." if mismatched else "."),
        ]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("multirun", type=Path)
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--blocks", nargs="+", help="only these blocks (default: every block of the study)")
    p.add_argument("--cfg-scale", nargs="+", type=float, help="guidance scales to draw at (default: each run's own)")
    args = p.parse_args()
    try:
        runs = job_dirs(args.multirun)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    runs = [r for r in runs if (r / "finished.json").exists() or (r / "model" / "config.json").exists()]
    if args.blocks:
        runs = [
            r
            for r in runs
            if yaml.safe_load((r / ".hydra" / "config.yaml").read_text())["model"]["block"] in args.blocks
        ]
    if not runs:
        raise SystemExit(
            f"error: {args.multirun}: no finished run" + (f" of {', '.join(args.blocks)}" if args.blocks else "")
        )
    made: list[Evaluator] = []

    def evaluator() -> Evaluator:  # built once, and only when something is to be classified
        if not made:
            made.append(Evaluator("fashion_mnist", "fashion_mnist:test", batch_size=500, distributed=False))
        return made[0]

    results = []
    for scale in args.cfg_scale or [None]:
        for run in runs:
            r = per_class(run, scale, evaluator)
            print(f"{run.name} guidance {r['cfg_scale']:g}: overall {r['overall']:.3f}", flush=True)
            results.append(r)
    if args.blocks:  # keep the order asked for
        results.sort(key=lambda r: (args.blocks.index(r["block"]), r["cfg_scale"], r["seed"]))
    _, logits, labels = evaluator().extract("fashion_mnist:test")  # the classifier on real images, for scale
    real = [float((logits.argmax(1) == labels)[labels == k].mean()) for k in range(len(results[0]["per_class"]))]
    command = (
        "python studies/ablation_conditioning/per_class.py "
        + str(args.multirun)
        + (f" --blocks {' '.join(args.blocks)}" if args.blocks else "")
        + (f" --cfg-scale {' '.join(f'{s:g}' for s in args.cfg_scale)}" if args.cfg_scale else "")
        + f" -o {args.out}"
    )
    lines = report(results, real, command)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
