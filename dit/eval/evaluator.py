"""One evaluator for FID during training and ``python -m dit.eval fid``: reference statistics
(resolved from a stats npz, images or a dataset name, and cached), chunked feature extraction, and
every metric of the registry (dit.eval.metrics) that applies: FID, Inception Score for Inception,
class consistency for the domain extractor, and (opt-in, ``extra_metrics``) KID and precision/recall,
which need the reference's features, not only its statistics."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dit.eval.extractors import EXTRACTORS, ExtractorSpec
from dit.eval.metrics import METRICS, Inputs, Metric
from dit.eval.stats import ImageSource, Stats, extract_features, is_stats_file, stats_from_features

__all__ = ["Evaluation", "Evaluator", "TensorSource"]


@dataclass
class Evaluation:
    """One evaluation: the metrics' values (key -> value, in registry order), the metrics that apply but could not
    be computed (title -> why), and the samples' statistics (their count and extractor)."""

    values: dict[str, float | list]
    skipped: dict[str, str]
    samples: Stats


class TensorSource:
    """Images already in memory (uint8 (N, H, W, C) or (N, C, H, W)) with their labels, read like an ImageSource."""

    def __init__(self, images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | None = None):
        x = torch.as_tensor(images)
        self.images = x.permute(0, 3, 1, 2) if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3) else x
        self.labels = None if labels is None else torch.as_tensor(labels).cpu().numpy()

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, start: int, stop: int) -> torch.Tensor:
        x = self.images[start:stop]
        return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


