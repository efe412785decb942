"""Training: the flow-matching trainer, EMA and checkpoints."""
from .trainer import Trainer, TrainConfig

__all__ = ["Trainer", "TrainConfig"]
