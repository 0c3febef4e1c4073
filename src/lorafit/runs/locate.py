"""Which files a checkpoint setting (`ckpt`, `resume_from_checkpoint`) stands for, and which
run they belong to. Paths only, nothing read and no heavy import: the entry points use it to
pick their output folder before the libraries load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lorafit.errors import CheckpointError


@dataclass
class Checkpoint:
    """A resolved `ckpt=` value.

    Attributes:
        kind: "none" (base model), "lightning" (a .ckpt file) or "adapter" (a peft folder).
        path: The file or folder holding the weights; None for "none".
        run_dir: The training run the weights came from, when known.
    """

    kind: str
    path: Path | None = None
    run_dir: Path | None = None

    @property
    def run_config(self) -> DictConfig | None:
        if self.run_dir is None:
            return None
        return OmegaConf.load(self.run_dir / "config.yaml")


def _run_of(folder: Path) -> Path | None:
    return folder if (folder / "config.yaml").is_file() else None


# Where `last` looks for the newest run.
RUNS = Path("outputs/runs")


def locate(
    value: str | Path | None, key: str, prefer: str = "adapter", runs: Path = RUNS
) -> Checkpoint:
    """The one reading of a checkpoint setting (`ckpt`, `resume_from_checkpoint`).

    `value` is a Lightning .ckpt file, a peft adapter folder, a run folder, `last` (the newest
    run under `runs`) or none. From a run folder, `prefer="adapter"` takes its adapter/ (then
    checkpoints/last.ckpt); `prefer="lightning"` takes checkpoints/last.ckpt only, as resuming
    needs the optimizer and data position an adapter folder does not hold. Only the paths are
    checked here; `resolve` also reads the files.
    """
    if value is None or str(value).lower() == "none":
        return Checkpoint("none")
    if str(value) == "last":
        found = [
            located
            for run in runs.glob("*/")
            if _run_of(run) and (located := _in_run(run, prefer)) is not None
        ]
        if not found:
            wanted = "checkpoints/last.ckpt" if prefer == "lightning" else "adapter or checkpoint"
            raise CheckpointError(f"{key}=last: no run under {runs} has an {wanted}")
        return max(found, key=lambda c: c.path.stat().st_mtime)
    path = Path(str(value)).expanduser()
    if not path.exists():
        raise CheckpointError(f"{key}={value}: no such file or folder")
    if path.is_file():
        if path.suffix != ".ckpt":
            raise CheckpointError(f"{key}={value}: expected a .ckpt file, an adapter or run folder")
        return Checkpoint("lightning", path, _run_of(path.parent.parent))
    if (path / "adapter_config.json").is_file():
        if prefer == "lightning":
            raise CheckpointError(
                f"{key}={value} is an adapter folder, which holds no optimizer or data position: "
                "resume from its run folder or a .ckpt, or start from its weights with "
                f"adapter.lora_model_dir={value}"
            )
        return Checkpoint("adapter", path, _run_of(path.parent))
    if _run_of(path):
        located = _in_run(path, prefer)
        if located is None:
            wanted = (
                "checkpoints/last.ckpt" if prefer == "lightning" else "adapter/ nor checkpoints/"
            )
            raise CheckpointError(f"{key}={value}: the run folder has no {wanted}")
        return located
    # Hydra numbers a sweep's trials 0, 1, ..., 10: in that order, not the alphabet's.
    trials = sorted((sub.name for sub in path.iterdir() if _run_of(sub)), key=lambda n: (len(n), n))
    if trials:
        # A sweep's folder (python train.py -m ...): its trials are the runs.
        shown = ", ".join(trials[:3]) + (", ..." if len(trials) > 3 else "")
        # Named only where the sweep wrote one: one stopped early or logged to wandb only has none.
        ranked = "; its leaderboard.md ranks them" if (path / "leaderboard.md").is_file() else ""
        raise CheckpointError(
            f"{key}={value} is a sweep's folder, not a run: name one of its trials "
            f"({shown}), e.g. {key}={path / trials[0]}{ranked}"
        )
    raise CheckpointError(
        f"{key}={value}: not a run folder (config.yaml), an adapter folder "
        "(adapter_config.json) or a Lightning .ckpt file"
    )


def _in_run(run: Path, prefer: str) -> Checkpoint | None:
    if prefer == "adapter" and (run / "adapter" / "adapter_config.json").is_file():
        return Checkpoint("adapter", run / "adapter", run)
    last = run / "checkpoints" / "last.ckpt"
    return Checkpoint("lightning", last, run) if last.is_file() else None


# Where eval.py, generate.py and export.py write when their checkpoint belongs to no run.
BASE_MODEL_FOLDER = Path("outputs/base_model")


def run_folder_of(ckpt: str | None) -> str:
    """The folder the tools reading `ckpt` write into (as `<it>/<tool>/<time>`): the run the
    checkpoint came from, else the folder holding it; outputs/base_model for none. A value
    that names nothing falls back to outputs/runs; the tool then stops on it (and removes the
    folder again)."""
    try:
        checkpoint = locate(ckpt, "ckpt")
    except CheckpointError:
        return str(RUNS)
    if checkpoint.kind == "none":
        return str(BASE_MODEL_FOLDER)
    if checkpoint.run_dir is not None:
        return str(checkpoint.run_dir)
    return str(checkpoint.path.parent)  # beside a loose adapter folder or .ckpt, not in it


def register_resolvers() -> None:
    """`${run_folder:${ckpt}}` for conf/eval.yaml's hydra.run.dir."""
    OmegaConf.register_new_resolver("run_folder", run_folder_of, replace=True)
