"""Per-class consistency of the conditioning study's final EMA models (docs/ablation.md).

    python studies/ablation_per_class.py studies/ablation_conditioning -o docs/ablation_per_class.md

For every finished run it draws again the samples of the run's final FID evaluation (the same labels,
sampler settings and seed as dit/training/loop.py: labels arange(n) % classes, seed + 1, batches of
250) from the EMA export, classifies them with the Fashion-MNIST domain classifier, and reports for
each block and class the share of class-k samples called k (mean over seeds). The overall share must
equal the class_consistency the run logged: a check that these are the very samples of the result.
Results per run are cached next to the run (per_class.json), so re-running only adds what is new.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
import yaml

from dit.checkpoints import load_model
from dit.diffusion import SamplingSettings, build_objective, build_sampler
from dit.eval.evaluator import Evaluator, TensorSource
from dit.sampling import generate


def per_class(run: Path, evaluator: Evaluator) -> dict:
    cached = run / "per_class.json"
    if cached.exists():
        return json.loads(cached.read_text())
    cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    t = cfg["training"]
    n = t.get("fid_final_samples") or t["fid_samples"]
    model, meta = load_model(run / "model")
    model.eval()
    sampler = build_sampler(build_objective(**meta["objective"]), SamplingSettings(**t["fid_sampling"]))
    labels = torch.arange(n) % model.num_classes
    images = torch.cat([imgs for _, imgs in generate(model, sampler, labels, batch_size=250, seed=cfg["seed"] + 1)])
    _, logits = evaluator.features(TensorSource(images, labels))
    hit = np.asarray(logits).argmax(1) == labels.numpy()
    logged = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("fid_n") == n][-1]
    result = {
        "block": cfg["model"]["block"],
        "seed": cfg["seed"],
        "per_class": [float(hit[labels.numpy() == k].mean()) for k in range(model.num_classes)],
        "overall": float(hit.mean()),
        "logged_overall": logged["class_consistency"],
        "class_names": meta.get("class_names"),
    }
    cached.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("multirun", type=Path)
    p.add_argument("-o", "--out", type=Path, required=True)
    args = p.parse_args()
    runs = sorted(d.parent.parent for d in args.multirun.glob("*/model/config.json"))
    if not runs:  # e.g. a fresh clone of a committed study: its weights are not in git
        raise SystemExit(f"error: {args.multirun}: no run with its EMA export (*/model/config.json) to draw samples from")
    evaluator = Evaluator("fashion_mnist", "fashion_mnist:test", batch_size=500, distributed=False)
    results = []
    for run in runs:
        r = per_class(run, evaluator)
        print(f"{run.name}: overall {r['overall']:.3f} (logged {r['logged_overall']:.3f})", flush=True)
        results.append(r)
    names = results[0]["class_names"] or [str(k) for k in range(len(results[0]["per_class"]))]
    blocks = list(dict.fromkeys(r["block"] for r in results))
    mismatched = [f"{r['block']}_seed{r['seed']}" for r in results if abs(r["overall"] - r["logged_overall"]) > 1e-9]
    lines = [
        "Share of class-k samples the domain classifier calls k, per block (mean over seeds; 1,000 samples per run, "
        "100 per class; chance 10%). `python studies/ablation_per_class.py " + str(args.multirun) + " -o " + str(args.out) + "`",
        "",
        "| block | seeds | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for b in blocks:
        rs = [r for r in results if r["block"] == b]
        cells = [f"{100 * statistics.fmean(r['per_class'][k] for r in rs):.0f}%" for k in range(len(names))]
        lines.append(f"| {b} | {len(rs)} | " + " | ".join(cells) + " |")
    _, logits, labels = evaluator.extract("fashion_mnist:test")  # the classifier on real images, for scale
    real = [float((logits.argmax(1) == labels)[labels == k].mean()) for k in range(len(names))]
    lines.append("| *real test images* | - | " + " | ".join(f"{100 * v:.0f}%" for v in real) + " |")
    lines += [
        "",
        "Samples redrawn: identical to the logged final evaluation in every run."
        if not mismatched
        else f"Not identical to the logged evaluation: {', '.join(mismatched)}.",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
