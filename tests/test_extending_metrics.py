"""Adding a metric is one class plus one registry line (docs/extending.md, "A new metric"): a metric registered
with METRICS.add is computed by Evaluator.evaluate and printed by `python -m dit.eval fid`, in its own format,
with the value an independent numpy computation gives; removed again, it is gone from both."""

import json
import re

import numpy as np
import pytest
import torch

from dit.eval import METRICS, make_extractor
from dit.eval.__main__ import main as eval_main
from dit.eval.evaluator import Evaluator
from dit.eval.metrics import Inputs, Metric


class MeanFeatureDistance(Metric):
    """|mu_samples - mu_reference|: the L2 distance between the mean features of the samples and the reference
    (FID's first term, without the square)."""

    name, title, keys = "mean_feature_distance", "mean feature distance", ("mean_feature_distance",)
    needs = ("samples", "reference")
    format = ".5f"  # its floats in the CLI's text output

    def compute(self, inputs: Inputs) -> dict[str, float]:
        return {"mean_feature_distance": float(np.linalg.norm(inputs.samples.mu - inputs.reference.mu))}


@pytest.fixture
def registered():
    METRICS.add(MeanFeatureDistance)  # the one registry line (in dit/eval/metrics.py: an entry of the METRICS list)
    try:
        yield
    finally:
        METRICS.remove(MeanFeatureDistance.name)


@pytest.fixture
def image_sets(tmp_path):
    """A reference and a sample set of 28x28 grey images (ADM npz), the samples brighter than the reference."""
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 200, (200, 28, 28, 1), dtype=np.uint8)
    samples = rng.integers(60, 256, (150, 28, 28, 1), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    return tmp_path / "samples.npz", tmp_path / "ref.npz", samples, ref


def numpy_mean_feature_distance(samples: np.ndarray, ref: np.ndarray) -> float:
    """The same figure from the domain classifier's features, averaged and compared in numpy (float64)."""
    net = make_extractor("fashion_mnist")
    features = [net(torch.from_numpy(x).permute(0, 3, 1, 2))[0].numpy() for x in (samples, ref)]
    return float(np.sqrt(((features[0].mean(axis=0) - features[1].mean(axis=0)) ** 2).sum()))


def test_a_registered_metric_is_evaluated_and_printed(registered, image_sets, capsys):
    samples_npz, ref_npz, samples, ref = image_sets
    expected = numpy_mean_feature_distance(samples, ref)
    assert expected > 0.1  # the two sets differ: a metric returning 0 or a constant would fail below

    evaluator = Evaluator("fashion_mnist", str(ref_npz), batch_size=64, distributed=False)
    result = evaluator.evaluate(str(samples_npz))
    assert list(result)[-1] == "mean_feature_distance"  # after the built-in metrics, in registry order
    # float32 convolutions in other batches: the features agree to ~1e-8
    assert result["mean_feature_distance"] == pytest.approx(expected, rel=1e-6)
    assert result["fid"] > 0 and "class_consistency" not in result  # the npz has no labels

    args = ["fid", str(samples_npz), str(ref_npz), "--metric", "fashion_mnist", "--device", "cpu", "--no-extra"]
    eval_main(args)
    (line,) = capsys.readouterr().out.splitlines()
    printed = dict(token.split("=", 1) for token in line.split())
    assert re.fullmatch(r"\d+\.\d{5}", printed["mean_feature_distance"])  # the metric's own format
    assert float(printed["mean_feature_distance"]) == pytest.approx(expected, abs=1e-5)
    eval_main([*args, "--json"])
    assert json.loads(capsys.readouterr().out)["mean_feature_distance"] == pytest.approx(expected, rel=1e-6)


def test_an_unregistered_metric_is_not_computed(image_sets, capsys):
    samples_npz, ref_npz, _, _ = image_sets
    assert MeanFeatureDistance.name not in METRICS
    result = Evaluator("fashion_mnist", str(ref_npz), batch_size=64, distributed=False).evaluate(str(samples_npz))
    assert "mean_feature_distance" not in result and "fid" in result
    eval_main(["fid", str(samples_npz), str(ref_npz), "--metric", "fashion_mnist", "--device", "cpu", "--no-extra"])
    assert "mean_feature_distance" not in capsys.readouterr().out
