"""What a person sees in the terminal: lorafit's own lines, the progress bar, and the warnings
that are about their run. The libraries' start-up chatter is filtered where it is emitted,
line by line, so anything else they say still shows; `verbose=true` shows it all.

Kept light (standard library only): the entry points call `quiet_libraries` before torch,
bitsandbytes or Lightning is imported, as some of them speak while being imported.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Sequence

# Logger name -> messages from it that say nothing about the user's run.
LIBRARY_CHATTER = {
    # An optional kernels package for a faster CPU 4-bit path; 4-bit works without it.
    "bitsandbytes.backends.cpu.ops": [r"kernels-community"],
    "lightning.fabric.utilities.seed": [r"^Seed set to "],
    "lightning.pytorch.utilities.rank_zero": [
        r"^(GPU|TPU|HPU|IPU) available: ",  # the device in use is in lorafit's own start line
        r"Tip: For seamless cloud",  # advertisements for litlogger / litmodels
        r"^`Trainer\(\w+=[\d.]+\)` was configured so",  # echoes of our own settings
    ],
}
# (category, message) of warnings raised inside libraries about other libraries' APIs.
LIBRARY_WARNINGS = [
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),  # peft asks transformers 5
    (FutureWarning, r"`gradient_checkpointing_enable` is deprecated"),  # peft's k-bit prep
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),  # Lightning on torch
]


class _DropMatching(logging.Filter):
    def __init__(self, patterns: Sequence[str]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def verbose_requested(argv: Sequence[str] | None = None) -> bool:
    """Whether the command line says `verbose=true` (read before Hydra parses it)."""
    arguments = sys.argv[1:] if argv is None else argv
    return any(a.lstrip("+") in ("verbose=true", "verbose=True") for a in arguments)


def quiet_libraries(verbose: bool | None = None) -> None:
    """Filter the libraries' chatter at its source, unless `verbose`."""
    if verbose if verbose is not None else verbose_requested():
        return
    for name, patterns in LIBRARY_CHATTER.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) for f in logger.filters):
            logger.addFilter(_DropMatching(patterns))
    for category, message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def lightning_logs_once() -> None:
    """Lightning gives its package logger a console handler of its own when imported; under
    Hydra, whose handlers on the root logger already print (and file) every record, each of
    Lightning's lines would show twice. Call after Lightning is imported."""
    import lightning  # noqa: F401 - its import adds the handler removed here

    package = logging.getLogger("lightning")
    for handler in list(package.handlers):
        if type(handler) is logging.StreamHandler:
            package.removeHandler(handler)
