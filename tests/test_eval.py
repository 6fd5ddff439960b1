"""FID: the Frechet distance against independent references, the Inception path end to end with a
random weights file under the expected name (offline), reference files, the domain classifier."""

from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch

from dit.eval import ImageSource, Stats, fid, frechet_distance, stats_from_features
from dit.eval.__main__ import main as eval_main

FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist not installed (make setup)")


def scipy_fid(mu1, s1, mu2, s2):
    """The textbook computation (pytorch-fid's), float64, with scipy's sqrtm."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def random_stats(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + shift
    return feats.mean(0), np.cov(feats, rowvar=False)


@pytest.mark.parametrize("n,d", [(500, 32), (2000, 64), (40, 64)])  # the last: singular covariances
def test_frechet_distance_against_scipy_and_torch_fidelity(n, d):
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    (mu1, s1), (mu2, s2) = random_stats(n, d, 0), random_stats(n, d, 1, shift=0.5)
    ours = frechet_distance(mu1, s1, mu2, s2)
    theirs = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)["frechet_inception_distance"]
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
    with mock.patch.object(torch, "load", return_value={}), mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"):
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    torch.save(net.state_dict(), home / "hub" / "checkpoints" / WEIGHTS_NAME)
    return home


def test_missing_inception_weights_explain_what_to_get(tmp_path, monkeypatch):
    from dit.eval.inception import InceptionFeatures

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"95,628,359 bytes, SHA256 6726825d0af5f729.*hub/checkpoints"):
        InceptionFeatures()


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
    out = capsys.readouterr().out
    assert "wrote" in out and "fid=" in out and "inception_score=" in out
    ref = Stats.load(tmp_path / "ref.npz", "unused")
    assert ref.count == 6 and ref.mu.shape == (2048,) and ref.extractor.startswith("inception-v3-compat")


@needs_fmnist
def test_domain_classifier_accuracy_and_metric(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    from dit.eval import extract_features, make_extractor

    extractor = make_extractor("fashion_mnist")
    assert extractor.test_accuracy >= 0.88  # stated in the README: 0.892 after 2 seeded epochs
    test = ImageSource("fashion_mnist:test")
    test.array, test.labels = test.array[:2000], test.labels[:2000]
    feats, logits = extract_features(test, extractor, 500, progress=False)
    assert (logits.argmax(1) == test.labels).mean() >= 0.88  # class consistency of real images
    train = ImageSource("fashion_mnist:train")
    train.array = train.array[:2000]
    real = fid(
        stats_from_features(feats, extractor.name),
        stats_from_features(extract_features(train, extractor, 500, progress=False)[0], extractor.name),
    )
    noise = ImageSource("fashion_mnist:test")
    noise.array = np.random.default_rng(0).integers(0, 256, (2000, 28, 28, 1), dtype=np.uint8)
    fake = fid(
        stats_from_features(extract_features(noise, extractor, 500, progress=False)[0], extractor.name),
        stats_from_features(feats, extractor.name),
    )
    assert real < 0.05 * fake  # train vs test images are close; noise is far


@needs_fmnist
def test_one_evaluator_for_training_and_the_cli(tmp_path, capsys):
    """The Evaluator the loop uses (in-memory images, one process) gives the numbers `python -m dit.eval
    fid` prints for the same images as an npz; a damaged reference cache is rebuilt with a warning."""
    from dit.eval.evaluator import Evaluator
    from dit.sampling import save_npz_atomic

    test = ImageSource("fashion_mnist:test")
    images = torch.from_numpy(test.array[:300].copy())  # (N, 28, 28, 1) uint8, NHWC as generate() yields
    labels = torch.from_numpy(test.labels[:300].copy())
    labels[:30] = (labels[:30] + 1) % 10  # 10% wrong labels: class consistency 0.9
    cache = tmp_path / "fid_ref_fashion_mnist.npz"
    cache.write_bytes(b"not an npz")
    ev = Evaluator("fashion_mnist", "fashion_mnist:train", batch_size=128, cache=cache, distributed=False)
    with pytest.warns(UserWarning, match="cannot be read"):
        reference = ev.reference()
    assert reference.count == 60000 and Stats.load(cache, ev.extractor.name).count == 60000  # rebuilt and cached
    ours = ev.evaluate(images, labels)
    assert ours["class_consistency"] <= 0.9 and ours["class_consistency"] > 0.8

    save_npz_atomic(tmp_path / "s.npz", np.repeat(images.numpy(), 3, axis=-1), labels.numpy())
    eval_main(["fid", str(tmp_path / "s.npz"), str(cache), "--metric", "fashion_mnist", "--device", "cpu"])
    printed = dict(kv.split("=") for kv in capsys.readouterr().out.split(" (")[0].split())
    assert float(printed["fid"]) == pytest.approx(ours["fid"], abs=1e-4)  # printed to 4 decimals
    assert float(printed["class_consistency"]) == pytest.approx(ours["class_consistency"], abs=1e-4)
