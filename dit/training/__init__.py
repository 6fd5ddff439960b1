"""Training: the loop, EMA, checkpoints, metrics, and process-count-independent randomness."""

from dit.training.loop import OptimConfig, TrainConfig, lr_at, train

__all__ = ["OptimConfig", "TrainConfig", "lr_at", "train"]
