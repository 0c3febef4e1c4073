"""The evaluation report: loss curves, a before/after bar chart and a markdown summary.

Plots are drawn with matplotlib's Agg backend, chosen here before pyplot is imported, so they
render on a headless machine (no display, no GUI toolkit).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # must precede the pyplot import; no display is needed or wanted

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from lorafit.runs.metrics_log import read_metrics

_CELL_LIMIT = 300  # longest sample cell, in characters, before it is shortened with an ellipsis


def step_axis(ax: Any) -> None:
    """An x axis of optimizer steps: whole numbers only, as logs and checkpoints count them."""
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


@contextmanager
def figure(out_png: Path, size: tuple[float, float] = (8, 4.5), columns: int = 1) -> Iterator[Any]:
    """Axes to draw on (a list of `columns` of them when more than one); on exit the figure is
    laid out, saved to `out_png` and closed."""
    fig, ax = plt.subplots(1, columns, figsize=size, squeeze=True)
    ax = list(ax) if columns > 1 else ax
    try:
        yield ax
        fig.tight_layout()
        out_png = Path(out_png)
        out_png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png, dpi=120)
    finally:
        plt.close(fig)


def _read_loss_series(metrics_csv: Path, column: str) -> tuple[list[float], list[float]]:
    """The (steps, values) of one column of a CSVLogger metrics.csv, skipping empty cells."""
    points = [(s, v) for s, v in read_metrics(metrics_csv).get(column, []) if math.isfinite(v)]
    return [float(s) for s, _ in points], [v for _, v in points]


def plot_loss_curves(metrics_csv: Path, out_png: Path) -> Path | None:
    """Plot `train/loss` and `val/loss` against `step` from a Lightning CSVLogger metrics.csv.

    Lightning writes one row per logging call, so most cells of a column are empty; a column that
    was never logged (no validation, say) is simply missing. Both are skipped.

    Args:
        metrics_csv: The CSVLogger's metrics.csv.
        out_png: Where to write the figure; parent folders are created.

    Returns:
        `out_png`, or None (nothing written) when the file holds no loss value at all.
    """
    train_steps, train_loss = _read_loss_series(metrics_csv, "train/loss")
    val_steps, val_loss = _read_loss_series(metrics_csv, "val/loss")
    if not train_loss and not val_loss:
        return None

    with figure(out_png) as ax:
        if train_loss:
            ax.plot(train_steps, train_loss, label="train/loss", linewidth=1.2)
        if val_loss:
            ax.plot(val_steps, val_loss, marker="o", linestyle="-", label="val/loss")
        step_axis(ax)
        ax.set_ylabel("loss")
        ax.set_title("Training and validation loss")
        ax.grid(True, alpha=0.3)
        ax.legend()
    return Path(out_png)


def plot_before_after(
    before: Mapping[str, float], after: Mapping[str, float], out_png: Path, keys: Sequence[str]
) -> Path:
    """Grouped bars, "base model" next to "fine-tuned", for each of `keys` present in both.

    Args:
        before: Metrics of the base model.
        after: Metrics of the fine-tuned model.
        out_png: Where to write the figure; parent folders are created.
        keys: The metrics to show, in this order; those missing from either mapping are skipped.

    Returns:
        `out_png`.

    Raises:
        ValueError: If none of `keys` is in both mappings.
    """
    shown = [key for key in keys if key in before and key in after]
    if not shown:
        raise ValueError(f"none of the metrics {list(keys)!r} is in both before and after")

    # Losses and scores differ in scale and direction (lower is better for a loss, higher for
    # a score in [0, 1]): each group gets its own panel.
    losses = [k for k in shown if "loss" in k or "ppl" in k]
    scores = [k for k in shown if k not in losses]
    groups = [
        (keys, title)
        for keys, title in ((losses, "lower is better"), (scores, "higher is better"))
        if keys
    ]
    with figure(out_png, size=(max(5.0, 1.6 * len(shown) + 3), 4.5), columns=len(groups)) as axes:
        for ax, (keys_here, title) in zip(axes if len(groups) > 1 else [axes], groups, strict=True):
            _bars(ax, before, after, keys_here, title)
    return Path(out_png)


def _scored_rows(metrics: Mapping[str, float]) -> int | None:
    supports = [v for k, v in metrics.items() if k.startswith("cls/support/")]
    return int(sum(supports)) if supports else None


def _bars(
    ax: Any,
    before: Mapping[str, float],
    after: Mapping[str, float],
    keys: Sequence[str],
    title: str,
) -> None:
    width = 0.38
    xs = range(len(keys))
    base = ax.bar(
        [x - width / 2 for x in xs], [float(before[k]) for k in keys], width, label="base model"
    )
    tuned = ax.bar(
        [x + width / 2 for x in xs], [float(after[k]) for k in keys], width, label="fine-tuned"
    )
    ax.bar_label(base, fmt="%.4f", padding=2, fontsize=8)
    ax.bar_label(tuned, fmt="%.4f", padding=2, fontsize=8)
    rows = _scored_rows(after)
    # Classification scores cover only the rows whose reference is a label: say how many.
    names = [
        f"{k}\n(n={rows} rows)" if k.startswith("cls/") and rows is not None else k for k in keys
    ]
    ax.set_xticks(list(xs), names)
    if all("loss" not in k and "ppl" not in k for k in keys):
        ax.set_ylim(0, 1.1)  # scores live in [0, 1]
    ax.set_title(f"Base model vs fine-tuned: {title}")
    ax.margins(y=0.15)  # room above the tallest bar for its label
    ax.legend(fontsize=8)


def _format_value(value: object) -> str:
    """Floats to 4 decimal places, everything else (counts, strings) as is."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    return f"{value:.4f}"


