"""callbacks.model_checkpoint.saves_per_epoch (N checkpoints an epoch, the interval worked out
when the run starts) and callbacks.early_stopping (off by default, on by override)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from helpers import TINY, compose_config
from lorafit.config_checks import check_values
from lorafit.errors import ConfigError
from lorafit.training import build_run

# 48 training rows in batches of 8: an epoch is 6 optimizer steps of 2 micro-batches.
SHORT_EPOCH = ["data.val_set_size=0.8", "trainer.max_steps=-1", "trainer.max_epochs=1"]
SHORT_EPOCH += ["trainer.limit_val_batches=1"]
EARLY_STOPPING = (
    "callbacks.early_stopping={_target_: lightning.pytorch.callbacks.EarlyStopping,"
    " monitor: val/loss, mode: min, patience: 1}"
)


def test_saves_per_epoch_becomes_a_step_interval_and_checkpoints_land_there(tmp_path):
    overrides = [*TINY, *SHORT_EPOCH, "callbacks.model_checkpoint.saves_per_epoch=3"]
    overrides += ["callbacks.model_checkpoint.save_top_k=-1"]
    run = build_run(compose_config(overrides, tmp_path))
    assert run.datamodule.optimizer_steps_per_epoch(1) == 6
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.checkpoint_callback._every_n_train_steps == 2
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step*.ckpt"))
    assert names == ["step000002.ckpt", "step000004.ckpt", "step000006.ckpt"]
    # The run's record keeps the option it was given.
    saved = OmegaConf.load(tmp_path / "config.yaml").callbacks.model_checkpoint
    assert saved.saves_per_epoch == 3


def test_more_saves_than_steps_saves_every_step(tmp_path):
    overrides = [*TINY, *SHORT_EPOCH, "callbacks.model_checkpoint.saves_per_epoch=50"]
    run = build_run(compose_config([*overrides, "trainer.max_steps=1"], tmp_path))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.checkpoint_callback._every_n_train_steps == 1
    assert (tmp_path / "checkpoints" / "step000001.ckpt").is_file()


def test_saves_per_epoch_is_off_by_default(tmp_path):
    run = build_run(compose_config([*TINY, "trainer.max_steps=1"], tmp_path))
    assert run.trainer.checkpoint_callback._every_n_train_steps == 50
    # Filed under Lightning's class name: runs saved before resume with their retention state.
    assert run.trainer.checkpoint_callback.state_key.startswith("ModelCheckpoint{")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["callbacks.model_checkpoint.saves_per_epoch=0"],
            r"callbacks\.model_checkpoint\.saves_per_epoch=0: expected an integer >= 1",
        ),
        (
            [
                "callbacks.model_checkpoint.saves_per_epoch=2",
                "+callbacks.model_checkpoint.every_n_epochs=1",
            ],
            r"saves_per_epoch=2 and callbacks\.model_checkpoint\.every_n_epochs=1 both set",
        ),
        (
            [EARLY_STOPPING, "data.val_set_size=0"],
            r"callbacks\.early_stopping watches val/loss, but data\.val_set_size=0",
        ),
    ],
)
def test_bad_settings_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_values(compose_config([*TINY, *overrides]))


def test_early_stopping_is_off_unless_switched_on():
    assert compose_config(TINY).callbacks.early_stopping is None
    assert compose_config([*TINY, EARLY_STOPPING]).callbacks.early_stopping.patience == 1


def test_a_run_without_progress_stops_after_patience_validations(tmp_path):
    # lr this small leaves the weights, so val/loss, as they are: the first validation (after
    # step 2) is the best, the second (after step 4) is one without improvement, patience 1.
    overrides = [*TINY, EARLY_STOPPING, "trainer.max_steps=20", "optimizer.lr=1e-20"]
    run = build_run(compose_config(overrides, tmp_path))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 4
    assert run.trainer.early_stopping_callback.stopped_epoch == 0
