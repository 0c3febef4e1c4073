"""Learning-rate schedules with one signature, so `conf/scheduler/*.yaml` are interchangeable.

The module finishes each partial with the optimizer and the run's total optimizer steps, which
only Lightning knows once the data is loaded. The warmup is either a count of optimizer steps
(`warmup_steps`) or a share of the whole run (`warmup_ratio`, Axolotl's name), never both.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from lorafit.errors import ConfigError


def check_warmup(warmup_steps: object, warmup_ratio: object) -> None:
    """The two ways of giving the warmup: each valid, and not both at once."""
    if warmup_ratio is None:
        return
    if isinstance(warmup_ratio, bool) or not isinstance(warmup_ratio, int | float):
        raise ConfigError(f"scheduler.warmup_ratio={warmup_ratio!r}: expected a number in [0, 1]")
    if not 0 <= warmup_ratio <= 1:
        raise ConfigError(f"scheduler.warmup_ratio={warmup_ratio!r}: expected a number in [0, 1]")
    if warmup_steps:
        raise ConfigError(
            f"scheduler.warmup_steps={warmup_steps} and scheduler.warmup_ratio={warmup_ratio} "
            "both set the warmup: keep one (scheduler.warmup_steps=0 to use the ratio)"
        )


def warmup_length(num_training_steps: int, warmup_steps: int, warmup_ratio: float | None) -> int:
    """Optimizer steps of warmup: `warmup_steps`, or the ratio of the run rounded up, so any
    ratio above zero warms up for at least one step."""
    check_warmup(warmup_steps, warmup_ratio)
    if warmup_ratio is None:
        return warmup_steps
    return math.ceil(warmup_ratio * num_training_steps)


def cosine(
    optimizer: Optimizer,
    num_training_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float | None = None,
) -> LambdaLR:
    """Linear warmup, then a half cosine from the peak down to zero at the last step."""
    warmup = warmup_length(num_training_steps, warmup_steps, warmup_ratio)
    return get_cosine_schedule_with_warmup(optimizer, warmup, num_training_steps)


def linear(
    optimizer: Optimizer,
    num_training_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float | None = None,
) -> LambdaLR:
    """Linear warmup, then a straight line down to zero at the last step."""
    warmup = warmup_length(num_training_steps, warmup_steps, warmup_ratio)
    return get_linear_schedule_with_warmup(optimizer, warmup, num_training_steps)


def constant(
    optimizer: Optimizer,
    num_training_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float | None = None,
) -> LambdaLR:
    """Linear warmup, then the peak learning rate to the end."""
    warmup = warmup_length(num_training_steps, warmup_steps, warmup_ratio)
    return get_constant_schedule_with_warmup(optimizer, warmup)
