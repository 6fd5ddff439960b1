"""Training: the loop (a Trainer fed one TrainingJob), its settings (Hydra schemas: dit.training.config), the add-ons it
calls (REPA, TREAD: dit.training.addons), EMA, checkpoints, evaluation while training, metrics, and
process-count-independent randomness."""

from dit.training.config import OptimConfig, TrainConfig
from dit.training.job import TrainingJob
from dit.training.loop import Trainer, train
from dit.training.optim import lr_at

__all__ = ["OptimConfig", "TrainConfig", "Trainer", "TrainingJob", "lr_at", "train"]