class Evaluator:
    """FID (and the other metrics) of generated images against ``ref`` in the feature space of ``extractor``
    (an ExtractorSpec: a name in dit.eval.extractors.EXTRACTORS and its weights files; a name alone: its default
    weights).

    ref: a stats npz (ours or ADM's), an image folder / ADM npz, or a dataset name (fashion_mnist[:split]).
    cache: where reference statistics computed from images are kept (reused while it loads; a damaged
    cache is rebuilt with a warning). distributed: split extraction over the processes of an
    accelerate / torchrun launch (every process must call); False when one process evaluates alone.
    extra_metrics: also KID and precision/recall (the CLI's default; off in training, where they would
    cost the reference's features in memory and k-NN distances at every evaluation). They need the
    reference's images: a stats npz reference cannot give them (``Evaluation.skipped`` says why).
    """

    def __init__(
        self,
        extractor: ExtractorSpec | str = "inception",
        ref: str | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 250,
        cache: str | Path | None = None,
        distributed: bool = True,
        extra_metrics: bool = False,
    ):
        spec = extractor if isinstance(extractor, ExtractorSpec) else ExtractorSpec(extractor)
        self.kind, self.ref, self.device, self.batch_size = EXTRACTORS[spec.name], ref, device, batch_size
        self.cache, self.distributed, self.extra_metrics = Path(cache) if cache else None, distributed, extra_metrics
        self.extractor = spec.build(device)
        self._reference: Stats | None = None
        self._reference_features: np.ndarray | None = None  # (N, D), kept only for metrics that need them

    # --- features and statistics -----------------------------------------------------------------

    def features(self, source) -> tuple[np.ndarray, np.ndarray]:
        """(features (N, D), logits (N, K)) of every image of an ImageSource / TensorSource, in order."""
        if self.distributed:
            return extract_features(source, self.extractor, self.batch_size, self.device)
        feats, logits = [], []
        for start in range(0, len(source), self.batch_size):
            f, lg = self.extractor(source.batch(start, start + self.batch_size).to(self.device))
            feats.append(f.cpu().numpy())
            logits.append(lg.cpu().numpy())
        return np.concatenate(feats), np.concatenate(logits)

    def extract(self, spec: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(features (N, D), logits (N, K), labels or None) of images or a dataset name."""
        source = ImageSource(spec)
        features, logits = self.features(source)
        return features, logits, source.labels

    def stats(self, spec: str) -> tuple[Stats, np.ndarray | None, np.ndarray | None]:
        """(statistics, logits, labels) of a stats npz (no logits) or of images / a dataset name."""
        if is_stats_file(spec):
            return Stats.load(spec, default_extractor=self.extractor.name), None, None
        features, logits, labels = self.extract(spec)
        return stats_from_features(features, self.extractor.name), logits, labels

    def reference(self) -> Stats:
        """The reference statistics: from the cache when it loads, else computed (and cached)."""
        if self._reference is not None:
            return self._reference
        if not self.ref:
            raise ValueError(
                "FID needs a reference: a stats npz, an image folder / npz, or a dataset name (e.g. fashion_mnist)"
            )
        wanted = any("reference_features" in m.needs for m in self.asked())
        if wanted and not is_stats_file(self.ref):  # features wanted: the cache holds statistics only
            self._reference_features, _, _ = self.extract(self.ref)
            self._reference = stats_from_features(self._reference_features, self.extractor.name)
            if self.cache is not None:
                self._reference.save(self.cache)
            return self._reference
        if self.cache is not None and self.cache.exists():
            try:
                cached = Stats.load(self.cache, self.extractor.name)
                if cached.extractor == self.extractor.name:
                    self._reference = cached
                    return cached
                warnings.warn(
                    f"cached reference statistics {self.cache} are from another feature extractor ({cached.extractor}, "
                    f"not {self.extractor.name}); recomputing them",
                    stacklevel=2,
                )
            except (ValueError, OSError) as e:  # damaged (dit.integrity.DamagedFileError) or unreadable: only a cache
                warnings.warn(
                    f"cached reference statistics {self.cache} cannot be read ({e}); recomputing them", stacklevel=2
                )
        self._reference, _, _ = self.stats(self.ref)
        if self.cache is not None and not is_stats_file(self.ref):
            self._reference.save(self.cache)
        return self._reference

    # --- metrics ---------------------------------------------------------------------------------

    def asked(self) -> list[Metric]:
        """The registered metrics that apply to this extractor's logits (and, if opt-in, were asked for)."""
        metrics = [cls() for cls in METRICS.values()]
        return [m for m in metrics if m.applies(self.kind.logits_of) and (self.extra_metrics or not m.opt_in)]

    def measure(
        self,
        stats: Stats,
        logits: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        features: np.ndarray | None = None,
    ) -> Evaluation:
        """Every registered metric that applies and can be computed from these (FID always), in registry order:
        class consistency for the domain extractor, Inception Score for Inception, KID and precision/recall of the
        sample ``features`` (N, D) when extra_metrics is on and the reference's features can be had."""
        reference = self.reference()
        images = "the samples are statistics only (mu, sigma); they need the images"
        missing = {  # why a field a metric needs is missing
            "features": images,
            "logits": images,
            "labels": "the samples have no labels",
            "reference_features": f"the reference {self.ref} is statistics only (mu, sigma); "
            "they need its images (a folder, an npz with arr_0, a dataset name)",
        }
        inputs = Inputs(stats, reference, features, self._reference_features, logits, labels, self.device, missing)
        values, skipped = {}, {}
        for metric in self.asked():
            if (why := metric.unavailable(inputs)) is None:
                values |= metric.compute(inputs)
            else:
                skipped[metric.title] = why
        return Evaluation(values, skipped, stats)

    def evaluation(self, source, labels=None) -> Evaluation:
        """The metrics of a spec (stats npz, images, dataset name) or of in-memory uint8 images with labels."""
        if isinstance(source, str) and is_stats_file(source):
            return self.measure(self.stats(source)[0])
        if isinstance(source, str):
            source = ImageSource(source)
        elif not isinstance(source, (ImageSource, TensorSource)):
            source = TensorSource(source, labels)
        features, logits = self.features(source)
        labels = source.labels if labels is None else labels
        return self.measure(stats_from_features(features, self.extractor.name), logits, labels, features)

    def evaluate(self, source, labels=None) -> dict[str, float | list]:
        """The metrics' values (metric key -> value) of ``source``, as ``evaluation`` measures them."""
        return self.evaluation(source, labels).values
