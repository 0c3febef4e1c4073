"""Rank the runs of a sweep: one table of every trial's overrides and final metrics, sorted
by the objective, and their validation loss curves on one plot.

    python -m lorafit.eval.leaderboard outputs/multirun/<time>            # objective val/loss
    python -m lorafit.eval.leaderboard outputs/multirun/<time> --objective train/loss --maximize

Writes leaderboard.md, leaderboard.csv and val_loss_curves.png into the sweep folder.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from omegaconf import OmegaConf

from lorafit.errors import EvaluationError, exit_on_user_errors
from lorafit.eval.report import figure, step_axis
from lorafit.runs.metrics_log import read_metrics

METRICS = ("val/loss", "val/ppl", "train/loss", "train/tokens_per_s")


def collect(sweep: Path) -> list[dict]:
    """One entry per finished trial folder: its overrides, final metrics and curves."""
    trials = []
    for folder in sorted(p for p in sweep.iterdir() if (p / "csv" / "metrics.csv").is_file()):
        overrides = (
            OmegaConf.load(folder / ".hydra" / "overrides.yaml")
            if (folder / ".hydra" / "overrides.yaml").is_file()
            else []
        )
        curves = read_metrics(folder / "csv" / "metrics.csv")
        final = {key: points[-1][1] for key, points in curves.items()}
        trials.append(
            {"trial": folder.name, "overrides": list(overrides), "final": final, "curves": curves}
        )
    return trials


def _varying(trials: list[dict]) -> list[list[str]]:
    # Overrides every trial shares (the experiment, the sweep itself) say nothing about rank.
    shared = set.intersection(*(set(t["overrides"]) for t in trials)) if trials else set()
    return [[o for o in t["overrides"] if o not in shared] for t in trials]


def write(sweep: Path, objective: str = "val/loss", maximize: bool = False) -> list[dict]:
    """Write the leaderboard files; returns the trials in rank order."""
    trials = collect(sweep)
    if not trials:
        raise EvaluationError(f"{sweep}: no trial folder with csv/metrics.csv")

    def key(trial: dict) -> float:
        value = trial["final"].get(objective, math.nan)
        return math.inf if math.isnan(value) else (-value if maximize else value)

    for trial, varying in zip(trials, _varying(trials), strict=True):
        trial["varying"] = " ".join(varying) or "(none)"
    trials.sort(key=key)
    columns = [objective, *[m for m in METRICS if m != objective]]
    with open(sweep / "leaderboard.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rank", "trial", "overrides", *columns])
        for rank, trial in enumerate(trials, 1):
            writer.writerow(
                [
                    rank,
                    trial["trial"],
                    trial["varying"],
                    *[trial["final"].get(c, "") for c in columns],
                ]
            )
    lines = [
        f"# Leaderboard: {sweep.name}",
        "",
        f"Sorted by {objective} ({'higher' if maximize else 'lower'} is better).",
        "",
        "| rank | trial | overrides | " + " | ".join(columns) + " |",
        "| --- | --- | --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for rank, trial in enumerate(trials, 1):
        cells = [f"{trial['final'][c]:.4f}" if c in trial["final"] else "" for c in columns]
        lines.append(
            f"| {rank} | {trial['trial']} | `{trial['varying']}` | " + " | ".join(cells) + " |"
        )
    lines += ["", "![validation loss](val_loss_curves.png)", ""]
    (sweep / "leaderboard.md").write_text("\n".join(lines))
    _plot(trials, sweep / "val_loss_curves.png")
    return trials


def _plot(trials: list[dict], out: Path) -> None:
    with figure(out) as ax:
        for trial in trials:
            points = trial["curves"].get("val/loss") or trial["curves"].get("train/loss", [])
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="o", label=f"{trial['trial']}: {trial['varying']}")
        step_axis(ax)
        ax.set_ylabel("val/loss")
        ax.set_title("Validation loss by trial")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)


@exit_on_user_errors
def main() -> None:
    parser = argparse.ArgumentParser(description="Rank the trials of a Hydra sweep folder.")
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--objective", default="val/loss")
    parser.add_argument("--maximize", action="store_true")
    args = parser.parse_args()
    print_ranking(write(args.sweep, args.objective, args.maximize), args.objective, args.sweep)


def print_ranking(trials: list[dict], objective: str, sweep: Path) -> None:
    """The trials as `write` ranked them, a line each, and where the files went."""
    for rank, trial in enumerate(trials, 1):
        print(
            f"{rank}. trial {trial['trial']}: {objective}={trial['final'].get(objective)} "
            f"{trial['varying']}"
        )
    print(f"wrote {sweep / 'leaderboard.md'}")


if __name__ == "__main__":
    main()
