"""Training: the loop, its settings (registered as Hydra schemas), EMA, checkpoints, metrics, and
process-count-independent randomness."""

from dit.training.config import OptimConfig, TrainConfig
from dit.training.loop import lr_at, train

__all__ = ["OptimConfig", "TrainConfig", "lr_at", "train"]
