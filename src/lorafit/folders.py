"""Folders lorafit writes: checked before a run writes anything, and published all at once
(built beside the target, then renamed into place).

Other processes may be reading a published folder at any moment (sweep trials sharing the
prepared-data cache, two runs converting the same model), so a complete target is never
removed or replaced: the first complete writer wins, later writers discard their copy.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from lorafit.errors import ConfigError


def _sibling(target: Path, tag: str) -> Path:
    return target.parent / f".{target.name}-{tag}-{uuid.uuid4().hex[:12]}"


def publish(
    target: Path,
    build: Callable[[Path], None],
    is_complete: Callable[[Path], bool] = Path.is_dir,
) -> Path:
    """Run `build(tmp)` in a temporary sibling folder and rename it to `target`.

    A process killed half-way leaves a stray hidden temporary folder, never a half-written
    `target` that a later run would trust. A complete `target` (by `is_complete`) is kept as it
    is, also when it appears while this call builds: the built copy is then discarded, since
    both came from the same inputs. An incomplete one (damaged, or of an older layout) is first
    renamed aside, so no reader ever sees a folder change under it, then removed.

    The folders are created with the process's umask (group-readable under the usual 022),
    not mkdtemp's owner-only 0700, so a shared cache serves a whole group.
    """
    target = Path(target)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "building")
    tmp.mkdir()
    try:
        build(tmp)
        _rename_into_place(tmp, target, is_complete)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename succeeded
    return target


def _rename_into_place(tmp: Path, target: Path, is_complete: Callable[[Path], bool]) -> None:
    for _ in range(3):
        try:
            # Atomic; fails on an existing non-empty folder instead of replacing it.
            os.rename(tmp, target)
            return
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if is_complete(target):
            return  # another writer won; ours is discarded by the caller
        stale = _sibling(target, "stale")
        try:
            os.rename(target, stale)
        except FileNotFoundError:
            continue  # another writer moved it aside first
        shutil.rmtree(stale, ignore_errors=True)
    raise OSError(f"could not publish {target}: other writers keep replacing it")


def check_folder(key: str, value: object) -> None:
    """A folder the run will write into: not a file, and not below one."""
    if value is None:
        return
    path = Path(str(value)).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={value}: {path} is a file, not a folder")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"{key}={value}: {parent} is a file, so the folder cannot be created")
    if parent is not None:
        try:  # the file system's own answer (permissions, read-only mounts, /proc), then undone
            os.rmdir(tempfile.mkdtemp(prefix=".lorafit-probe-", dir=parent))
        except OSError as error:
            raise ConfigError(
                f"{key}={value}: {parent} cannot be written ({error.strerror})"
            ) from error


def writable_folder(key: str, value: str | Path) -> Path:
    """Create the folder `key` names, as one ConfigError when the file system refuses."""
    path = Path(value).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"{key}={value}: the folder cannot be created ({error.strerror})"
        ) from error
    return path
