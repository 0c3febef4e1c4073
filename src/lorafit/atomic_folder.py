"""Publish a folder all at once: build it beside its target, then rename it into place."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def publish(
    target: Path,
    build: Callable[[Path], None],
    is_complete: Callable[[Path], bool] = Path.is_dir,
) -> Path:
    """Run `build(tmp)` in a temporary sibling folder and rename it to `target`.

    A process killed half-way leaves a stray hidden temporary folder, never a half-written
    `target` that a later run would trust. An existing complete target is kept as it is; an
    incomplete one (by `is_complete`) is replaced. If another process publishes the same
    target first, its folder wins: both were built from the same inputs.
    """
    target = Path(target)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        if target.exists():
            shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
