"""The one metrics.csv reader: every metric's (step, value) pairs, gaps skipped."""

from __future__ import annotations

import math

from lorafit.runs.metrics_log import read_metrics


def test_rows_keep_their_metrics_and_skip_empty_or_unreadable_cells(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(
        "epoch,step,train/loss,val/loss\n"
        "0,0,,5.0\n"  # a validation row: no train/loss
        "0,1,2.5,\n"
        "0,,9.9,9.9\n"  # no step: skipped
        "0,2,nan,oops\n"  # NaN is a value; text is not
        "0,3,1.5,1.25\n"
    )
    series = read_metrics(path)
    assert series["val/loss"] == [(0, 5.0), (3, 1.25)]
    assert [s for s, _ in series["train/loss"]] == [1, 2, 3]
    assert math.isnan(series["train/loss"][1][1])
    assert "epoch" not in series and "step" not in series
