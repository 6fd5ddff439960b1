"""FID from the command line (in the spirit of edm2's calculate_metrics.py).

    python -m dit.eval ref fashion_mnist -o refs/fmnist_inception.npz          # reference statistics
    python -m dit.eval ref /data/imagenet_val_pngs -o refs/in256.npz
    python -m dit.eval fid samples/fid/samples.npz refs/in256.npz              # FID (+ Inception Score)
    python -m dit.eval fid samples/fid/samples.npz /data/imagenet_val_pngs     # + KID, precision, recall
    python -m dit.eval fid samples/fid/samples.npz fashion_mnist --metric fashion_mnist
    accelerate launch -m dit.eval fid ...                                      # several processes

Sources: a folder of images, an ADM-format npz (arr_0 uint8 NHWC, arr_1 labels), or a dataset name
(fashion_mnist, fashion_mnist:test). A reference npz with mu/sigma (ours, or ADM's
VIRTUAL_imagenet256_labeled.npz) is used as it is; KID and precision/recall need the reference's
images (its features, not only their mean and covariance), so against a stats npz they are skipped
with a note (--no-extra skips them always).
"""

from __future__ import annotations

import argparse
import sys

import torch

from dit.eval import METRICS
from dit.eval.evaluator import Evaluator
from dit.eval.stats import is_stats_file, stats_from_features


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dit.eval", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("ref", help="compute and save reference statistics (mu, sigma, count)")
    ref.add_argument("source")
    ref.add_argument("-o", "--out", required=True)
    f = sub.add_parser("fid", help="FID of samples against a reference (stats npz or images)")
    f.add_argument("samples")
    f.add_argument("ref")
    f.add_argument("--no-extra", action="store_true", help="FID (and IS / class consistency) only: no KID, precision, recall")
    for sp in (ref, f):
        sp.add_argument("--metric", choices=METRICS, default="inception")
        sp.add_argument("--inception-weights", default=None, help="path of weights-inception-2015-12-05-6726825d.pth")
        sp.add_argument("--batch-size", type=int, default=100)
        sp.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        extra = args.command == "fid" and not args.no_extra
        evaluator = Evaluator(
            args.metric, getattr(args, "ref", None), args.inception_weights, args.device, args.batch_size, extra_metrics=extra
        )
        if args.command == "ref":
            stats, _, _ = evaluator.stats(args.source)
            stats.save(args.out)
            print(f"wrote {args.out}: {stats.count} images, {stats.extractor}")
            return
        if is_stats_file(args.samples):
            (samples, logits, labels), features = evaluator.stats(args.samples), None
        else:
            features, logits, labels = evaluator.extract(args.samples)
            samples = stats_from_features(features, evaluator.extractor.name)
        result = evaluator.metrics(samples, logits, labels, features)
        per_class = result.pop("class_consistency_per_class", None)
        print(" ".join(f"{k}={v:.6f}" if k.startswith("kid") else f"{k}={v:.4f}" for k, v in result.items()), end="")
        print(f" ({samples.count} samples, {samples.extractor})")
        if per_class:
            print("class consistency per class: " + " ".join(f"{k}={v:.3f}" for k, v in enumerate(per_class) if v is not None))
        if extra and (why := evaluator.extra_unavailable(features)):
            print(f"KID, precision and recall not computed: {why}")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
