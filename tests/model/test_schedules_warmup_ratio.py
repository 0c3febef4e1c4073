"""scheduler.warmup_ratio: the warmup as a share of the run's optimizer steps, rounded up, and
refused together with a non-zero warmup_steps before anything loads."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from helpers import TINY, compose_config
from lorafit.config_checks import check_values
from lorafit.errors import ConfigError
from lorafit.model import schedules


def _expected(kind: str, step: int, warmup: int, total: int) -> float:
    """The lr factor each schedule should give at `step`, written out independently."""
    if step < warmup:
        return step / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / (total - warmup)
    if kind == "linear":
        return max(0.0, 1 - progress)
    return 0.5 * (1 + math.cos(math.pi * progress))


def _factors(scheduler_overrides: list[str], total: int) -> list[float]:
    cfg = compose_config([*TINY, *scheduler_overrides])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = instantiate(cfg.scheduler)(optimizer, num_training_steps=total)
    factors = []
    for _ in range(total):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return factors


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize(("ratio", "total", "warmup"), [(0.25, 12, 3), (0.1, 15, 2), (0.0, 8, 0)])
def test_the_lr_at_each_step_follows_the_ratio_rounded_up(kind, ratio, total, warmup):
    overrides = [f"scheduler={kind}", "scheduler.warmup_steps=0", f"scheduler.warmup_ratio={ratio}"]
    factors = _factors(overrides, total)
    assert factors == pytest.approx([_expected(kind, s, warmup, total) for s in range(total)])
    # The same as giving the rounded-up count directly.
    same = _factors([f"scheduler={kind}", f"scheduler.warmup_steps={warmup}"], total)
    assert factors == pytest.approx(same)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_every_schedule_has_the_option_and_it_is_off_by_default(kind):
    assert compose_config([f"scheduler={kind}"]).scheduler.warmup_ratio is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            [*TINY, "scheduler.warmup_steps=5", "scheduler.warmup_ratio=0.1"],
            r"scheduler\.warmup_steps=5 and scheduler\.warmup_ratio=0\.1 both set the warmup",
        ),
        # The default schedule's 10 warmup steps count: the message says to set them to 0.
        (["scheduler.warmup_ratio=0.1"], r"warmup_steps=10 .* \(scheduler\.warmup_steps=0 to use"),
        ([*TINY, "scheduler.warmup_ratio=1.5"], r"scheduler\.warmup_ratio=1\.5: expected a number"),
        ([*TINY, "scheduler.warmup_ratio=true"], r"scheduler\.warmup_ratio=True: expected a"),
    ],
)
def test_bad_warmup_settings_fail_at_config_check_time(overrides, message):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError, match=message):
        check_values(cfg)


def test_the_schedule_itself_refuses_both_when_built_outside_the_checks():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match="warmup_steps=4 and scheduler.warmup_ratio=0.5"):
        schedules.cosine(optimizer, num_training_steps=10, warmup_steps=4, warmup_ratio=0.5)
