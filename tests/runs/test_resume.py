"""Resume is exact: a run killed with SIGKILL after a checkpoint and resumed produces the same
per-step losses as the run that was never interrupted; a mismatched resume is refused."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch

from helpers import TINY, compose_config, logged
from helpers.fault_injection import start_slow_run, wait_for
from lorafit.errors import CheckpointError, ConfigError
from lorafit.training import build_run, train

# Dropout on, validation every 2 steps, a checkpoint after every step, all of them kept.
RUN = [
    *TINY,
    "adapter.dropout=0.1",
    "trainer.max_steps=10",
    "callbacks.model_checkpoint.every_n_train_steps=1",
    "callbacks.model_checkpoint.save_top_k=-1",
]


def _killed_run(folder: Path, kill_after: Path) -> None:
    """Run train.py in a subprocess and SIGKILL it as soon as `kill_after` exists."""
    process = start_slow_run(folder, RUN, seconds=0.5)
    try:
        wait_for(process, kill_after.exists)
        time.sleep(0.1)  # the file appears when its rename lands; let the step finish
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_a_killed_and_resumed_run_continues_the_same_losses(tmp_path):
    train(compose_config(RUN, tmp_path / "unbroken"))
    unbroken = logged(tmp_path / "unbroken", "train/loss")
    checkpoint = tmp_path / "killed" / "checkpoints" / "step000004.ckpt"
    _killed_run(tmp_path / "killed", kill_after=checkpoint.with_name("step000005.ckpt"))
    train(compose_config([*RUN, f"resume_from_checkpoint={checkpoint}"], tmp_path / "resumed"))
    resumed = logged(tmp_path / "resumed", "train/loss")
    assert len(unbroken) == 10 and len(resumed) == 6
    torch.testing.assert_close(resumed, unbroken[4:], rtol=0, atol=1e-6)
    assert checkpoint.is_file()  # the resumed run never deletes what it resumed from
    val_unbroken, val_resumed = (logged(tmp_path / n, "val/loss") for n in ("unbroken", "resumed"))
    torch.testing.assert_close(val_resumed, val_unbroken[-len(val_resumed) :], rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("adapter.r=4", "adapter.r"),
        ("data.sequence_len=96", "data.sequence_len"),
        ("model.source.hidden_size=32", "model"),
    ],
)
def test_resuming_under_a_different_config_is_refused(tmp_path, change, named):
    train(compose_config([*TINY, "trainer.max_steps=2"], tmp_path / "first"))
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    again = [*TINY, "trainer.max_steps=4", f"resume_from_checkpoint={tmp_path / 'first'}", change]
    with pytest.raises(ConfigError, match=f"different run.*{named}"):
        train(compose_config(again, tmp_path / "second"))
    assert not (tmp_path / "second" / "checkpoints").exists()
    assert last.is_file()


def test_a_missing_resume_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nope"):
        train(compose_config([*TINY, f"resume_from_checkpoint={tmp_path / 'nope'}"], tmp_path))


@pytest.mark.slow
def test_resume_force_continues_despite_a_difference(tmp_path):
    train(compose_config([*TINY, "trainer.max_steps=2"], tmp_path / "first"))
    again = [
        *TINY,
        "trainer.max_steps=4",
        f"resume_from_checkpoint={tmp_path / 'first'}",
        "data.sequence_len=96",
        "resume_force=true",
    ]
    train(compose_config(again, tmp_path / "second"))
    assert len(logged(tmp_path / "second", "train/loss")) == 2


@pytest.mark.slow
def test_a_resumed_run_keeps_the_best_validation_loss_of_the_run_it_resumed(tmp_path):
    source = [*TINY, "trainer.max_steps=4", "trainer.val_check_interval=2"]
    train(compose_config(source, tmp_path / "source"))
    best = min(logged(tmp_path / "source", "val/loss"))
    (best_file,) = (tmp_path / "source" / "checkpoints").glob("best-*.ckpt")
    # The resumed run validates on its first batch only (harder rows here, a higher loss), so
    # the source's best is out of its reach: exactly the case where a resumed run used to
    # call its own worse checkpoint the best.
    resumed = [
        *source,
        "trainer.max_steps=6",
        "trainer.limit_val_batches=1",
        f"resume_from_checkpoint={tmp_path / 'source'}",
    ]
    run = build_run(compose_config(resumed, tmp_path / "resumed"))
    run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=run.resume)
    assert min(logged(tmp_path / "resumed", "val/loss")) > best
    callback = next(c for c in run.trainer.checkpoint_callbacks if c.monitor == "val/loss")
    assert float(callback.best_model_score) == pytest.approx(best)
    assert Path(callback.best_model_path) == best_file and best_file.is_file()
    assert list((tmp_path / "resumed" / "checkpoints").glob("best-*.ckpt")) == []


@pytest.mark.slow
def test_a_compiled_offloaded_qlora_run_resumes_exactly(tmp_path):
    # The canonical experiment's speed settings (model.compile, model.offload_activations): the
    # compiled modules keep their parameters' names, so a checkpoint loads back into them. Its
    # optimizer too: paged AdamW's states, views of one buffer, saved and copied back in.
    run = [
        *TINY,
        "optimizer=paged_adamw_32bit",
        "optimizer.lr=1e-3",
        "adapter=qlora",
        "adapter.dropout=0.1",
        "trainer=cpu_bf16",
        "model.gradient_checkpointing=true",
        "model.compile=true",
        "model.offload_activations=true",
        "trainer.max_steps=4",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "callbacks.model_checkpoint.save_top_k=-1",
    ]
    train(compose_config(run, tmp_path / "unbroken"))
    unbroken = logged(tmp_path / "unbroken", "train/loss")
    checkpoint = tmp_path / "unbroken" / "checkpoints" / "step000002.ckpt"
    train(compose_config([*run, f"resume_from_checkpoint={checkpoint}"], tmp_path / "resumed"))
    resumed = logged(tmp_path / "resumed", "train/loss")
    assert len(unbroken) == 4 and len(resumed) == 2
    torch.testing.assert_close(resumed, unbroken[2:], rtol=0, atol=1e-6)
