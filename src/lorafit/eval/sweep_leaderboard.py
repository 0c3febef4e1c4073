"""At the end of a sweep (`python train.py -m ...`), rank its trials: Hydra calls this once all
of them have returned, with the sweep's own config, and the leaderboard lands in the sweep
folder as `python -m lorafit.eval.leaderboard <sweep>` writes it (that command re-ranks by
another objective)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class LeaderboardAtSweepEnd(Callback):
    """Writes leaderboard.md, leaderboard.csv and val_loss_curves.png into the sweep folder,
    ranked by `objective`, and prints the ranking."""

    def __init__(self, objective: str = "val/loss", maximize: bool = False) -> None:
        self.objective = objective
        self.maximize = maximize

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # Imported here: every run, single ones too, builds this callback at start-up.
        from lorafit.errors import EvaluationError
        from lorafit.eval import leaderboard

        # The sweep's config caches `now` from when the launcher made the folder.
        sweep = Path(str(config.hydra.sweep.dir))
        try:
            trials = leaderboard.write(sweep, self.objective, self.maximize)
        except EvaluationError as error:
            # A sweep logged elsewhere only (logger=wandb) has no csv to rank; its trials stand.
            print(
                f"no leaderboard for this sweep: {error} (it reads the csv logger's files)",
                file=sys.stderr,
            )
            return
        # Printed, not logged: the logging set up for the last trial would also file these
        # lines in that trial's train.log.
        leaderboard.print_ranking(trials, self.objective, sweep)
