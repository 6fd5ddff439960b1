"""What a run draws from its EMA model while it trains: the sample grids and the in-training FID evaluation, each an
object the Trainer asks ``due(step)`` and then ``run(...)`` (torchtitan's Validator), on the main process.

For a model with a spatial condition (model.cond_map) the samples are conditioned on held-out images' maps
(HeldOut: the split training.map_split names), and the evaluation reports how well they follow them (map_iou).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dit.diffusion import Objective, Sampler, build_sampler
from dit.eval.evaluator import Evaluator
from dit.eval.extractors import ExtractorSpec
from dit.models.spatial import map_images, map_iou
from dit.sampling import GenerationSpec, generate, load_guide, save_grid
from dit.training.config import TrainConfig, training_sampling
from dit.training.logging import MetricsLogger

__all__ = [
    "EVAL_BATCH_SIZE",
    "Drawing",
    "Evaluation",
    "HeldOut",
    "SampleGrids",
    "build_evaluator",
    "eval_inputs",
    "build_training_sampler",
]

EVAL_BATCH_SIZE = 250  # images per generate() batch in FID evaluations


def eval_inputs(n: int, num_classes: int, seed: int) -> dict:
    """What an FID evaluation of n samples draws: generate()'s labels, seed and batch size. The one place these
    are decided; studies that redraw a run's evaluation samples (studies/ablation_conditioning/per_class.py) call
    it."""
    return {"labels": torch.arange(n) % num_classes, "seed": seed + 1, "batch_size": EVAL_BATCH_SIZE}


class HeldOut:
    """The held-out images (a dataset of (image, label)) whose maps condition a spatial model's samples."""

    def __init__(self, images, model):
        self.images, self.map_kind, self.map_size = images, model.map_kind, model.map_size

    @classmethod
    def of_run(cls, model, dataset, images) -> HeldOut | None:
        """For a model with a spatial condition (model.cond_map): its held-out images (None for other models); the
        maps are made from the images, so the training data must be pixels."""
        if model.map_kind is None:
            return None
        if getattr(dataset, "latent", False):
            raise ValueError(
                f"model.cond_map={model.map_kind.name} makes its maps from the training images; latent data "
                "has none (use a pixel dataset)"
            )
        if images is None:
            raise ValueError(
                f"model.cond_map={model.map_kind.name}: no held-out images to condition the samples with "
                "(training.map_split)"
            )
        return cls(images, model)

    def first(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels and maps of the first n held-out images (training.map_split)."""
        if len(self.images) < n:
            raise ValueError(f"training.map_split has {len(self.images)} images; an evaluation of {n} needs n")
        images, labels = zip(*(self.images[i] for i in range(n)), strict=True)
        return torch.as_tensor(labels), self.map_kind(torch.stack(images), self.map_size)

    def for_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """For each label, the map of the next held-out image of that class (in the split's order)."""
        wanted = {int(k): int((labels == k).sum()) for k in labels.unique()}
        found: dict[int, list] = {k: [] for k in wanted}
        for i in range(len(self.images)):
            image, label = self.images[i]
            if len(found.get(int(label), ())) < wanted.get(int(label), 0):
                found[int(label)].append(image)
        missing = sorted(k for k in wanted if len(found[k]) < wanted[k])
        if missing:
            raise ValueError(f"training.map_split has too few images of classes {missing} for the sample grid")
        return self.map_kind(torch.stack([found[int(k)].pop(0) for k in labels]), self.map_size)

    def iou(self, images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """Per-sample IoU of the map of each uint8 NHWC sample with the map it was given."""
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
        return map_iou(self.map_kind(x, self.map_size), maps.cpu())


@dataclass
class Drawing:
    """How a run draws samples, alike for grids and evaluations: the VAE that decodes latents (None for pixels), the
    device, the run's seed, and for a spatial model the held-out maps."""

    vae: Any
    device: torch.device
    seed: int
    held_out: HeldOut | None = None


class SampleGrids:
    """EMA sample grids, one row per class -> run_dir/samples/step_*.png and latest.png; every sample_every steps
    (before the last) and at the end."""

    def __init__(self, cfg: TrainConfig, sampler: Sampler, drawing: Drawing, num_classes: int, run_dir: Path):
        self.cfg, self.sampler, self.drawing, self.dir = cfg, sampler, drawing, Path(run_dir) / "samples"
        n_classes = min(num_classes, cfg.sample_max_classes)
        self.labels = torch.arange(n_classes).repeat_interleave(cfg.sample_per_class)
        self.maps = None
        if drawing.held_out is not None:  # each grid cell: the map of a held-out image of its row's class
            self.maps = drawing.held_out.for_labels(self.labels)

    def save_maps(self, input_size: int) -> None:
        if self.maps is not None:
            save_grid(map_images(self.maps, input_size), self.cfg.sample_per_class, self.dir / "maps.png")

    def due(self, step: int) -> bool:
        return bool(self.cfg.sample_every) and step % self.cfg.sample_every == 0 and step < self.cfg.total_steps

    def run(self, model: torch.nn.Module, step: int, logger: MetricsLogger) -> None:
        d, labels = self.drawing, self.labels
        spec = GenerationSpec(labels, batch_size=len(labels), seed=d.seed, maps=self.maps)
        images = torch.cat([imgs for _, imgs in generate(model, self.sampler, spec, vae=d.vae, device=d.device)])
        path = self.dir / f"step_{step:07d}.png"
        save_grid(images, nrow=self.cfg.sample_per_class, path=path)
        save_grid(images, nrow=self.cfg.sample_per_class, path=self.dir / "latest.png")
        logger.log_image(step, "samples", path)
        logger.plot()


def build_training_sampler(objective: Objective, cfg: TrainConfig, key: str, model) -> Sampler:
    """The sampler of training.<key> (grid_sampling, fid_sampling; a null sampler: the objective's for the key's
    purpose) + the model check, with errors that name the config key they come from."""
    try:
        sampler = build_sampler(objective, training_sampling(key, getattr(cfg, key), objective.name))
        s = sampler.settings
        if s.guidance != "auto" or s.cfg_scale == 1.0:
            sampler.check_model(model)
        elif key != "fid_sampling" or s.guide is None:  # the guide is loaded at the first evaluation (Evaluation)
            raise ValueError(
                "guidance=auto is for the in-training FID (fid_sampling) with a guide (guide=<checkpoint> or @STEP, a "
                "checkpoint of this run kept until then); autoguided grids: sample.py"
            )
    except ValueError as e:
        raise ValueError(f"training.{key}: {e}") from None
    return sampler


def build_evaluator(cfg: TrainConfig, device: torch.device, run_dir: Path) -> Evaluator:
    """The FID evaluator of training.fid_*, its reference statistics computed (or read from the run's cache) once,
    before training."""
    if not cfg.fid_ref:
        raise ValueError("training.fid_every > 0 needs training.fid_ref (a stats npz, images, or a dataset name)")
    extractor = ExtractorSpec(cfg.fid_metric, cfg.inception_weights, cfg.domain_classifier)
    cache = Path(run_dir) / f"fid_ref_{cfg.fid_metric}.npz"
    evaluator = Evaluator(extractor, cfg.fid_ref, device, EVAL_BATCH_SIZE, cache, distributed=False)
    evaluator.reference()
    return evaluator


class Evaluation:
    """FID (and what else the metric reports) of fid_samples EMA samples, fid_samples_final at the last step, every
    fid_every steps. ``run`` returns False when ``stopping()`` turned true between sampling batches: the evaluation
    was abandoned (the Trainer records it as pending work, and a resumed run does it first)."""

    def __init__(self, cfg: TrainConfig, sampler: Sampler, evaluator: Evaluator, drawing: Drawing, run_dir: Path):
        self.cfg, self.sampler, self.evaluator, self.drawing = cfg, sampler, evaluator, drawing
        self.run_dir, self.guide = run_dir, None

    def guide_of(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """fid_sampling.guidance=auto: the guide (a checkpoint, or @STEP of this run), loaded and checked against the
        model at the first evaluation that needs it (an @STEP checkpoint must exist, and be kept, by then)."""
        s = self.sampler.settings
        if s.guidance == "auto" and s.cfg_scale != 1.0 and self.guide is None:
            meta = {"objective": self.sampler.objective.settings()}
            self.guide = load_guide(s.guide, self.run_dir, model, meta, self.drawing.device)
        return self.guide

    def due(self, step: int) -> bool:
        return bool(self.cfg.fid_every) and (step % self.cfg.fid_every == 0 or step == self.cfg.total_steps)

    def run(self, model: torch.nn.Module, step: int, logger: MetricsLogger, stopping: Callable[[], bool]) -> bool:
        cfg, d = self.cfg, self.drawing
        n = cfg.fid_final_samples if step == cfg.total_steps and cfg.fid_final_samples else cfg.fid_samples
        inputs = eval_inputs(n, model.num_classes, d.seed)
        maps = None
        if d.held_out is not None:  # the labels and maps of the first n held-out images
            inputs["labels"], maps = d.held_out.first(n)
        spec = GenerationSpec(maps=maps, **inputs)
        chunks = []
        for _, imgs in generate(model, self.sampler, spec, vae=d.vae, device=d.device, guide=self.guide_of(model)):
            chunks.append(imgs)
            if stopping() and sum(map(len, chunks)) < n:
                return False
        self._score(step, torch.cat(chunks), spec, logger)
        return True

    def _score(self, step: int, images: torch.Tensor, spec: GenerationSpec, logger: MetricsLogger) -> None:
        """Log the metrics of an evaluation's samples (and, for a final one on more samples, the curve's point);
        with maps, how well the samples follow them (map_iou: the mean IoU of each sample's own map with its map)."""
        cfg, evaluator, labels = self.cfg, self.evaluator, spec.labels
        final = len(images) > cfg.fid_samples
        measured = {"fid_extractor": evaluator.extractor.name}  # what measured it (the feature network, its hash)
        ious = None if spec.maps is None else self.drawing.held_out.iou(images, spec.maps)  # per sample, once

        def metrics(k: int) -> dict:
            values = evaluator.evaluate(images[:k], labels[:k]) | {"fid_n": k}
            if ious is not None:
                values |= {"map_iou": float(ious[:k].mean())}
            return values | measured

        if final:  # the curve's point at this step, from fid_samples of them (FID depends on the count)
            logger.log(step, metrics(cfg.fid_samples))
        logger.log(step, metrics(len(images)), tracker_prefix="final/" if final else "")
        if final and ious is not None:  # per sample, for intervals (the report's silhouette table)
            logger.log(step, {"final_map_iou_per_sample": ious.tolist()})
        logger.plot()
