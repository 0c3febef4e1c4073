"""The report's plots are real PNGs and its markdown holds the tables, escapes and image links."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lorafit.eval.report import plot_before_after, plot_loss_curves, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path: Path) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        assert image.width > 0 and image.height > 0


def test_loss_curves_png(tmp_path):
    # As Lightning's CSVLogger writes it: one row per logging call, the other cells empty.
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(
        "epoch,step,train/loss,train/lr,val/loss,val/ppl\n"
        "0,0,2.5,0.001,,\n"
        "0,1,2.1,0.001,,\n"
        "0,1,,,2.3,9.97\n"
        "0,2,1.8,0.001,,\n"
        "0,3,1.6,0.001,,\n"
        "0,3,,,1.9,6.69\n"
    )
    out = plot_loss_curves(csv_path, tmp_path / "plots" / "loss.png")
    assert out == tmp_path / "plots" / "loss.png"
    assert_valid_png(out)


def test_loss_curves_with_a_missing_val_column(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,step,train/loss\n0,0,2.5\n0,1,2.0\n")
    out = plot_loss_curves(csv_path, tmp_path / "loss.png")
    assert out is not None
    assert_valid_png(out)


def test_loss_curves_none_without_losses(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,step,train/lr,val/loss\n0,0,0.001,\n0,1,0.001,\n")
    out_png = tmp_path / "loss.png"
    assert plot_loss_curves(csv_path, out_png) is None
    assert not out_png.exists()


def test_before_after_png(tmp_path):
    before = {"exact_match": 0.1, "rouge_l": 0.32, "val/loss": 2.0}
    after = {"exact_match": 0.45, "rouge_l": 0.61}
    out = plot_before_after(
        before, after, tmp_path / "before_after.png", ["exact_match", "rouge_l"]
    )
    assert_valid_png(out)
    with pytest.raises(ValueError, match="none of the metrics"):
        plot_before_after(before, after, tmp_path / "x.png", ["val/loss"])


def test_losses_and_scores_get_their_own_panels_and_scores_say_their_rows(tmp_path, monkeypatch):
    import lorafit.eval.report as report

    drawn = []
    real_bars = report._bars
    monkeypatch.setattr(
        report,
        "_bars",
        lambda ax, b, a, keys, title: (
            drawn.append((list(keys), title)) or real_bars(ax, b, a, keys, title)
        ),
    )
    before = {"val/loss": 2.5, "exact_match": 0.1, "cls/f1_macro": 0.3}
    after = {"val/loss": 0.5, "exact_match": 0.6, "cls/f1_macro": 0.9, "cls/support/positive": 2}
    keys = ["val/loss", "exact_match", "cls/f1_macro"]
    assert_valid_png(plot_before_after(before, after, tmp_path / "ba.png", keys))
    assert drawn == [
        (["val/loss"], "lower is better"),
        (["exact_match", "cls/f1_macro"], "higher is better"),
    ]
    assert report._scored_rows(after) == 2


def test_report_markdown(tmp_path):
    plots = tmp_path / "plots"
    images = [plots / "loss.png", plots / "before_after.png"]
    samples = [
        {
            "prompt": "Classify: a | b",
            "reference": "first line\nsecond line",
            "generation": "x" * 400,
        }
    ]
    out = write_report(
        tmp_path / "report.md",
        "Evaluation of run-1",
        {"exact_match": 0.5, "rouge_l": 2 / 3, "rows": 6},
        samples,
        images=images,
    )
    text = out.read_text()
    assert text.startswith("# Evaluation of run-1\n")
    assert "| metric | value |" in text
    assert "| exact_match | 0.5000 |" in text
    assert "| rouge_l | 0.6667 |" in text
    assert "| rows | 6 |" in text
    # images linked relative to the report's folder
    assert "](plots/loss.png)" in text
    assert "](plots/before_after.png)" in text
    assert str(tmp_path) not in text
    # samples table: the pipe escaped, newlines as <br>, long cells shortened
    assert "| prompt | reference | generation |" in text
    assert "Classify: a \\| b" in text
    assert "first line<br>second line" in text
    assert "x" * 300 not in text
    assert "x" * 299 + "…" in text
    sample_row = next(line for line in text.splitlines() if line.startswith("| Classify"))
    assert sample_row.replace("\\|", "").count("|") == 4  # three cells, four separators


def test_report_markdown_before_after(tmp_path):
    out = write_report(
        tmp_path / "sub" / "report.md",
        "Before and after",
        {"exact_match": 0.45, "rouge_l": 0.61, "new": 1.0},
        [],
        images=[tmp_path / "before_after.png"],
        before={"exact_match": 0.1, "rouge_l": 0.7},
    )
    text = out.read_text()
    assert "| metric | base model | fine-tuned | change |" in text
    assert "| exact_match | 0.1000 | 0.4500 | +0.3500 |" in text
    assert "| rouge_l | 0.7000 | 0.6100 | -0.0900 |" in text
    assert "| new |  | 1.0000 |  |" in text
    assert "](../before_after.png)" in text
