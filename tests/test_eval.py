"""FID: the Frechet distance against independent references, the Inception path end to end with a
random weights file under the expected name (offline), reference files, the domain classifier."""

import json
import re
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch

from dit.data import fashion_mnist
from dit.eval import ImageSource, Stats, fid, frechet_distance, stats_from_features
from dit.eval.__main__ import main as eval_main

FMNIST = Path(fashion_mnist.ROOT) / "t10k-images-idx3-ubyte.gz"
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist not installed (make setup)")


def scipy_fid(mu1, s1, mu2, s2):
    """The textbook computation (pytorch-fid's), float64, with scipy's sqrtm."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def parse_line(line: str) -> dict:
    """The documented text output of python -m dit.eval: one line of key=value tokens."""
    return dict(token.split("=", 1) for token in line.split())


def random_stats(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + shift
    return feats.mean(0), np.cov(feats, rowvar=False)


@pytest.mark.parametrize("n,d", [(500, 32), (2000, 64), (40, 64)])  # the last: singular covariances
def test_frechet_distance_against_scipy_and_torch_fidelity(n, d):
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    (mu1, s1), (mu2, s2) = random_stats(n, d, 0), random_stats(n, d, 1, shift=0.5)
    ours = frechet_distance(mu1, s1, mu2, s2)
    theirs = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)[
        "frechet_inception_distance"
    ]
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert ours == pytest.approx(scipy_fid(mu1, s1, mu2, s2), rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6 * np.trace(s1))


def test_few_samples_warn():
    feats = np.random.default_rng(0).normal(size=(10, 32))
    with pytest.warns(UserWarning, match="from 10 samples of 32-dim features is unreliable.*more than 32"):
        stats_from_features(feats, "x")


def test_stats_round_trip_and_adm_reference(tmp_path):
    mu, sigma = random_stats(100, 8, 0)
    Stats(mu, sigma, 100, "inception-v3-compat/2015-12-05/pool3-2048").save(tmp_path / "ref.npz")
    back = Stats.load(tmp_path / "ref.npz", default_extractor="unused")
    assert back.count == 100 and back.extractor.startswith("inception") and np.array_equal(back.sigma, sigma)
    np.savez(tmp_path / "adm.npz", mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))  # ADM: mu/sigma only
    adm = Stats.load(tmp_path / "adm.npz", default_extractor="inception-v3-compat/2015-12-05/pool3-2048")
    assert fid(adm, back) == pytest.approx(0.0, abs=1e-4)


def test_reference_from_another_extractor_is_refused():
    mu, sigma = random_stats(50, 4, 0)
    with pytest.raises(ValueError, match="different feature extractors: fashion-mnist-cnn-v1/fc1-128 vs inception"):
        fid(Stats(mu, sigma, 50, "fashion-mnist-cnn-v1/fc1-128"), Stats(mu, sigma, 50, "inception-v3-compat"))


def test_bad_npz_images(tmp_path):
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"arr_0 must be uint8 \(N, H, W, 1 or 3\) images, got float32"):
        ImageSource(str(tmp_path / "float.npz"))
    np.savez(tmp_path / "chw.npz", arr_0=np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"got uint8 \(2, 3, 8, 8\)"):
        ImageSource(str(tmp_path / "chw.npz"))
    with pytest.raises(FileNotFoundError, match="not an image folder, npz or dataset name"):
        ImageSource(str(tmp_path / "nothing"))


@pytest.fixture(scope="module")
def random_inception_home(tmp_path_factory):
    """TORCH_HOME holding a randomly initialised Inception state dict under the official file name."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from dit.eval.inception import WEIGHTS_NAME

    home = tmp_path_factory.mktemp("torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    # Build the network without any weights file: no file read, no state dict loaded.
    with (
        mock.patch.object(torch, "load", return_value={}),
        mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"),
    ):
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    torch.save(net.state_dict(), home / "hub" / "checkpoints" / WEIGHTS_NAME)
    return home


def test_missing_inception_weights_explain_what_to_get(tmp_path, monkeypatch):
    from dit.eval.inception import InceptionFeatures

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"95,628,359 bytes, SHA256 6726825d0af5f729.*hub/checkpoints"):
        InceptionFeatures()


