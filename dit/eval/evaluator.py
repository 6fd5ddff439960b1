"""One evaluator for FID during training and ``python -m dit.eval fid``: reference statistics
(resolved from a stats npz, images or a dataset name, and cached), chunked feature extraction, and
the metrics beside FID: class consistency for the domain metric, Inception Score for Inception, and
(opt-in, ``extra_metrics``) KID and precision/recall, which need the reference's features, not only
its statistics. IS, KID and precision/recall are torch-fidelity's own functions on our features."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from dit.eval.stats import ImageSource, Stats, extract_features, fid, is_stats_file, stats_from_features

__all__ = ["Evaluator", "TensorSource"]

# Metrics whose classifier head predicts the dataset's own classes: class consistency is meaningful.
CLASS_CONSISTENCY = ("fashion_mnist",)
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torch-fidelity's defaults; the subset shrinks to the smaller set
PRC_NEIGHBORHOOD = 3  # k of the k-NN manifolds (Kynkaenniemi et al. 2019; ADM's evaluator and torch-fidelity)
EXTRA_METRICS = ("kid", "kid_std", "precision", "recall")


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
    domain_classifier: the domain metric's classifier file (None: the shipped one, dit.eval.domain).
    extra_metrics: also KID and precision/recall (the CLI's default; off in training, where they would
    cost the reference's features in memory and k-NN distances at every evaluation). They need the
    reference's images: a stats npz reference cannot give them (``extra_unavailable`` says why).
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
        extra_metrics: bool = False,
        domain_classifier: str | None = None,
    ):
        from dit.eval import make_extractor

        self.metric, self.ref, self.device, self.batch_size = metric, ref, device, batch_size
        self.cache, self.distributed, self.extra_metrics = Path(cache) if cache else None, distributed, extra_metrics
        self.extractor = make_extractor(metric, inception_weights, device, domain_classifier)
        self._reference: Stats | None = None
        self._reference_features: np.ndarray | None = None  # (N, D), kept only for the extra metrics

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
        if self.extra_metrics and not is_stats_file(self.ref):  # features wanted: the cache holds statistics only
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

    def extra_unavailable(self, features: np.ndarray | None) -> str | None:
        """Why KID and precision/recall cannot be computed for these sample features (None: they can)."""
        if not self.extra_metrics:
            return "not asked for (extra_metrics=False)"
        if features is None:
            return "the samples are statistics only (mu, sigma); they need the images"
        self.reference()
        if self._reference_features is None:
            return (
                f"the reference {self.ref} is statistics only (mu, sigma); "
                "they need its images (a folder, an npz with arr_0, a dataset name)"
            )
        if min(len(features), len(self._reference_features)) <= PRC_NEIGHBORHOOD:
            return f"they need more than {PRC_NEIGHBORHOOD} images in each set"
        return None

    def metrics(
        self,
        stats: Stats,
        logits: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        features: np.ndarray | None = None,
    ) -> dict[str, float | list]:
        """FID against the reference, plus what the metric's classifier says about the images (class
        consistency: overall, worst class, and per class as a list by class id), plus KID and
        precision/recall of the sample ``features`` (N, D) when extra_metrics is on and they can be had."""
        from torch_fidelity.metric_isc import isc_features_to_metric

        result = {"fid": fid(stats, self.reference())}
        if logits is not None and self.metric == "inception":
            logits = torch.from_numpy(np.asarray(logits))
            isc = isc_features_to_metric(
                logits, splits=min(10, len(logits))
            )  # torch-fidelity's 10 splits (and shuffle)
            result["inception_score"], result["inception_score_std"] = (
                isc["inception_score_mean"],
                isc["inception_score_std"],
            )
        if logits is not None and labels is not None and self.metric in CLASS_CONSISTENCY:
            labels = np.asarray(labels)
            hit = np.asarray(logits).argmax(1) == labels
            result["class_consistency"] = float(hit.mean())
            # the worst class: "every class recognisable" is a statement about this one, not about the mean
            per_class = {int(k): float(hit[labels == k].mean()) for k in np.unique(labels)}
            result["class_consistency_min"] = min(per_class.values())
            # indexed by class id (None: no sample of that class); a list, so metrics.jsonl only: trackers take scalars
            result["class_consistency_per_class"] = [per_class.get(k) for k in range(max(per_class) + 1)]
        if self.extra_metrics and self.extra_unavailable(features) is None:
            result.update(self.kid_precision_recall(features, self._reference_features))
        return result

    def kid_precision_recall(self, samples: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        """KID (unbiased MMD^2, cubic polynomial kernel, mean and std over subsets) and k-NN precision / recall
        of sample features against reference features, by torch-fidelity's functions.

        Precision/recall depend on the set sizes (the k-NN radii shrink as a set grows), so the larger set
        is cut to a seeded random subset as large as the other, as in Kynkaenniemi et al. (2019)."""
        from torch_fidelity.metric_kid import kid_features_to_metric
        from torch_fidelity.metric_prc import prc_features_to_metric

        fake, real = torch.from_numpy(np.asarray(samples)), torch.from_numpy(np.asarray(reference))
        size = min(KID_SUBSET_SIZE, len(fake), len(real))
        kid = kid_features_to_metric(fake, real, kid_subsets=KID_SUBSETS, kid_subset_size=size, verbose=False)
        n, rng = min(len(fake), len(real)), np.random.default_rng(0)
        fake, real = (x if len(x) == n else x[rng.choice(len(x), n, replace=False)] for x in (fake, real))
        # save_cpu_ram: k-NN distances in (10,000 x N) blocks instead of one (N x N) matrix
        prc = prc_features_to_metric(
            fake.to(self.device),
            real.to(self.device),
            prc_neighborhood=PRC_NEIGHBORHOOD,
            save_cpu_ram=True,
            verbose=False,
        )
        return {
            "kid": kid["kernel_inception_distance_mean"],
            "kid_std": kid["kernel_inception_distance_std"],
            "precision": prc["precision"],
            "recall": prc["recall"],
        }

    def evaluate(self, source, labels=None) -> dict[str, float | list]:
        """Metrics of a spec (stats npz, images, dataset name) or of in-memory uint8 images with labels."""
        if isinstance(source, str) and is_stats_file(source):
            return self.metrics(self.stats(source)[0])
        if isinstance(source, str):
            source = ImageSource(source)
        elif not isinstance(source, (ImageSource, TensorSource)):
            source = TensorSource(source, labels)
        features, logits = self.features(source)
        labels = source.labels if labels is None else labels
        return self.metrics(stats_from_features(features, self.extractor.name), logits, labels, features)
