"""A callback that makes each training step take a while, so a test can kill a run mid-way."""

import time

import lightning.pytorch as pl


class SleepEachStep(pl.Callback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, *args, **kwargs) -> None:
        time.sleep(self.seconds)
