"""Conditional BatchNorm's failure modes at sampling time, measured on a trained `cbn` model of the study.

The `cbn` block samples with its running statistics (dit.models.blocks.BatchNormModulate), so an image does not
depend on the others in its batch. This script shows what that choice avoids: the same model sampled with the
statistics of each sampling batch instead (as a BatchNorm left in training mode would), for several batch sizes,
with and without classifier-free guidance (whose doubled batch puts each image's unconditional copy, and every
other image's, into the statistics). Every row draws the same noise and labels (1,000 images, the classes in
turn), so the rows differ only in the statistics; each is measured by the domain FID against the test split
(shipped classifier), class consistency, and how far its images move from the running-statistics images of the
same noise and guidance (mean absolute pixel difference, of 255). Repeated over sample seeds: mean and sd.

    python studies/normalisation/cbn_failure_modes.py outputs/studies/normalisation/batch_seed2/model
        [--n 1000 --seeds 0 1 2] > studies/normalisation/cbn_failure_modes.md
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch

from dit.diffusion import SamplingSettings, build_sampler
from dit.eval.evaluator import Evaluator
from dit.hub import load_model, objective_of
from dit.models.blocks import BatchNormModulate
from dit.sampling import decode, to_uint8

# (label, statistics, sampling batch size, guidance): the first row is the shipped behaviour
ROWS = [
    ("running statistics (shipped)", "running", 100, 2.0),
    *((f"batch statistics, batch {b}", "batch", b, 2.0) for b in (100, 16, 4, 1)),
    ("running statistics, unguided", "running", 100, 1.0),
    *((f"batch statistics, batch {b}, unguided", "batch", b, 1.0) for b in (100, 1)),
]


@contextlib.contextmanager
def batch_statistics(model: torch.nn.Module, on: bool):
    """Every BatchNormModulate normalises with the statistics of the batch it is given (running statistics left
    unchanged: momentum 0), the rest of the model in evaluation mode."""
    norms = [m for m in model.modules() if isinstance(m, BatchNormModulate)]
    if not norms:
        raise SystemExit("error: the model has no conditional BatchNorm (model.block=cbn)")
    saved = [(m.training, m.momentum) for m in norms]
    try:
        for m in norms:
            m.train(on)
            m.momentum = 0.0
        yield
    finally:
        for m, (training, momentum) in zip(norms, saved, strict=True):
            m.train(training)
            m.momentum = momentum


@torch.no_grad()
def sample(model, objective, labels, noise, mode: str, batch_size: int, cfg_scale: float, steps: int) -> torch.Tensor:
    sampler = build_sampler(objective, SamplingSettings(steps=steps, cfg_scale=cfg_scale))
    denoiser = sampler.denoiser(model)
    out = []
    with batch_statistics(model, mode == "batch"):
        for i in range(0, len(labels), batch_size):
            out.append(
                to_uint8(decode(sampler.run(denoiser, noise[i : i + batch_size], labels[i : i + batch_size], None)))
            )
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a cbn run's model/ (or checkpoint) directory")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=10, help="Euler steps (the study's evaluation: 10)")
    args = p.parse_args()
    torch.set_num_threads(1)

    model, meta = load_model(args.checkpoint, use_ema=True)
    model.eval()
    objective = objective_of(meta)
    evaluator = Evaluator("fashion_mnist", "fashion_mnist:test", distributed=False)
    labels = torch.arange(args.n) % model.num_classes
    shape = (model.in_channels, model.input_size, model.input_size)
    results: dict[str, list[dict]] = {row[0]: [] for row in ROWS}
    for seed in args.seeds:
        noise = torch.randn(args.n, *shape, generator=torch.Generator().manual_seed(seed))
        reference: dict[float, torch.Tensor] = {}  # guidance -> the running-statistics images
        for name, mode, batch_size, cfg_scale in ROWS:
            t0 = time.time()
            images = sample(model, objective, labels, noise, mode, batch_size, cfg_scale, args.steps)
            values = evaluator.evaluate(images, labels)
            if mode == "running":
                reference[cfg_scale] = images
            moved = (images.float() - reference[cfg_scale].float()).abs().mean().item()
            results[name].append(values | {"moved": moved})
            print(
                f"seed {seed} {name}: FID {values['fid']:.2f}, consistency {values['class_consistency']:.3f}"
                f" ({time.time() - t0:.0f} s)",
                file=sys.stderr,
            )

    def cell(values: list[float], fmt: str) -> str:
        mean = statistics.fmean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{mean:{fmt}} ± {sd:{fmt}}"

    print(f"Model: `{args.checkpoint}`; {args.n} samples per row, Euler {args.steps} steps, the same noise and labels")
    print(f"in every row; mean ± sd over sample seeds {args.seeds}. Measured with `{evaluator.extractor.name}`.")
    print("Moved: mean absolute pixel difference (of 255) from the running-statistics images of the same noise and")
    print("guidance.\n")
    print("| sampling | guidance | FID | class consistency | moved |")
    print("|---|---:|---|---|---|")
    for name, _, _, cfg_scale in ROWS:
        r = results[name]
        fid = cell([x["fid"] for x in r], ".1f")
        consistency = cell([100 * x["class_consistency"] for x in r], ".1f")
        print(f"| {name} | {cfg_scale:g} | {fid} | {consistency}% | {cell([x['moved'] for x in r], '.1f')} |")


if __name__ == "__main__":
    main()
