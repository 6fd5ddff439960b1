"""Write tests/data/domain_features.npz: what the shipped Fashion-MNIST classifier computes for fixed inputs.

    python tests/helpers/domain_reference.py        # once, when dit/eval/weights/ changes (1 thread)

Stored: the features and logits of 20 test images (two per class), and the domain FID of the first 1,000
test images against the first 1,000 train images, with the extractor name (the weights' hash) they belong
to. tests/test_eval.py computes them again with 1 and 2 threads and compares.
"""

from pathlib import Path

import numpy as np
import torch

from dit.eval import ImageSource, extract_features, fid, make_extractor, stats_from_features

OUT = Path(__file__).resolve().parents[1] / "data" / "domain_features.npz"


def main() -> None:
    torch.set_num_threads(1)
    extractor = make_extractor("fashion_mnist")
    test = ImageSource("fashion_mnist:test")
    index = np.concatenate([np.flatnonzero(test.labels == k)[:2] for k in range(10)])
    few = ImageSource("fashion_mnist:test")
    few.array = test.array[index]
    features, logits = extract_features(few, extractor, 1000, progress=False)
    test.array = test.array[:1000]
    train = ImageSource("fashion_mnist:train")
    train.array = train.array[:1000]
    a = extract_features(test, extractor, 1000, progress=False)[0]
    b = extract_features(train, extractor, 1000, progress=False)[0]
    value = fid(stats_from_features(a, extractor.name), stats_from_features(b, extractor.name))
    np.savez(
        OUT, index=index, features=features, logits=logits, fid_test1000_train1000=np.float64(value), extractor=np.str_(extractor.name)
    )
    print(f"out={OUT} extractor={extractor.name} fid_test1000_train1000={value:.6f}")


if __name__ == "__main__":
    main()