def _format_change(before: object, after: object) -> str:
    """`after - before` with its sign, or empty when either is not a number."""
    numbers = (int, float)
    if not isinstance(before, numbers) or not isinstance(after, numbers):
        return ""
    if isinstance(before, bool) or isinstance(after, bool):
        return ""
    change = after - before
    if isinstance(change, int):
        return f"{change:+d}"
    return f"{change:+.4f}"


def _cell(text: object) -> str:
    """One markdown table cell: shortened, `|` escaped, newlines as `<br>`."""
    text = str(text)
    if len(text) > _CELL_LIMIT:
        text = text[: _CELL_LIMIT - 1].rstrip() + "…"
    text = text.replace("\\", "\\\\").replace("|", "\\|")
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "<br>")


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def write_report(
    out_md: Path,
    title: str,
    metrics: Mapping[str, float],
    samples: Sequence[Mapping[str, str]],
    images: Sequence[Path] = (),
    before: Mapping[str, float] | None = None,
) -> Path:
    """Write the evaluation report as markdown.

    Args:
        out_md: Where to write it; parent folders are created.
        title: The level-1 heading.
        metrics: The fine-tuned model's metrics, shown in this order.
        samples: Rows with `prompt`, `reference` and `generation` (a missing key is an empty cell).
        images: PNGs to embed, linked relative to the report's folder (absolute when they are
            on another drive and no relative path exists).
        before: The base model's metrics; when given the table gains "base model" and "change"
            columns (a metric the base model lacks gets empty cells there).

    Returns:
        `out_md`.
    """
    out_md = Path(out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", "## Metrics", ""]
    if before is None:
        lines += [_row(["metric", "value"]), _row(["---", "---:"])]
        lines += [_row([_cell(k), _format_value(v)]) for k, v in metrics.items()]
    else:
        lines += [
            _row(["metric", "base model", "fine-tuned", "change"]),
            _row(["---", "---:", "---:", "---:"]),
        ]
        for key, value in metrics.items():
            old = before.get(key)
            lines.append(
                _row(
                    [
                        _cell(key),
                        "" if old is None else _format_value(old),
                        _format_value(value),
                        "" if old is None else _format_change(old, value),
                    ]
                )
            )
    lines.append("")

    if images:
        lines += ["## Plots", ""]
        for image in images:
            link = _relative_link(Path(image), out_md.parent)
            lines += [f"![{Path(image).stem}]({link})", ""]

    lines += ["## Samples", ""]
    if samples:
        lines += [_row(["prompt", "reference", "generation"]), _row(["---", "---", "---"])]
        for sample in samples:
            lines.append(
                _row([_cell(sample.get(k, "")) for k in ("prompt", "reference", "generation")])
            )
    else:
        lines.append("_No samples._")
    lines.append("")

    out_md.write_text("\n".join(lines), encoding="utf-8")
    return out_md


def _relative_link(image: Path, base: Path) -> str:
    """`image` relative to `base`, with forward slashes and spaces escaped for markdown."""
    try:
        link = os.path.relpath(image.resolve(), base.resolve())
    except ValueError:  # different drives on Windows: no relative path exists
        link = str(image.resolve())
    return Path(link).as_posix().replace(" ", "%20")
