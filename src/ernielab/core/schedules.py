"""Learning-rate multipliers shared by every trainer (use with torch.optim.lr_scheduler.LambdaLR)."""
from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine", min_ratio: float = 0.0) -> float:
    """Linear warm-up over `warmup` steps, then constant or cosine decay to `min_ratio` at `total` steps."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    if schedule == "constant":
        return warm
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r} (use 'cosine' or 'constant')")
    progress = min(1.0, step / max(1, total))
    return warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
