"""Giving transformers modules whose forward is a known piece of code a forward of lorafit's,
by switching each to a subclass of its own class (same state, same state dict)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from torch import nn

_SUBCLASSES: dict[tuple[type, Callable], type] = {}


@functools.cache
def _forward_contains(cls: type, code: str) -> bool:
    try:
        return code in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def swap_forwards(
    model: nn.Module,
    forward: Callable,
    code: str,
    accepts: Callable[[nn.Module], bool] = lambda module: True,
) -> int:
    """Switch every transformers module of `model` whose class's forward contains `code` (and
    that `accepts` takes) to a subclass with `forward`; returns how many. Modules whose forward
    was replaced on the instance (Liger's kernels) and any other forward are left alone."""
    swapped = 0
    for module in model.modules():
        cls = type(module)
        if (
            cls.__module__.startswith("transformers.models.")
            and "forward" not in vars(module)
            and accepts(module)
            and _forward_contains(cls, code)
        ):
            if (cls, forward) not in _SUBCLASSES:
                _SUBCLASSES[(cls, forward)] = type(cls.__name__, (cls,), {"forward": forward})
            module.__class__ = _SUBCLASSES[(cls, forward)]
            swapped += 1
    return swapped