def test_inception_weights_are_found_where_torch_hub_looks(tmp_path, monkeypatch):
    """The weights are looked up in torch.hub.get_dir()/checkpoints, as torch and torch-fidelity do: $XDG_CACHE_HOME
    without $TORCH_HOME, and a $TORCH_HOME given as ~/...; a missing file's error names that directory."""
    from dit.eval.inception import WEIGHTS_NAME, find_weights

    def weights_in(checkpoints: Path) -> Path:
        checkpoints.mkdir(parents=True)
        (checkpoints / WEIGHTS_NAME).write_bytes(b"not the real weights")  # found by name; loading is tested below
        return checkpoints / WEIGHTS_NAME

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TORCH_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with pytest.raises(FileNotFoundError, match=f"Put it in {re.escape(str(tmp_path / 'xdg/torch/hub/checkpoints'))}/"):
        find_weights()
    assert weights_in(tmp_path / "xdg" / "torch" / "hub" / "checkpoints") == find_weights()
    monkeypatch.setenv("TORCH_HOME", "~/th")  # ahead of XDG_CACHE_HOME; ~ is the home directory
    with pytest.raises(FileNotFoundError, match=f"Put it in {re.escape(str(tmp_path / 'home/th/hub/checkpoints'))}/"):
        find_weights()
    assert weights_in(tmp_path / "home" / "th" / "hub" / "checkpoints") == find_weights()


@pytest.mark.slow  # ~13 s: Inception-v3 on the CPU
def test_inception_path_end_to_end(random_inception_home, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(random_inception_home))
    from dit.eval.inception import InceptionFeatures

    net = InceptionFeatures()
    assert not net.official  # a random file of the right format, not the real weights
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    feats, logits = net(images)
    assert feats.shape == (3, 2048) and logits.shape == (3, 1008) and torch.isfinite(feats).all()
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", arr_0=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), arr_1=np.arange(6))
    np.savez(tmp_path / "b.npz", arr_0=rng.integers(0, 256, (6, 16, 16, 1), dtype=np.uint8))
    with pytest.warns(UserWarning, match="unreliable"):
        eval_main(["ref", str(tmp_path / "b.npz"), "-o", str(tmp_path / "ref.npz"), "--batch-size", "4"])
        eval_main(["fid", str(tmp_path / "a.npz"), str(tmp_path / "ref.npz"), "--batch-size", "4"])
    ref_line, fid_line = capsys.readouterr().out.splitlines()  # stdout: one result line per command, nothing else
    assert parse_line(ref_line) == {"out": str(tmp_path / "ref.npz"), "samples": "6", "extractor": net.name}
    assert {"fid", "inception_score", "inception_score_std", "samples", "extractor"} <= set(parse_line(fid_line))
    ref = Stats.load(tmp_path / "ref.npz", "unused")
    assert ref.count == 6 and ref.mu.shape == (2048,) and ref.extractor.startswith("inception-v3-compat")


@needs_fmnist
def test_shipped_domain_classifier_accuracy_and_metric():
    from dit.eval import extract_features, make_extractor
    from dit.eval.domain import EXTRACTOR, WEIGHTS_SHA256

    extractor = make_extractor("fashion_mnist")
    assert extractor.sha256 == WEIGHTS_SHA256 and extractor.name == EXTRACTOR and WEIGHTS_SHA256[:12] in EXTRACTOR
    test = ImageSource("fashion_mnist:test")
    feats, logits = extract_features(test, extractor, 1000, progress=False)
    accuracy = (logits.argmax(1) == test.labels).mean()
    assert accuracy == pytest.approx(extractor.test_accuracy, abs=1e-4)  # the accuracy its file records, measured again
    assert accuracy >= 0.88  # stated in the README
    train = ImageSource("fashion_mnist:train")
    train.array = train.array[:2000]
    real = fid(
        stats_from_features(feats[:2000], extractor.name),
        stats_from_features(extract_features(train, extractor, 1000, progress=False)[0], extractor.name),
    )
    noise = ImageSource("fashion_mnist:test")
    noise.array = np.random.default_rng(0).integers(0, 256, (2000, 28, 28, 1), dtype=np.uint8)
    fake = fid(
        stats_from_features(extract_features(noise, extractor, 1000, progress=False)[0], extractor.name),
        stats_from_features(feats[:2000], extractor.name),
    )
    assert real < 0.05 * fake  # train vs test images are close; noise is far


