"""Learning-rate schedules with one signature, so `conf/scheduler/*.yaml` are interchangeable.

The module finishes each partial with the optimizer and the run's total optimizer steps, which
only Lightning knows once the data is loaded.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)


def cosine(optimizer: Optimizer, num_training_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """Linear warmup, then a half cosine from the peak down to zero at the last step."""
    return get_cosine_schedule_with_warmup(optimizer, warmup_steps, num_training_steps)


def linear(optimizer: Optimizer, num_training_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """Linear warmup, then a straight line down to zero at the last step."""
    return get_linear_schedule_with_warmup(optimizer, warmup_steps, num_training_steps)


def constant(optimizer: Optimizer, num_training_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """Linear warmup, then the peak learning rate to the end."""
    del num_training_steps  # a constant schedule does not depend on the run length
    return get_constant_schedule_with_warmup(optimizer, warmup_steps)
