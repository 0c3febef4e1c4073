"""bench/dequantize.py runs its table at shrunk widths on the CPU, after checking the two
dequantizations equal."""

from __future__ import annotations

import json
import sys

from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import dequantize  # noqa: E402


def test_the_bench_times_both_dequantizations_of_each_shape(tmp_path, capsys):
    out = tmp_path / "dequantize.json"
    rows = dequantize.main(["--divide", "16", "--repeats", "2", "--out", str(out)])
    assert [row["weight"] for row in rows] == list(dequantize.SHAPES)
    assert rows[2]["shape"] == [14336 // 16, 4096 // 16]
    for row in rows:
        assert row["bitsandbytes_ms"] > 0 and row["compiled_ms"] > 0
    assert json.loads(out.read_text())["rows"] == rows
    printed = capsys.readouterr().out
    assert "| down_proj | 256 x 896 |" in printed
    # 32 layers x 3 passes x 7 weights, less the first layer's three input gradients.
    step = dequantize.per_step_ms(rows, "compiled")
    calls = {"q_proj, o_proj": 191, "k_proj, v_proj": 190, "gate_proj, up_proj": 192}
    calls["down_proj"] = 96
    assert abs(step - sum(calls[row["weight"]] * row["compiled_ms"] for row in rows)) < 1e-9
