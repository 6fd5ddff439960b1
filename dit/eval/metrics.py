"""The metrics an Evaluator reports, one class each, in one registry (like edm2's metric dict).

A metric names the inputs it reads (fields of ``Inputs``), computes its values from them, and lists the
keys it writes. The Evaluator extracts features once and runs every registered metric whose inputs are
there; `python -m dit.eval fid` prints what it returns, and the training loop logs it to metrics.jsonl.
IS, KID and precision/recall are torch-fidelity's own functions on our features.

Adding one (see docs/extending.md): a class with ``name``, ``keys``, ``needs`` and ``compute``, and one
entry in the METRICS list at the bottom (or ``METRICS.add(MyMetric)`` from outside).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dit.eval.stats import Stats, fid
from dit.registry import Registry

__all__ = ["METRICS", "Inputs", "Metric", "metric_keys", "value_format"]

KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torch-fidelity's defaults; the subset shrinks to the smaller set
PRC_NEIGHBORHOOD = 3  # k of the k-NN manifolds (Kynkaenniemi et al. 2019; ADM's evaluator and torch-fidelity)

# Keys the training loop writes beside the metrics in an evaluation record of metrics.jsonl.
SAMPLE_COUNT = "fid_n"  # how many samples were measured (FID depends on the count)


@dataclass(frozen=True)
class Inputs:
    """What the Evaluator extracted from the samples and the reference; a field is None when it cannot be had,
    and ``missing`` says why (in words that follow "<metric> not computed: ")."""

    samples: Stats | None = None  # the samples' feature statistics (mu, sigma, count)
    reference: Stats | None = None  # the reference's
    features: np.ndarray | None = None  # the samples' features (N, D); None when the samples are a stats npz
    reference_features: np.ndarray | None = None  # the reference's (M, D): only with extra_metrics and images
    logits: np.ndarray | None = None  # the extractor's classifier head on the samples (N, K)
    labels: np.ndarray | None = None  # the class each sample was drawn for (N,)
    device: torch.device | str = "cpu"
    missing: dict[str, str] = field(default_factory=dict)


class Metric:
    """One metric. Subclasses set the class attributes and implement ``compute``.

    name: the registry key. title: how a note names it ("KID not computed: ..."). keys: what compute returns,
    in order. needs: the Inputs fields it reads (it is skipped, with the reason, when one is None).
    logits_of: the metric reads logits of this kind: for any other extractor it does not apply (silently).
    opt_in: only with Evaluator(extra_metrics=True) (it needs the reference's features, costly in training).
    min_samples: the fewest samples (and reference features) it takes. format: its floats in the CLI's text
    output. plot: key -> axis label of the values drawn against step in a run's fid.png."""

    name: str
    title: str
    keys: tuple[str, ...]
    needs: tuple[str, ...] = ()
    logits_of: str | None = None
    opt_in: bool = False
    min_samples: int = 0
    format: str = ".4f"
    plot: dict[str, str] = {}

    def applies(self, logits_of: str | None) -> bool:
        """Whether it is measured with an extractor whose logits classify ``logits_of`` (see dit.eval.extractors)."""
        return self.logits_of is None or self.logits_of == logits_of

    def unavailable(self, inputs: Inputs) -> str | None:
        """Why it cannot be computed from these inputs (None: it can)."""
        for need in self.needs:
            if getattr(inputs, need) is None:
                return inputs.missing.get(need, f"no {need}")
        sizes = [len(x) for x in (inputs.features, inputs.reference_features) if x is not None]
        if self.min_samples and min(sizes, default=0) < self.min_samples:
            return f"they need more than {self.min_samples - 1} images in each set"
        return None

    def compute(self, inputs: Inputs) -> dict[str, Any]:
        raise NotImplementedError


class FID(Metric):
    """The Frechet distance between the samples' and the reference's feature statistics (Heusel et al. 2017)."""

    name, title, keys = "fid", "FID", ("fid",)
    needs = ("samples", "reference")
    plot = {"fid": "FID"}

    def compute(self, inputs: Inputs) -> dict[str, float]:
        return {"fid": fid(inputs.samples, inputs.reference)}


class InceptionScore(Metric):
    """exp(E KL(p(y|x) || p(y))) of Inception's ImageNet predictions (Salimans et al. 2016): torch-fidelity's,
    10 splits (fewer for fewer samples), mean and std."""

    name, title, keys = "inception_score", "Inception Score", ("inception_score", "inception_score_std")
    needs, logits_of = ("logits",), "imagenet"

    def compute(self, inputs: Inputs) -> dict[str, float]:
        from torch_fidelity.metric_isc import isc_features_to_metric  # seconds to import: only when this is computed

        logits = torch.from_numpy(np.asarray(inputs.logits))
        isc = isc_features_to_metric(logits, splits=min(10, len(logits)))  # torch-fidelity's 10 splits (and shuffle)
        return {"inception_score": isc["inception_score_mean"], "inception_score_std": isc["inception_score_std"]}


class ClassConsistency(Metric):
    """The share of class-k samples the dataset's own classifier calls k: overall, the worst class ("every class
    recognisable" is a statement about this one, not about the mean), and per class as a list by class id
    (None: no sample of that class; a list, so metrics.jsonl only: trackers take scalars)."""

    name, title = "class_consistency", "class consistency"
    keys = ("class_consistency", "class_consistency_min", "class_consistency_per_class")
    needs, logits_of = ("logits", "labels"), "dataset"
    plot = {"class_consistency": "class consistency"}

    def compute(self, inputs: Inputs) -> dict[str, float | list]:
        labels = np.asarray(inputs.labels)
        hit = np.asarray(inputs.logits).argmax(1) == labels
        per_class = {int(k): float(hit[labels == k].mean()) for k in np.unique(labels)}
        return {
            "class_consistency": float(hit.mean()),
            "class_consistency_min": min(per_class.values()),
            "class_consistency_per_class": [per_class.get(k) for k in range(max(per_class) + 1)],
        }


class KID(Metric):
    """Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel, mean
    and std over torch-fidelity's 100 subsets of (at most) 1000."""

    name, title, keys = "kid", "KID", ("kid", "kid_std")
    needs, opt_in, format = ("features", "reference_features"), True, ".6f"
    min_samples = PRC_NEIGHBORHOOD + 1  # as when KID and precision/recall were one group (the estimate needs 2)

    def compute(self, inputs: Inputs) -> dict[str, float]:
        from torch_fidelity.metric_kid import kid_features_to_metric  # seconds to import: only when this is computed

        fake, real = (torch.from_numpy(np.asarray(x)) for x in (inputs.features, inputs.reference_features))
        size = min(KID_SUBSET_SIZE, len(fake), len(real))
        kid = kid_features_to_metric(fake, real, kid_subsets=KID_SUBSETS, kid_subset_size=size, verbose=False)
        return {"kid": kid["kernel_inception_distance_mean"], "kid_std": kid["kernel_inception_distance_std"]}


class PrecisionRecall(Metric):
    """k-NN precision (share of samples inside the reference's manifold) and recall (share of the reference inside
    the samples'), Kynkaenniemi et al. (2019), by torch-fidelity's function.

    They depend on the set sizes (the k-NN radii shrink as a set grows), so the larger set is cut to a seeded
    random subset as large as the other, as in the paper."""

    name, title, keys = "precision_recall", "precision and recall", ("precision", "recall")
    needs, opt_in, min_samples = ("features", "reference_features"), True, PRC_NEIGHBORHOOD + 1

    def compute(self, inputs: Inputs) -> dict[str, float]:
        from torch_fidelity.metric_prc import prc_features_to_metric  # seconds to import: only when this is computed

        fake, real = (torch.from_numpy(np.asarray(x)) for x in (inputs.features, inputs.reference_features))
        n, rng = min(len(fake), len(real)), np.random.default_rng(0)
        fake, real = (x if len(x) == n else x[rng.choice(len(x), n, replace=False)] for x in (fake, real))
        fake, real = fake.to(inputs.device), real.to(inputs.device)
        # save_cpu_ram: k-NN distances in (10,000 x N) blocks instead of one (N x N) matrix
        prc = prc_features_to_metric(fake, real, prc_neighborhood=PRC_NEIGHBORHOOD, save_cpu_ram=True, verbose=False)
        return {"precision": prc["precision"], "recall": prc["recall"]}


METRICS: Registry[Metric] = Registry("metric", [FID, InceptionScore, ClassConsistency, KID, PrecisionRecall])


def metric_keys() -> tuple[str, ...]:
    """Every key the registered metrics write, in registry order."""
    return tuple(key for metric in METRICS.values() for key in metric.keys)


def value_format(key: str) -> str:
    """The format of a metric key's floats in the CLI's text output (".4f" for keys no metric writes)."""
    return next((metric.format for metric in METRICS.values() if key in metric.keys), Metric.format)
