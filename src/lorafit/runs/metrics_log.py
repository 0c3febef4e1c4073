"""The one reader of a run's `csv/metrics.csv` (Lightning's CSVLogger), for reports,
leaderboards and tests alike."""

from __future__ import annotations

import csv
from pathlib import Path

# Columns the logger adds to every row; everything else is a metric.
BOOKKEEPING = ("epoch", "step")


def read_metrics(metrics_csv: Path) -> dict[str, list[tuple[int, float]]]:
    """Every metric's (step, value) pairs in logging order.

    Rows log only some metrics (validation rows leave the train columns empty, and so on):
    empty cells, cells that are not numbers, and rows without a step are skipped.
    """
    series: dict[str, list[tuple[int, float]]] = {}
    with Path(metrics_csv).open(newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                step = int(float(row.get("step") or ""))
            except ValueError:
                continue
            for key, cell in row.items():
                if key in BOOKKEEPING or not (cell or "").strip():
                    continue
                try:
                    series.setdefault(key, []).append((step, float(cell)))
                except ValueError:
                    continue
    return series
