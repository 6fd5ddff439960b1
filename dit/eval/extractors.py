"""The feature extractors a metric can be measured in, chosen by name (``--metric`` of ``python -m dit.eval``,
``training.fid_metric``): the network that turns images into (features, logits). The metrics themselves
(FID, IS, KID, ...) are in dit.eval.metrics; each is computed in the chosen extractor's feature space.

An entry names itself, says what its logits classify (which decides the metrics that read logits: Inception
Score for ImageNet logits, class consistency for the dataset's own classes), and builds the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dit.eval.domain import FashionFeatures
from dit.eval.inception import InceptionFeatures
from dit.registry import Registry

__all__ = ["EXTRACTORS", "ExtractorSpec", "make_extractor"]


class InceptionExtractor:
    """Inception-v3 pool3 features (FID's standard, torch-fidelity's network, dit.eval.inception)."""

    name = "inception"
    logits_of = "imagenet"  # 1008 ImageNet logits: the Inception Score

    @staticmethod
    def build(inception_weights: str | None = None, domain_classifier: str | None = None) -> torch.nn.Module:
        return InceptionFeatures(inception_weights)


class FashionMNISTExtractor:
    """The shipped Fashion-MNIST classifier's 128-d features (dit.eval.domain), or another classifier file."""

    name = "fashion_mnist"
    logits_of = "dataset"  # the dataset's own 10 classes: class consistency

    @staticmethod
    def build(inception_weights: str | None = None, domain_classifier: str | None = None) -> torch.nn.Module:
        return FashionFeatures(domain_classifier)


EXTRACTORS = Registry("feature extractor", [InceptionExtractor, FashionMNISTExtractor])


def make_extractor(name: str, inception_weights=None, device="cpu", domain_classifier=None) -> torch.nn.Module:
    """The network of extractor ``name``, in eval mode on ``device``: uint8 images -> (features, logits).
    inception_weights / domain_classifier: another weights file for the Inception / Fashion-MNIST network."""
    return EXTRACTORS[name].build(inception_weights, domain_classifier).to(device).eval()


@dataclass(frozen=True)
class ExtractorSpec:
    """Which network a metric is measured in: an extractor of EXTRACTORS by name, and where another weights file
    than its default is wanted, that file (inception_weights: Inception's, default from the torch hub cache;
    domain_classifier: the Fashion-MNIST classifier's, default the shipped one)."""

    name: str = "inception"
    inception_weights: str | None = None
    domain_classifier: str | None = None

    def build(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        return make_extractor(self.name, self.inception_weights, device, self.domain_classifier)
