"""Every error a user can fix (bad config, bad data, a missing model, an unreadable checkpoint),
under one base class, and the one wrapper that turns them into one line and exit status 2 at
every entry point (train.py, eval.py, generate.py, export.py, the leaderboard)."""

from __future__ import annotations

import functools
import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException


class LorafitError(Exception):
    """A problem in the user's input or set-up; its message says what, where and how to fix it.

    Entry points print these as one line instead of a traceback.
    """


class ConfigError(LorafitError, ValueError):
    """A config value that cannot work; the message names the key."""

    @classmethod
    def refused(cls, key: str, error: BaseException) -> ConfigError:
        """A library's refusal of the value at `key`, as one line; an error raised inside Hydra's
        instantiate is reported as its cause, the constructor's own complaint."""
        if isinstance(error, InstantiationException) and error.__cause__ is not None:
            error = error.__cause__
        return cls(f"{key}: {describe(error)}")


class DataError(LorafitError, ValueError):
    """Bad or missing training data; the message names the file, row and field."""


class PackingError(LorafitError):
    """Packing was asked for in a setting that cannot keep examples apart."""


class ModelSourceError(LorafitError, RuntimeError):
    """A model or tokenizer could not be found or loaded; the message says which and why."""


class QuantizationUnavailableError(LorafitError, RuntimeError):
    """An adapter asks for 4- or 8-bit quantization that bitsandbytes cannot provide here."""


class CheckpointError(LorafitError):
    """A checkpoint that does not exist, is not one lorafit can read, or does not fit the model."""


class LossDivergedError(LorafitError):
    """The training loss became NaN, infinite, or larger than the watchdog allows."""


class EvaluationError(LorafitError):
    """Evaluation cannot run as configured (e.g. no held-out split)."""


class ExportError(LorafitError):
    """The merged model does not reproduce the adapter model closely enough."""


class ShareError(LorafitError):
    """A run cannot be shared as asked (nothing to push, or the Hub refused it)."""


def describe(error: BaseException) -> str:
    """`Type: first line of the message`: a library's exception, fit for a one-line error."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _discard_unused_run_folder() -> None:
    """A command stopped by bad input leaves no folder behind. Hydra made the job's folder
    before the job started; while it holds nothing but Hydra's own files (.hydra/ and the job's
    log), it goes, and so does the folder above it if that is left empty (`<run>/eval/`)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        folder = Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return  # not under Hydra: called as a library, nothing was made
    if not folder.is_dir():
        return
    if all(p.name == ".hydra" or p.suffix == ".log" for p in folder.iterdir()):
        shutil.rmtree(folder)
        if folder.parent.is_dir() and not any(folder.parent.iterdir()):
            folder.parent.rmdir()


def exit_on_user_errors(function: Callable[..., Any]) -> Callable[..., Any]:
    """Run an entry point's body; a LorafitError is the user's to fix, so it is logged as one
    line and the process exits with status 2. Anything else is a bug and keeps its traceback."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except LorafitError as error:
            logging.getLogger("lorafit").error("%s", error)
            _discard_unused_run_folder()
            sys.exit(2)

    return wrapper
