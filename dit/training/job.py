"""TrainingJob: everything one run trains with, as one record: the objects train.py builds from the config (model,
data, objective, VAE) and the plain settings the Trainer reads (it never sees a Hydra config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dit.diffusion import Objective
from dit.models import DiT
from dit.training.config import OptimConfig, TrainConfig

__all__ = ["TrainingJob"]


@dataclass
class TrainingJob:
    model: DiT
    dataset: Any  # (image or latent, label) pairs with input_size, channels, num_classes, latent (dit.data)
    objective: Objective  # what is optimised (dit.diffusion.build_objective); the loop never looks inside it
    run_dir: Path
    training: TrainConfig
    optim: OptimConfig
    seed: int = 0
    resume: str | None = None  # auto | a checkpoint path | null (a fresh run)
    config: dict = field(default_factory=dict)  # the resolved config: the settings digest, the trackers
    data_meta: dict = field(default_factory=dict)  # what exports record of the data (name, class names, VAE)
    vae: Any = None  # decodes latents for the grids and the FID (None: pixel data)
    logger_config: dict | None = None  # the composed logger/ config group (trackers)
    init_from: str | None = None  # weights to start from (dit.training.init_from)
    init_from_class_map: list | None = None
    # model.cond_map: the held-out images (a dataset of (image, label)) whose maps and labels condition the
    # evaluation samples and the grids (training.map_split)
    map_images: Any = None

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
