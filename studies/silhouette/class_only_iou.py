"""What map IoU a model that ignores the map but gets the class right would score: the silhouette of each of the
first N test images (the ones the study's final evaluation is conditioned on) against the silhouette of another
test image of the same class (a seeded draw), mean and 95% interval over the N pairs, averaged over draws.

    python studies/silhouette/class_only_iou.py            # N = 1000, 5 draws; prints a Markdown line
"""

from __future__ import annotations

import argparse
import statistics

import torch

from dit.data import FashionMNIST
from dit.models.spatial import MAPS, map_iou


def class_only_iou(n: int = 1000, draws: int = 5, size: int = 8) -> tuple[float, float]:
    data = FashionMNIST(split="test")
    maps = MAPS["silhouette"]()(data.images, size)
    labels = data.labels
    means = []
    for draw in range(draws):
        g = torch.Generator().manual_seed(draw)
        partner = torch.empty(n, dtype=torch.long)
        for i in range(n):
            same = (labels == labels[i]).nonzero().flatten()
            same = same[same != i]
            partner[i] = same[torch.randint(len(same), (1,), generator=g)]
        means.append(float(map_iou(maps[:n], maps[partner]).mean()))
    return statistics.fmean(means), statistics.stdev(means) if draws > 1 else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--draws", type=int, default=5)
    args = p.parse_args()
    mean, sd = class_only_iou(args.n, args.draws)
    print(f"class only (another image of the class): map IoU {mean:.3f} (sd over {args.draws} draws {sd:.3f})")


if __name__ == "__main__":
    main()
