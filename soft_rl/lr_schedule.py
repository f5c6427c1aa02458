"""Learning-rate schedules as pure functions of the RL step.

The rate of RL step ``s`` (0-based) depends on nothing else, so a resumed run, a restarted learner and an
uninterrupted run apply the same rate at every step without any scheduler state to checkpoint. As in
verl, the rate changes once per RL step (every mini-batch of one step uses the same rate).

    constant: lr
    linear warm-up over W steps: lr * (s + 1) / W                          for s < W
    cosine after the warm-up:    lr_min + (lr - lr_min) * (1 + cos(pi * p)) / 2,   p = (s - W) / (T - W)
    linear after the warm-up:    lr_min + (lr - lr_min) * (1 - p)
with lr_min = min_lr_ratio * lr and T the run's total steps (p reaches 1 at the last step).
"""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "cosine", "linear")


def learning_rate(lr: float, step: int, total_steps: int, *, schedule: str = "constant", warmup_steps: int = 0,
                  min_lr_ratio: float = 0.0) -> float:
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; expected one of {LR_SCHEDULES}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    span = max(total_steps - 1 - warmup_steps, 1)
    p = min(max((step - warmup_steps) / span, 0.0), 1.0)
    lr_min = min_lr_ratio * lr
    shape = 0.5 * (1.0 + math.cos(math.pi * p)) if schedule == "cosine" else 1.0 - p
    return lr_min + (lr - lr_min) * shape


def set_learning_rate(optimizer, lr: float) -> None:
    """Every parameter group of ``optimizer`` (a torch optimizer, or DeepSpeed's client optimizer, whose
    groups its ZeRO wrapper steps with) gets ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr
