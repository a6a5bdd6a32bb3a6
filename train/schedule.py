"""Learning-rate schedule: linear warm-up, then cosine decay to min_lr (the paper's recipe).

As a torch LambdaLR multiplier, stepped once per optimizer step (DeepSpeed steps it). The
multiplier is a plain function, not a callable object, so a checkpoint restores only the step
count: a resumed run follows the schedule of its current config.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """Multiplier of the base lr for the optimizer step after `step` steps (0-based), OpenCLIP's rule:
    (step + 1) / warmup during warm-up, then min_ratio + (1 - min_ratio) * (1 + cos(pi * progress)) / 2."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        decay_steps = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, lr: float, min_lr: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps, min_lr / lr))
