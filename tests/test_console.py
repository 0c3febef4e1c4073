"""What a person sees: lorafit's lines and the progress bar, not the libraries' start-up
chatter; `--help` without loading torch; logs on stderr."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lines every command printed before the console was set up.
NOISE = [
    r"kernels-community",
    r"Seed set to",
    r"GPU available:",
    r"Tip: For seamless",
    r"was configured so",
    r"FutureWarning",
    r"LeafSpec",
    r"^INFO: ",  # Lightning's own handler, printing its lines a second time
]
RUN = [
    "experiment=tiny",
    "trainer.max_steps=2",
    "trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null",
]


def _train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *RUN,
        *overrides,
        f"hydra.run.dir={tmp_path}",
    ]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_run_shows_lorafit_lines_and_none_of_the_library_chatter(tmp_path):
    result = _train(tmp_path / "quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert [p for p in NOISE if re.search(p, output, re.MULTILINE)] == []
    assert "final metrics" in result.stderr and "final metrics" not in result.stdout
    assert output.count("`Trainer.fit` stopped") == 1
    # verbose=true lets the libraries speak again.
    loud = _train(tmp_path / "loud", "verbose=true")
    assert "Tip: For seamless" in loud.stdout + loud.stderr


def test_help_does_not_load_torch():
    code = (
        "import runpy, sys\n"
        "sys.argv = ['train.py', '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')\n"
        "except SystemExit:\n"  # Hydra exits after printing the help
        "    pass\n"
        "print('torch loaded:', 'torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert "== Configuration groups ==" in result.stdout
    assert result.stdout.strip().endswith("torch loaded: False"), result.stdout[-500:]


def test_the_filters_drop_only_the_chatter(caplog):
    import logging
    import warnings

    from lorafit.console import quiet_libraries

    quiet_libraries(verbose=False)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("GPU available: False, used: False")
        logger.info("`Trainer.fit` stopped: `max_steps=2` reached.")
    assert [r.getMessage() for r in caplog.records] == [
        "`Trainer.fit` stopped: `max_steps=2` reached."
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_libraries(verbose=False)  # catch_warnings reset the filters: set them again
        warnings.warn(
            "`is_gradient_checkpointing` is deprecated and will be removed",
            FutureWarning,
            stacklevel=1,
        )
        warnings.warn("a deprecation about the user's own call", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a deprecation about the user's own call"]
