"""One evaluator for FID during training and ``python -m dit.eval fid``: reference statistics
(resolved from a stats npz, images or a dataset name, and cached), chunked feature extraction, and
the metrics beside FID (class consistency for the domain metric, Inception Score for Inception)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from dit.eval.stats import ImageSource, Stats, extract_features, fid, inception_score, is_stats_file, stats_from_features

__all__ = ["Evaluator", "TensorSource"]

# Metrics whose classifier head predicts the dataset's own classes: class consistency is meaningful.
CLASS_CONSISTENCY = ("fashion_mnist",)


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
    """FID of generated images against ``ref`` in the feature space of ``metric``.

    ref: a stats npz (ours or ADM's), an image folder / ADM npz, or a dataset name (fashion_mnist[:split]).
    cache: where reference statistics computed from images are kept (reused while it loads; a damaged
    cache is rebuilt with a warning). distributed: split extraction over the processes of an
    accelerate / torchrun launch (every process must call); False when one process evaluates alone.
    """

    def __init__(
        self,
        metric: str = "inception",
        ref: str | None = None,
        inception_weights: str | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 250,
        cache: str | Path | None = None,
        distributed: bool = True,
    ):
        from dit.eval import make_extractor

        self.metric, self.ref, self.device, self.batch_size = metric, ref, device, batch_size
        self.cache, self.distributed = Path(cache) if cache else None, distributed
        self.extractor = make_extractor(metric, inception_weights, device)
        self._reference: Stats | None = None

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

    def stats(self, spec: str) -> tuple[Stats, np.ndarray | None, np.ndarray | None]:
        """(statistics, logits, labels) of a stats npz (no logits) or of images / a dataset name."""
        if is_stats_file(spec):
            return Stats.load(spec, default_extractor=self.extractor.name), None, None
        source = ImageSource(spec)
        features, logits = self.features(source)
        return stats_from_features(features, self.extractor.name), logits, source.labels

    def reference(self) -> Stats:
        """The reference statistics: from the cache when it loads, else computed (and cached)."""
        if self._reference is not None:
            return self._reference
        if not self.ref:
            raise ValueError("FID needs a reference: a stats npz, an image folder / npz, or a dataset name (e.g. fashion_mnist)")
        if self.cache is not None and self.cache.exists():
            try:
                self._reference = Stats.load(self.cache, self.extractor.name)
                return self._reference
            except (ValueError, OSError) as e:  # damaged (dit.integrity.DamagedFileError) or unreadable: only a cache
                warnings.warn(f"cached reference statistics {self.cache} cannot be read ({e}); recomputing them", stacklevel=2)
        self._reference, _, _ = self.stats(self.ref)
        if self.cache is not None and not is_stats_file(self.ref):
            self._reference.save(self.cache)
        return self._reference

    # --- metrics ---------------------------------------------------------------------------------

    def metrics(self, stats: Stats, logits: np.ndarray | None = None, labels: np.ndarray | None = None) -> dict[str, float]:
        """FID against the reference, plus what the metric's classifier says about the images."""
        result = {"fid": fid(stats, self.reference())}
        if logits is not None and self.metric == "inception":
            result["inception_score"], result["inception_score_std"] = inception_score(logits)
        if logits is not None and labels is not None and self.metric in CLASS_CONSISTENCY:
            result["class_consistency"] = float((np.asarray(logits).argmax(1) == np.asarray(labels)).mean())
        return result

    def evaluate(self, source, labels=None) -> dict[str, float]:
        """Metrics of a spec (stats npz, images, dataset name) or of in-memory uint8 images with labels."""
        if isinstance(source, str):
            stats, logits, found_labels = self.stats(source)
            return self.metrics(stats, logits, found_labels if labels is None else labels)
        if not isinstance(source, (ImageSource, TensorSource)):
            source = TensorSource(source, labels)
        features, logits = self.features(source)
        return self.metrics(stats_from_features(features, self.extractor.name), logits, source.labels if labels is None else labels)
