"""bench/host_time.py end to end, shrunk to 2 layers: each variant lands in the table with its
phases adding up to its step. No timing is asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_host_time_table_lists_each_variant_with_its_phases():
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "host_time.py"), "--levers", "default,no-dropout"]
        + ["--layers", "2", "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    rows = {
        cells[0]: cells
        for line in done.stdout.splitlines()
        if line.startswith("| ") and not line.startswith(("| variant", "| ---"))
        for cells in [line.strip("| ").split(" | ")]
    }
    assert set(rows) == {"default", "no-dropout"}, done.stdout
    for name, cells in rows.items():
        forward, backward, rest, step = map(float, cells[1:5])
        assert forward > 0 and backward > 0 and rest >= 0, name
        assert abs(forward + backward + rest - step) <= 0.002, name
    assert rows["no-dropout"][5].endswith("x") and rows["default"][5] == "-"
    assert rows["default"][6] == "none"  # no compiled function past torch's recompile limit
    assert "2 layers" in done.stdout
