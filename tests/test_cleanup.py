"""A test session leaves nothing behind in the temp folder but the shared model cache."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_passing_tests_leave_no_temp_folders(tmp_path):
    (tmp_path / "test_writes.py").write_text(
        "def test_writes(tmp_path):\n    (tmp_path / 'big.bin').write_bytes(b'x' * 1000)\n"
    )
    base = tmp_path / "base"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command += ["-c", str(ROOT / "pyproject.toml"), f"--basetemp={base}", str(tmp_path)]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "1 passed" in result.stdout, result.stdout[-2000:]
    assert not list(base.rglob("big.bin"))


def test_the_model_cache_is_one_stable_folder():
    import os

    assert os.environ["LORAFIT_CACHE"] == str(Path(tempfile.gettempdir()) / "lorafit-test-cache")
