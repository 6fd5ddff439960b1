"""Evaluation: FID compatible with the standard tools (torch-fidelity's Inception), a Fashion-MNIST
domain feature extractor, reference statistics, and the metrics beside FID (one registry,
dit.eval.metrics). Independent of the trainer: python -m dit.eval ref|fid ..."""

from dit.eval.extractors import EXTRACTORS, ExtractorSpec, make_extractor
from dit.eval.frechet import frechet_distance
from dit.eval.metrics import METRICS
from dit.eval.stats import ImageSource, Stats, extract_features, fid, stats_from_features

__all__ = [
    "EXTRACTORS",
    "METRICS",
    "ExtractorSpec",
    "ImageSource",
    "Stats",
    "extract_features",
    "fid",
    "frechet_distance",
    "make_extractor",
    "stats_from_features",
]
