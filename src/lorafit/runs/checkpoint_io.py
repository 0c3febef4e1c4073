"""Checkpoint files written so that a crash can never leave a half-written one in place."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a hidden partial file beside the target, fsync, then rename over the target.

    The rename is atomic within a file system, so a process killed at any moment leaves either
    the previous checkpoint or the new one, never a truncated file. (Lightning's own save goes
    through a temporary file in the system temp folder, whose final move is a copy, and so not
    atomic, when that folder is on another file system.) A killed save leaves only its hidden
    `.*.partial` file behind, which nothing loads.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            with open(partial, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
