"""What the shipped Fashion-MNIST classifier computes for fixed inputs: stored in tests/data/domain_features.npz.

    python tests/helpers/domain_reference.py        # once, when dit/eval/weights/ changes (1 thread)

Stored: the features and logits of 20 test images (two per class), and the domain FID of the first 1,000
test images against the first 1,000 train images, with the extractor name (the weights' hash) they belong
to. tests/test_eval.py calls `compute` again with 1 and 2 threads and compares.
"""

from pathlib import Path

import numpy as np
import torch

from dit.eval import ImageSource, extract_features, fid, make_extractor, stats_from_features

OUT = Path(__file__).resolve().parents[1] / "data" / "domain_features.npz"


def compute(threads: int, index: np.ndarray | None = None) -> dict:
    """The stored quantities, computed now with `threads` torch threads (restored after)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        extractor = make_extractor("fashion_mnist")
        test = ImageSource("fashion_mnist:test")
        if index is None:
            index = np.concatenate([np.flatnonzero(test.labels == k)[:2] for k in range(10)])
        few = ImageSource("fashion_mnist:test")
        few.array = test.array[index]
        features, logits = extract_features(few, extractor, 1000, progress=False)
        test.array = test.array[:1000]
        train = ImageSource("fashion_mnist:train")
        train.array = train.array[:1000]
        a = extract_features(test, extractor, 1000, progress=False)[0]
        b = extract_features(train, extractor, 1000, progress=False)[0]
    finally:
        torch.set_num_threads(previous)
    value = fid(stats_from_features(a, extractor.name), stats_from_features(b, extractor.name))
    return {
        "index": index,
        "features": features,
        "logits": logits,
        "fid_test1000_train1000": np.float64(value),
        "extractor": np.str_(extractor.name),
    }


def main() -> None:
    values = compute(threads=1)
    np.savez(OUT, **values)
    print(f"out={OUT} extractor={values['extractor']} fid_test1000_train1000={values['fid_test1000_train1000']:.6f}")


if __name__ == "__main__":
    main()
