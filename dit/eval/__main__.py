"""FID from the command line (in the spirit of edm2's calculate_metrics.py).

    python -m dit.eval ref fashion_mnist -o refs/fmnist_inception.npz          # reference statistics
    python -m dit.eval ref /data/imagenet_val_pngs -o refs/in256.npz
    python -m dit.eval fid samples/fid/samples.npz refs/in256.npz              # FID (+ Inception Score)
    python -m dit.eval fid samples/fid/samples.npz /data/imagenet_val_pngs     # + KID, precision, recall
    python -m dit.eval fid samples/fid/samples.npz fashion_mnist --metric fashion_mnist
    python -m dit.eval fid ... --json                                          # one JSON object instead
    python -m dit.eval train-domain-classifier -o my_cnn.safetensors           # how the shipped one was made
    accelerate launch -m dit.eval fid ...                                      # several processes

Sources: a folder of images, an ADM-format npz (arr_0 uint8 NHWC, arr_1 labels), or a dataset name
(fashion_mnist, fashion_mnist:test). A reference npz with mu/sigma (ours, or ADM's
VIRTUAL_imagenet256_labeled.npz) is used as it is; KID and precision/recall need the reference's
images (its features, not only their mean and covariance), so against a stats npz they are skipped
with a note (--no-extra skips them always).

Output: stdout carries the results only, as ONE line of space-separated key=value tokens, e.g.

    fid=24.6573 class_consistency=0.8440 class_consistency_min=0.3778 class_consistency_per_class=0.962,...,1.000 \
    samples=500 extractor=fashion-mnist-cnn-v1@20767b53ac99/fc1-128

(one line; broken here at the backslash for width)

(``dict(t.split("=", 1) for t in line.split())`` reads it; per-class values are comma-separated by class
id, empty for a class without samples), or with --json one JSON object with the same keys at full
precision. ``ref`` prints ``out=... samples=... extractor=...``; ``train-domain-classifier`` prints
``out=... sha256=... test_accuracy=...``. Progress bars, warnings and notes (e.g. why KID was not
computed) go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dit.atomic import RunLock
from dit.eval import domain
from dit.eval.evaluator import Evaluator
from dit.eval.extractors import EXTRACTORS, ExtractorSpec
from dit.eval.metrics import value_format


def format_line(result: dict) -> str:
    """The text form of a result: key=value tokens, floats in their metric's format (4 decimals; KID: 6), lists
    comma-separated to 3 decimals."""

    def value(k, v):
        if isinstance(v, float):
            return format(v, value_format(k))
        if isinstance(v, (list, tuple)):
            return ",".join("" if x is None else f"{x:.3f}" for x in v)
        return str(v)

    return " ".join(f"{k}={value(k, v)}" for k, v in result.items())


def emit(result: dict, as_json: bool) -> None:
    print(json.dumps(result) if as_json else format_line(result), flush=True)


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m dit.eval", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("ref", help="compute and save reference statistics (mu, sigma, count)")
    ref.add_argument("source")
    ref.add_argument("-o", "--out", required=True)
    f = sub.add_parser("fid", help="FID of samples against a reference (stats npz or images)")
    f.add_argument("samples")
    f.add_argument("ref")
    f.add_argument(
        "--no-extra", action="store_true", help="FID (and IS / class consistency) only: no KID, precision, recall"
    )
    for sp in (ref, f):
        sp.add_argument(
            "--metric",
            choices=EXTRACTORS.names(),
            default="inception",
            help="the feature extractor (dit.eval.extractors)",
        )
        sp.add_argument("--inception-weights", default=None, help="path of weights-inception-2015-12-05-6726825d.pth")
        sp.add_argument(
            "--domain-classifier", default=None, help="another Fashion-MNIST classifier file (default: the shipped one)"
        )
        sp.add_argument("--batch-size", type=int, default=100)
        sp.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    tc = sub.add_parser(
        "train-domain-classifier", help="train the Fashion-MNIST domain classifier (the shipped file's recipe)"
    )
    tc.add_argument(
        "-o", "--out", required=True, help="a new .safetensors file (used only when passed as --domain-classifier)"
    )
    tc.add_argument(
        "--threads", type=int, default=None, help="torch threads while training (default: the shipped recipe's)"
    )
    tc.add_argument(
        "--data-root", default=None, help="Fashion-MNIST idx files (default: Debian's dataset-fashion-mnist)"
    )
    tc.add_argument("--overwrite", action="store_true")
    for sp in (ref, f, tc):
        sp.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return p.parse_args(argv)


def train_domain_classifier(args) -> dict:
    out = Path(args.out)
    if out.resolve() == domain.WEIGHTS:
        raise ValueError(f"{out} is the shipped classifier; write a new file and pass it with --domain-classifier")
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite or another -o")
    threads = args.threads or domain.THREADS
    model, accuracy = domain.train_classifier(args.data_root, threads=threads)
    digest = domain.save_classifier(model, accuracy, out, threads=threads)
    return {"out": str(out), "sha256": digest, "test_accuracy": accuracy, "extractor": domain.extractor_name(digest)}


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        if args.command == "train-domain-classifier":
            emit(train_domain_classifier(args), args.json)
            return
        extra = args.command == "fid" and not args.no_extra
        spec = ExtractorSpec(args.metric, args.inception_weights, args.domain_classifier)
        if args.command == "ref":  # into a run directory (a run.lock above -o): only while no other process writes it
            with RunLock.enclosing(args.out, way_out="write the statistics elsewhere (-o ...)"):
                stats, _, _ = Evaluator(spec, None, args.device, args.batch_size).stats(args.source)
                stats.save(args.out)
            emit({"out": args.out, "samples": stats.count, "extractor": stats.extractor}, args.json)
            return
        evaluator = Evaluator(spec, args.ref, args.device, args.batch_size, extra_metrics=extra)
        evaluation = evaluator.evaluation(args.samples)
        for why in dict.fromkeys(evaluation.skipped.values()):  # one note per reason, naming its metrics
            titles = [title for title, reason in evaluation.skipped.items() if reason == why]
            note(f"{', '.join(titles)} not computed: {why}")
        samples = evaluation.samples
        emit(evaluation.values | {"samples": samples.count, "extractor": samples.extractor}, args.json)
    except (ValueError, OSError) as e:  # OSError: FileNotFoundError, a full disk (dit.atomic.WriteFailed)
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