DOMAIN_REFERENCE = Path(__file__).parent / "data" / "domain_features.npz"


@needs_fmnist
@pytest.mark.parametrize("threads", [1, 2])
def test_domain_metric_is_the_same_function_on_every_thread_count(threads):
    """The shipped classifier's features and logits of fixed test images, and the domain FID of two fixed image
    sets, against values stored when the weights were shipped (tests/data/domain_features.npz, written by
    tests/helpers/domain_reference.py): with 1 and with 2 threads, the metric is one function."""
    from helpers.domain_reference import compute

    from dit.eval import make_extractor

    stored = np.load(DOMAIN_REFERENCE)
    assert str(stored["extractor"]) == make_extractor("fashion_mnist").name  # the values belong to the shipped weights
    now = compute(threads, index=stored["index"])
    # float32 convolutions: the order of sums may differ with the thread count, at the 1e-6 level
    np.testing.assert_allclose(now["features"], stored["features"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(now["logits"], stored["logits"], rtol=1e-4, atol=1e-4)
    value = float(now["fid_test1000_train1000"])
    assert value == pytest.approx(float(stored["fid_test1000_train1000"]), rel=1e-5)


def test_statistics_of_another_classifier_are_refused(tmp_path):
    """A reference file records the classifier's hash (in its extractor name): one made with another
    classifier, or with the earlier, locally trained and unhashed one, is refused with both names."""
    from dit.eval.domain import EXTRACTOR, extractor_name

    mu, sigma = random_stats(200, 128, 0)
    Stats(mu, sigma, 200, extractor_name("0" * 64)).save(tmp_path / "other.npz")
    Stats(mu, sigma, 200, "fashion-mnist-cnn-v1/fc1-128").save(
        tmp_path / "old.npz"
    )  # before the classifier was shipped
    ours = Stats(mu, sigma, 200, EXTRACTOR)
    for name in ("other.npz", "old.npz"):
        other = Stats.load(tmp_path / name, default_extractor=EXTRACTOR)
        with pytest.raises(
            ValueError, match=f"different feature extractors: {re.escape(EXTRACTOR)} vs {re.escape(other.extractor)}"
        ):
            fid(ours, other)


@needs_fmnist
def test_a_reference_cache_of_another_classifier_is_recomputed(tmp_path):
    from dit.eval.evaluator import Evaluator

    cache = tmp_path / "fid_ref_fashion_mnist.npz"
    mu, sigma = random_stats(200, 128, 0)
    Stats(mu, sigma, 200, "fashion-mnist-cnn-v1/fc1-128").save(cache)  # a training run's cache from before
    ev = Evaluator("fashion_mnist", "fashion_mnist:test", batch_size=1000, cache=cache, distributed=False)
    with pytest.warns(UserWarning, match="from another feature extractor"):
        reference = ev.reference()
    assert reference.extractor == ev.extractor.name and Stats.load(cache, "unused").extractor == ev.extractor.name


@needs_fmnist
def test_one_evaluator_for_training_and_the_cli(tmp_path, capsys):
    """The Evaluator the loop uses (in-memory images, one process) gives the numbers `python -m dit.eval
    fid` prints for the same images as an npz; a damaged reference cache is rebuilt with a warning."""
    from dit.eval.evaluator import Evaluator, TensorSource
    from dit.sampling import save_npz_atomic

    test = ImageSource("fashion_mnist:test")
    images = torch.from_numpy(test.array[:300].copy())  # (N, 28, 28, 1) uint8, NHWC as generate() yields
    labels = torch.from_numpy(test.labels[:300].copy())
    labels[:30] = (labels[:30] + 1) % 10  # 10% wrong labels: class consistency 0.9
    cache = tmp_path / "fid_ref_fashion_mnist.npz"
    cache.write_bytes(b"not an npz")
    ev = Evaluator("fashion_mnist", "fashion_mnist:test", batch_size=500, cache=cache, distributed=False)
    with pytest.warns(UserWarning, match="cannot be read"):
        reference = ev.reference()
    assert reference.count == 10000 and Stats.load(cache, ev.extractor.name).count == 10000  # rebuilt and cached
    ours = ev.evaluate(images, labels)
    assert ours["class_consistency"] <= 0.9 and ours["class_consistency"] > 0.8
    # per class: the share of class-k images the classifier calls k, from its own predictions
    _, logits = ev.features(TensorSource(images, labels))
    predicted, y = np.asarray(logits).argmax(1), labels.numpy()
    expected = [float((predicted[y == k] == k).mean()) for k in range(10)]
    assert ours["class_consistency_per_class"] == pytest.approx(expected, abs=1e-12)
    assert ours["class_consistency_min"] == min(expected) and min(expected) < max(expected)

    save_npz_atomic(tmp_path / "s.npz", np.repeat(images.numpy(), 3, axis=-1), labels.numpy())
    args = ["fid", str(tmp_path / "s.npz"), str(cache), "--metric", "fashion_mnist", "--device", "cpu"]
    eval_main(args)
    (line,) = capsys.readouterr().out.splitlines()  # stdout: the result line and nothing else
    printed = parse_line(line)
    assert float(printed["fid"]) == pytest.approx(ours["fid"], abs=1e-4)  # printed to 4 decimals
    assert float(printed["class_consistency"]) == pytest.approx(ours["class_consistency"], abs=1e-4)
    printed_per_class = [float(v) for v in printed["class_consistency_per_class"].split(",")]
    assert printed_per_class == pytest.approx(expected, abs=5e-4)  # printed to 3 decimals
    assert printed["samples"] == "300" and printed["extractor"] == ev.extractor.name
    eval_main([*args, "--json"])
    as_json = json.loads(capsys.readouterr().out)
    assert as_json["fid"] == pytest.approx(ours["fid"], rel=1e-12) and as_json[
        "class_consistency_per_class"
    ] == pytest.approx(expected)
    assert as_json["samples"] == 300 and as_json["extractor"] == ev.extractor.name


# --- KID, precision/recall and Inception Score beside FID (torch-fidelity's functions on our features) ---


def kid_float64(x, y):
    """Unbiased MMD^2 with the cubic polynomial kernel k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018), float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, d = len(x), x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))  # i != j
    return within - 2 * kxy.mean()


class StubFeatures(torch.nn.Module):
    """A cheap feature extractor: a fixed random projection of the pixels to 16 dims; logits = first 10."""

    name = "stub/16"

    def __init__(self):
        super().__init__()
        self.proj = torch.randn(3 * 8 * 8, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def forward(self, images):
        f = (images.double() / 255).flatten(1) @ self.proj
        return f, f[:, :10]


class StubExtractor:
    """The registry entry of StubFeatures: its logits classify nothing (no Inception Score, no class consistency)."""

    name, logits_of = "stub", None

    @staticmethod
    def build(inception_weights=None, domain_classifier=None):
        return StubFeatures()


@pytest.fixture
def stub_evaluator():
    """Evaluator("stub", ..., extra_metrics=...) with StubFeatures, registered as an extractor for the test."""
    from dit.eval.evaluator import Evaluator
    from dit.eval.extractors import EXTRACTORS

    EXTRACTORS.add(StubExtractor)
    yield lambda ref=None, **kwargs: Evaluator("stub", ref, distributed=False, **kwargs)
    EXTRACTORS.remove(StubExtractor.name)


def kid_precision_recall(fake, real):
    """The KID and precision/recall metrics of sample features ``fake`` against reference features ``real``."""
    from dit.eval.metrics import KID, Inputs, PrecisionRecall

    inputs = Inputs(features=fake, reference_features=real)
    return KID().compute(inputs) | PrecisionRecall().compute(inputs)


def test_kid_formula_without_subsets_and_with_torch_fidelity_subsets():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 16)), rng.normal(size=(40, 16)) * 1.2 + 0.3
    # Equal sets of fewer than 1000: every subset is the whole set (permuted), so KID is the formula itself.
    ours = kid_precision_recall(x, y)
    assert ours["kid"] == pytest.approx(kid_float64(x, y), rel=1e-9) and ours["kid_std"] == pytest.approx(0, abs=1e-9)
    assert ours["kid"] > 0.01 and kid_precision_recall(x, x)["kid"] == pytest.approx(kid_float64(x, x), abs=1e-12)
    # Unequal sets: torch-fidelity draws 100 subsets of the smaller size with RandomState(2020), in this order.
    y = rng.normal(size=(70, 16)) * 1.2 + 0.3
    pick = np.random.RandomState(2020)
    subsets = [
        kid_float64(x[pick.choice(40, 40, replace=False)], y[pick.choice(70, 40, replace=False)]) for _ in range(100)
    ]
    ours = kid_precision_recall(x, y)
    assert ours["kid"] == pytest.approx(np.mean(subsets), rel=1e-9) and ours["kid_std"] == pytest.approx(
        np.std(subsets), rel=1e-9
    )


def test_precision_recall_see_fidelity_and_mode_collapse():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 16))
    same = kid_precision_recall(real, real)
    assert same["precision"] == 1.0 and same["recall"] == 1.0  # every point lies in its own k-NN ball
    collapsed = real[:5].repeat(40, 0) + 0.01 * rng.normal(size=(200, 16))  # 5 modes of the reference
    pr = kid_precision_recall(collapsed, real)
    assert pr["precision"] > 0.9 and pr["recall"] < 0.2  # realistic samples, little of the reference covered
    assert pr["kid"] > same["kid"] + 0.1


def test_extra_metrics_need_reference_images_and_are_off_for_training(stub_evaluator, tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (60, 8, 8, 3), dtype=np.uint8))
    np.savez(
        tmp_path / "samples.npz", arr_0=rng.integers(0, 200, (50, 8, 8, 3), dtype=np.uint8), arr_1=np.arange(50) % 10
    )
    ref_images = torch.from_numpy(np.load(tmp_path / "ref.npz")["arr_0"]).permute(0, 3, 1, 2)
    stats_from_features(StubFeatures()(ref_images)[0].numpy(), StubFeatures.name).save(tmp_path / "ref_stats.npz")
    images = torch.from_numpy(np.load(tmp_path / "samples.npz")["arr_0"])
    extra = stub_evaluator(str(tmp_path / "ref.npz"), extra_metrics=True).evaluate(images)
    assert set(extra) == {"fid", "kid", "kid_std", "precision", "recall"}
    training = stub_evaluator(str(tmp_path / "ref.npz")).evaluate(images)  # the loop's Evaluator: extra_metrics=False
    assert set(training) == {"fid"} and training["fid"] == pytest.approx(extra["fid"])
    stats_only = stub_evaluator(str(tmp_path / "ref_stats.npz"), extra_metrics=True)
    assert set(stats_only.evaluate(images)) == {"fid"}
    skipped = stats_only.evaluation(images).skipped
    assert set(skipped) == {"KID", "precision and recall"} and "is statistics only (mu, sigma)" in skipped["KID"]
    eval_main(["fid", str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), "--metric", "stub", "--device", "cpu"])
    eval_main(
        ["fid", str(tmp_path / "samples.npz"), str(tmp_path / "ref_stats.npz"), "--metric", "stub", "--device", "cpu"]
    )
    captured = capsys.readouterr()
    with_images, with_stats = map(parse_line, captured.out.splitlines())  # one result line per command
    assert float(with_images["kid"]) == pytest.approx(extra["kid"], abs=1e-6)
    assert float(with_images["recall"]) == pytest.approx(extra["recall"])
    assert "kid" not in with_stats and "fid" in with_stats
    assert "KID, precision and recall not computed: the reference" in captured.err  # a note, not a result


@pytest.mark.slow  # Inception on CPU for both image sets (~25 s alone); the Inception path itself stays in make test
def test_inception_is_kid_precision_recall_against_reference_images(
    random_inception_home, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("TORCH_HOME", str(random_inception_home))
    from torch_fidelity.metric_isc import isc_features_to_metric

    from dit.eval.evaluator import Evaluator

    rng = np.random.default_rng(1)
    np.savez(tmp_path / "a.npz", arr_0=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    np.savez(tmp_path / "b.npz", arr_0=rng.integers(0, 128, (8, 32, 32, 3), dtype=np.uint8))
    with pytest.warns(UserWarning, match="unreliable"):  # 8 images of 2048-d features: only the path is tested
        ev = Evaluator("inception", str(tmp_path / "b.npz"), distributed=False, extra_metrics=True)
        features, logits, _ = ev.extract(str(tmp_path / "a.npz"))
        ours = ev.measure(stats_from_features(features, ev.extractor.name), logits, None, features).values
        eval_main(["fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--batch-size", "8", "--device", "cpu"])
    assert ours["kid"] == pytest.approx(kid_float64(features, ev._reference_features), rel=1e-6)  # 8 vs 8: no subsets
    assert ours["inception_score"] == isc_features_to_metric(torch.from_numpy(logits), splits=8)["inception_score_mean"]
    assert 0 <= ours["precision"] <= 1 and 0 <= ours["recall"] <= 1
    printed = parse_line(capsys.readouterr().out)
    metrics = {"fid", "inception_score", "inception_score_std", "kid", "kid_std", "precision", "recall"}
    assert set(printed) == metrics | {"samples", "extractor"}
    assert float(printed["kid"]) == pytest.approx(ours["kid"], abs=1e-6) and float(printed["fid"]) == pytest.approx(
        ours["fid"], abs=1e-4
    )


def test_saving_the_shipped_classifier_gives_the_shipped_file(tmp_path):
    """The writer is canonical: the shipped weights saved again are the shipped file, byte for byte, in any
    process (safetensors alone writes the header's metadata in an order that changes between processes)."""
    import subprocess
    import sys

    from dit.eval.domain import WEIGHTS_SHA256, load_classifier, save_classifier

    model, accuracy, _ = load_classifier()
    assert save_classifier(model, accuracy, tmp_path / "again.safetensors", threads=1) == WEIGHTS_SHA256
    code = (
        "import sys; from dit.eval.domain import load_classifier, save_classifier; m, a, _ = load_classifier(); "
        "print(save_classifier(m, a, sys.argv[1], threads=1))"
    )
    for i in range(2):  # other processes, other hash seeds
        out = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / f"{i}.safetensors")], capture_output=True, text=True
        )
        assert out.stdout.strip() == WEIGHTS_SHA256, out.stderr[-1000:]


@pytest.mark.slow  # trains the classifier from scratch: ~2 min on one core
@needs_fmnist
def test_the_documented_recipe_remakes_the_shipped_classifier(tmp_path):
    """`python -m dit.eval train-domain-classifier` is how the shipped file was made: with the recipe's one
    thread and the torch version its metadata records it gives the same file, byte for byte; with another
    torch version, a classifier of the same quality (whose figures carry its own hash)."""
    import subprocess
    import sys

    from safetensors import safe_open

    from dit.eval.domain import WEIGHTS, WEIGHTS_SHA256

    out = tmp_path / "remade.safetensors"
    cmd = [sys.executable, "-m", "dit.eval", "train-domain-classifier", "-o", str(out), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)  # stdout: the result only; the epochs' progress went to stderr
    assert "epoch 2/2" in proc.stderr and result["test_accuracy"] >= 0.88
    with safe_open(str(WEIGHTS), "pt") as f:
        shipped_torch = f.metadata()["torch"]
    if shipped_torch == torch.__version__:
        assert result["sha256"] == WEIGHTS_SHA256
