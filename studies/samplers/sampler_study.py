"""Samplers side by side on one model: wall-clock per image, domain FID with a bootstrap interval,
class consistency. Every sampler gets the same labels and the same initial noise (same seed).

    python studies/samplers/sampler_study.py --checkpoint outputs/fashion_mnist-dit_ti4-adaln_zero/model \\
        --samplers ddpm:250,ddim:50,dpmpp:20,dpmpp:10,unipc:10 --num-images 1000 \\
        --out outputs/studies/samplers/1000_images

Each sampler's images (ADM npz) and result (JSON) are written under --out as soon as it finishes, so
re-running the command skips what is done; the table (results.md) is rewritten at the end. FID is the
Fashion-MNIST domain metric against the test split (dit.eval, --metric fashion_mnist); the interval is
a bootstrap over the generated images (the reference statistics held fixed).

When the costliest sampler (DDPM-250) can only be afforded on fewer images, run it with
--num-images N into its own --out, and compare the others on the same N images without sampling
again: --images-from <the directory of the larger run> takes the first N of each sampler's npz there
(the same labels and initial noise as an N-image run: tests/test_sample.py checks it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # benchmarks/common.py: the header
from common import header  # noqa: E402

from dit.diffusion import SamplingSettings, build_sampler
from dit.eval.evaluator import Evaluator, TensorSource
from dit.eval.stats import fid, stats_from_features
from dit.hub import load_model, objective_of
from dit.sampling import GenerationSpec, generate, make_labels, save_npz_atomic


def bootstrap(
    point: float,
    features: np.ndarray,
    logits: np.ndarray,
    labels: np.ndarray,
    evaluator: Evaluator,
    rounds: int,
    seed: int = 0,
):
    """95% intervals of FID and class consistency over resamples of the generated images.

    FID of a resample is biased upwards (duplicated images shrink the covariance), so the FID
    interval is the basic (reverse-percentile) bootstrap [2F - q97.5, 2F - q2.5], which corrects
    that shift; class consistency, a mean, uses the plain percentile interval."""
    rng = np.random.default_rng(seed)
    reference, name = evaluator.reference(), evaluator.extractor.name
    fids, consistencies = [], []
    correct = logits.argmax(1) == labels
    for _ in range(rounds):
        idx = rng.integers(len(features), size=len(features))
        fids.append(fid(stats_from_features(features[idx], name), reference))
        consistencies.append(correct[idx].mean())
    lo, hi = np.percentile(fids, [2.5, 97.5])
    return [2 * point - hi, 2 * point - lo], np.percentile(consistencies, [2.5, 97.5]).tolist()


def reuse(npz: Path, labels: torch.Tensor, args) -> tuple[torch.Tensor, float]:
    """The first len(labels) images of an earlier run of this script with the same seed and batch size and
    more images (labels are drawn in sequence and each batch's noise is seeded by its index, so they are
    the images this run would draw), and the time they took (seconds_per_image of that run's result)."""
    with np.load(npz) as f:
        images, earlier_labels = f["arr_0"], f["arr_1"]
    n = len(labels)
    if len(images) < n or not np.array_equal(earlier_labels[:n], labels.numpy()):
        raise SystemExit(f"error: {npz}: not the same labels as this run's first {n} (other seed or fewer images)")
    if not npz.with_suffix(".json").exists():
        raise SystemExit(f"error: {npz.with_suffix('.json')} is missing (the earlier run's result, with its timing)")
    result = json.loads(npz.with_suffix(".json").read_text())
    same = {
        "cfg_scale": args.cfg_scale,
        "seed": args.seed,
        "batch_size": args.batch_size,
    }  # (older results lack the last two)
    if any(result.get(k, v) != v for k, v in same.items()) or n % args.batch_size:
        raise SystemExit(
            f"error: {npz}: drawn with other settings than {same}, or {n} is not a multiple of the batch size"
        )
    return torch.from_numpy(images[:n, ..., :1].copy()), result["seconds_per_image"] * n


def run_one(spec: str, model, objective, labels, args, evaluator: Evaluator, out: Path) -> dict:
    name, _, steps = spec.partition(":")
    result_file = out / f"{name}-{steps}.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    earlier = Path(args.images_from) / f"{name}-{steps}.npz" if args.images_from else None
    if earlier is not None and earlier.exists():
        images, seconds = reuse(earlier, labels, args)
        print(f"  {spec}: the first {len(labels)} images of {earlier}", flush=True)
    else:
        settings = SamplingSettings(sampler=name, steps=int(steps), cfg_scale=args.cfg_scale)
        sampler = build_sampler(objective, settings)
        start = time.perf_counter()
        chunks = []
        generation = GenerationSpec(labels, batch_size=args.batch_size, seed=args.seed)
        for first, images in generate(model, sampler, generation):
            chunks.append(images)
            print(
                f"  {spec}: {first + len(images)}/{len(labels)} images, {time.perf_counter() - start:.0f} s", flush=True
            )
        seconds = time.perf_counter() - start
        images = torch.cat(chunks)
    save_npz_atomic(out / f"{name}-{steps}.npz", np.repeat(images.numpy(), 3, axis=-1), labels.numpy())
    features, logits = evaluator.features(TensorSource(images, labels))
    metrics = evaluator.measure(stats_from_features(features, evaluator.extractor.name), logits, labels.numpy()).values
    fid_ci, cc_ci = bootstrap(metrics["fid"], features, logits, labels.numpy(), evaluator, args.bootstrap)
    result = {
        "sampler": name,
        "steps": int(steps),
        "cfg_scale": args.cfg_scale,
        "num_images": len(labels),
        "seed": args.seed,
        "batch_size": args.batch_size,
        "images_from": str(earlier) if earlier and earlier.exists() else None,
        "seconds_per_image": seconds / len(labels),
        "fid": metrics["fid"],
        "fid_ci95": fid_ci,
        "class_consistency": metrics["class_consistency"],
        "class_consistency_ci95": cc_ci,
        "class_consistency_per_class": metrics["class_consistency_per_class"],
    }
    result_file.write_text(json.dumps(result, indent=1))
    return result


def paired_relative(
    features: list[np.ndarray], evaluator: Evaluator, rounds: int, seed: int = 0
) -> list[list[float] | None]:
    """95% percentile-bootstrap intervals of FID_i / FID_0 - 1 for every row i > 0. The images of all rows
    share labels and initial noise, so each resample takes the same indices in every row (a paired
    bootstrap: what the rows have in common cancels, which the separate intervals cannot show)."""
    rng = np.random.default_rng(seed)
    reference, name = evaluator.reference(), evaluator.extractor.name
    ratios = [[] for _ in features[1:]]
    for _ in range(rounds):
        idx = rng.integers(len(features[0]), size=len(features[0]))
        first = fid(stats_from_features(features[0][idx], name), reference)
        for i, f in enumerate(features[1:]):
            ratios[i].append(fid(stats_from_features(f[idx], name), reference) / first - 1)
    return [None] + [np.percentile(r, [2.5, 97.5]).tolist() for r in ratios]


def table(results: list[dict], relative_ci: list[list[float] | None]) -> str:
    lines = [
        "| sampler | steps | s / image | domain FID (95% CI) | vs first row (paired 95% CI) "
        "| class consistency (95% CI) |",
        "|---|---:|---:|---|---:|---|",
    ]
    reference = results[0]
    for r, ci in zip(results, relative_ci):
        rel = f"{100 * (r['fid'] / reference['fid'] - 1):+.1f}%"
        rel += f" ({100 * ci[0]:+.1f} to {100 * ci[1]:+.1f}%)" if ci else ""
        lines.append(
            f"| {r['sampler']} | {r['steps']} | {r['seconds_per_image']:.3f} | {r['fid']:.2f} "
            f"({r['fid_ci95'][0]:.2f}-{r['fid_ci95'][1]:.2f}) | {rel} | {100 * r['class_consistency']:.1f}% "
            f"({100 * r['class_consistency_ci95'][0]:.1f}-{100 * r['class_consistency_ci95'][1]:.1f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--samplers", default="ddpm:250,ddim:50,dpmpp:20,dpmpp:10,unipc:10", help="comma list of name:steps")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--ref", default="fashion_mnist:test")
    p.add_argument("--out", required=True)
    earlier = "a directory of an earlier run with more images (same seed, batch size, cfg)"
    p.add_argument(
        "--images-from",
        default=None,
        help=f"{earlier}: take the first --num-images of each sampler's npz there instead of sampling again (a "
        "comparison at the size of the costliest row)",
    )
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = header("cpu")
    lines = [
        f"Device: {info['device']}; torch {info['torch']}, diffusers {info['diffusers']}; {info['date']}; "
        f"`{info['command']}`"
    ]
    model, meta = load_model(args.checkpoint)
    model.eval()
    objective = objective_of(meta)
    labels = make_labels(list(range(model.num_classes)), None, args.num_images, args.seed)
    evaluator = Evaluator("fashion_mnist", args.ref, batch_size=500, distributed=False)
    specs = args.samplers.split(",")
    results = [run_one(spec, model, objective, labels, args, evaluator, out) for spec in specs]
    npzs = [out / f"{spec.replace(':', '-')}.npz" for spec in specs]
    if missing := [str(f) for f in npzs if not f.exists()]:  # results kept (JSON), images not (npz is not committed)
        print(f"no paired intervals: the images of {', '.join(missing)} are not here (delete its JSON to sample again)")
        relative_ci = [None] * len(specs)
    else:
        features = []
        for npz in npzs:  # each row's images again (seconds), for the paired comparison with the first row
            with np.load(npz) as f:
                images = torch.from_numpy(f["arr_0"][..., :1].copy())
            features.append(evaluator.features(TensorSource(images, labels))[0])
        relative_ci = paired_relative(features, evaluator, args.bootstrap)
    summary = (
        f"Model: `{args.checkpoint}` (objective {objective.settings()}); {args.num_images} images, "
        f"cfg {args.cfg_scale}, seed {args.seed}, same labels and initial noise for every sampler; "
        f"FID: Fashion-MNIST domain metric vs {args.ref}; intervals: {args.bootstrap}-round bootstrap over the "
        "generated images (basic for FID, percentile for consistency; "
        "the difference to the first row: paired, percentile)."
    )
    text = "\n".join([summary, "", *lines, "", table(results, relative_ci), ""])
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
