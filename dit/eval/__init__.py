"""Evaluation: FID compatible with the standard tools (torch-fidelity's Inception), a Fashion-MNIST
domain metric, reference statistics. Independent of the trainer: python -m dit.eval ref|fid ..."""

from dit.eval.frechet import frechet_distance
from dit.eval.stats import ImageSource, Stats, extract_features, fid, inception_score, stats_from_features

METRICS = ("inception", "fashion_mnist")


def make_extractor(metric: str, inception_weights=None, device="cpu", domain_classifier=None):
    """The feature network of a metric: "inception" (FID) or "fashion_mnist" (domain FID, the shipped
    classifier unless domain_classifier names another file)."""
    if metric == "inception":
        from dit.eval.inception import InceptionFeatures

        return InceptionFeatures(inception_weights).to(device).eval()
    if metric == "fashion_mnist":
        from dit.eval.domain import FashionFeatures

        return FashionFeatures(domain_classifier).to(device).eval()
    raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")


__all__ = [
    "METRICS",
    "ImageSource",
    "Stats",
    "extract_features",
    "fid",
    "frechet_distance",
    "inception_score",
    "make_extractor",
    "stats_from_features",
]
