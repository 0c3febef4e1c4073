"""bench/peers.py end to end at the tiny shape: every variant of the CPU suite and of the GPU
suite (on the CPU, without quantization) trains, is timed and lands in the table. No timing is
asserted: the figures of 2 steps on a tiny model mean nothing."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "bench" / "peers.py"
CPU_SUITE = {
    "lorafit packed",
    "lorafit unpacked",
    "transformers Trainer + peft, padded",
    "transformers Trainer + peft, padding-free",
    "TRL SFTTrainer, packed",
}
# TRL's code path is the CPU suite's; left out here to keep the test short.
GPU_SUITE = {
    "lorafit packed",
    "transformers Trainer + peft, padded",
    "transformers Trainer + peft, padding-free",
}


def _table_rows(stdout: str) -> dict[str, list[str]]:
    rows = [line.strip("| ").split(" | ") for line in stdout.splitlines() if line.startswith("| ")]
    return {cells[0]: cells for cells in rows[2:]}  # past the header and its rule


@pytest.mark.slow
def test_every_variant_trains_at_the_tiny_shape(tmp_path: Path) -> None:
    runs = {
        "cpu": ["--tiny", "--sequence-len", "256"],
        # The GPU suite's code path: the Mistral-7B preset with tiny_mistral, checkpointing on.
        "gpu": ["--suite", "gpu", "--tiny", "--sequence-len", "256"],
    }
    started = {
        name: subprocess.Popen(
            [sys.executable, str(HARNESS), *flags, "--out", str(tmp_path / f"{name}.json")],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # Two harnesses at once: one thread each, so they do not fight over the cores.
            env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"},
        )
        for name, flags in runs.items()
    }
    trl = importlib.util.find_spec("trl") is not None
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name}:\n{stdout}\n{stderr[-4000:]}"
        table = _table_rows(stdout)
        assert set(table) == (CPU_SUITE if name == "cpu" else GPU_SUITE), stdout
        raw = json.loads((tmp_path / f"{name}.json").read_text())
        for variant in raw["variants"]:
            if variant["kind"] == "trl-packed" and not trl:
                assert variant["status"] == "skipped"
                continue
            assert variant["status"] == "ok", variant
            result = variant["result"]
            assert result["tokens_per_s"] > 0 and result["steps"] == 2
            assert all(math.isfinite(loss) for loss in result["step_losses"])
            assert float(table[variant["label"]][1]) > 0
            assert math.isfinite(float(table[variant["label"]][4]))
        assert "command: python bench/peers.py" in stdout and "torch " in stdout
