"""One reading of a checkpoint setting for eval (`ckpt`) and resume (`resume_from_checkpoint`):
which file a run folder, an adapter folder, a .ckpt or `last` stands for."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import compose_config
from lorafit.errors import CheckpointError
from lorafit.runs.checkpoints import merge_run_config
from lorafit.runs.locate import locate
from lorafit.runs.resume import checkpoint_path


def _run(folder: Path, adapter: bool, last: bool, age: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("model: {}\n")
    made = []
    if adapter:
        (folder / "adapter").mkdir()
        made.append(folder / "adapter" / "adapter_config.json")
    if last:
        (folder / "checkpoints").mkdir()
        made.append(folder / "checkpoints" / "last.ckpt")
    for path in made:
        path.write_text("{}")
        os.utime(path, (1_000_000 + age, 1_000_000 + age))
    return folder


@pytest.fixture
def runs(tmp_path) -> Path:
    _run(tmp_path / "old", adapter=True, last=True, age=1)
    _run(tmp_path / "adapter_only", adapter=True, last=False, age=3)
    _run(tmp_path / "newest_ckpt", adapter=False, last=True, age=2)
    (tmp_path / "an_eval").mkdir()  # a folder without a run's config is no run
    return tmp_path


def test_a_run_folder_means_its_adapter_for_eval_and_its_last_ckpt_for_resume(runs):
    evaluated = locate(runs / "old", "ckpt")
    assert (evaluated.kind, evaluated.path, evaluated.run_dir) == (
        "adapter",
        runs / "old" / "adapter",
        runs / "old",
    )
    resumed = locate(runs / "old", "resume_from_checkpoint", prefer="lightning")
    assert (resumed.kind, resumed.path) == ("lightning", runs / "old" / "checkpoints" / "last.ckpt")
    assert checkpoint_path(str(runs / "old")) == resumed.path


def test_last_is_the_newest_run_that_has_what_is_asked_for(runs):
    assert locate("last", "ckpt", runs=runs).path == runs / "adapter_only" / "adapter"
    assert checkpoint_path("last", runs=runs) == runs / "newest_ckpt" / "checkpoints" / "last.ckpt"
    assert checkpoint_path(None) is None and locate("none", "ckpt").kind == "none"


def test_what_cannot_be_resumed_is_named(runs, tmp_path):
    with pytest.raises(CheckpointError, match="adapter_only: the run folder has no checkpoints"):
        checkpoint_path(str(runs / "adapter_only"))
    with pytest.raises(CheckpointError, match="is an adapter folder.*adapter.lora_model_dir="):
        checkpoint_path(str(runs / "old" / "adapter"))
    with pytest.raises(CheckpointError, match="resume_from_checkpoint=last: no run under"):
        checkpoint_path("last", runs=tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="ckpt=.*an_eval: not a run folder"):
        locate(runs / "an_eval", "ckpt")


def test_a_sweep_s_folder_is_refused_with_its_trials_named(tmp_path):
    sweep = tmp_path / "multirun" / "2026-11-28_16-05-02"
    for trial in range(11):
        _run(sweep / str(trial), adapter=True, last=True, age=trial)
    (sweep / "leaderboard.md").write_text("")
    expected = f"sweep's folder, not a run.*trials \\(0, 1, 2, ...\\), e.g. ckpt={sweep}/0;"
    with pytest.raises(CheckpointError, match=expected):
        locate(sweep, "ckpt")
    with pytest.raises(CheckpointError, match="e.g. resume_from_checkpoint="):
        checkpoint_path(str(sweep))


def test_a_key_set_on_the_command_line_changes_only_that_key_of_the_runs_config(tmp_path):
    run = tmp_path / "run"
    train_cfg = compose_config(["experiment=tiny", "data.sequence_len=77"], run)
    run.mkdir()
    (run / "config.yaml").write_text(OmegaConf.to_yaml(train_cfg, resolve=True))
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_text("")

    def merged(*overrides: str):
        cfg = compose_config([f"ckpt={run}", *overrides])
        return merge_run_config(cfg, locate(run, "ckpt"), [f"ckpt={run}", *overrides])

    one_key = merged("data.val_set_size=0")
    assert (one_key.data.sequence_len, one_key.data.val_set_size) == (77, 0)
    assert one_key.model.source.hidden_size == 64  # the run's model, not the default
    other_data = merged("data=demo")  # a group chosen whole replaces the run's
    assert other_data.data.sequence_len == 512 and other_data.model.source.hidden_size == 64
