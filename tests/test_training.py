"""End-to-end training on the tiny random Mistral: golden losses, accumulation invariance,
adapter-only checkpoints, retention, and the exported adapter reloading in peft."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from peft import PeftModel

from helpers import TINY, compose_config, logged
from lorafit.runs.metrics_log import read_metrics
from lorafit.runs.progress import StepProgressBar
from lorafit.training import build_run, train

# Per-step train/loss of GOLDEN_RUN; fp32, seed 42, torch 2.13 CPU, transformers 5.24, peft 0.21.2,
# bitsandbytes 0.50.2, lightning 2.6.6. To regenerate, run the test and copy the actual values
# from the failure message:  pytest tests/test_training.py -k golden
GOLDEN = {
    "lora": [
        10.394060134887695,
        10.121122360229492,
        10.156268119812012,
        10.078582763671875,
        10.050688743591309,
    ],
    "qlora": [
        10.3978271484375,
        10.12596607208252,
        10.158365249633789,
        10.077045440673828,
        10.05145263671875,
    ],
}
GOLDEN_RUN = TINY + [
    "adapter.dropout=0.0",
    "trainer.max_steps=5",
    "data.batch_size=4",
    "trainer.val_check_interval=1.0",
]


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
@pytest.mark.parametrize("micro_batch_size", [4, 2])
def test_golden_losses_are_the_same_for_any_accumulation(tmp_path, adapter, micro_batch_size):
    # (micro 4, accumulate 1) and (micro 2, accumulate 2) share one expected list.
    overrides = GOLDEN_RUN + [f"adapter={adapter}", f"data.micro_batch_size={micro_batch_size}"]
    train(compose_config(overrides, tmp_path))
    losses = logged(tmp_path, "train/loss")
    torch.testing.assert_close(losses, GOLDEN[adapter], rtol=0, atol=5e-5)
    assert losses[-1] < losses[0] - 0.2


def _fit(tmp_path: Path, overrides: list[str]):
    run = build_run(compose_config(TINY + overrides, tmp_path))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    return run


def test_switching_the_progress_bar_off_keeps_the_rest(tmp_path):
    # callbacks.progress_bar stays configured; Lightning alone would refuse the combination.
    cfg = compose_config([*TINY, "trainer.max_steps=1"], tmp_path)
    assert cfg.callbacks.progress_bar is not None and not cfg.trainer.enable_progress_bar
    run = build_run(cfg)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.progress_bar_callback is None and run.trainer.global_step == 1
    assert run.trainer.checkpoint_callback is not None  # the other callbacks are kept


def test_every_step_reaches_the_logs_numbered_as_the_checkpoints(tmp_path):
    # Fewer steps than log_every_n_steps: before, the CSV had no train row at all.
    overrides = [*TINY, "trainer.log_every_n_steps=50", "callbacks.model_checkpoint.save_top_k=-1"]
    overrides += ["callbacks.model_checkpoint.every_n_train_steps=2"]
    train(compose_config(overrides, tmp_path))
    series = read_metrics(tmp_path / "csv" / "metrics.csv")
    for key in ("train/loss", "train/lr", "train/tokens_per_s"):
        assert [step for step, _ in series[key]] == [1, 2, 3, 4], key
    # Validation after 2 and after 4 steps (tiny validates every 2 steps), and the checkpoints
    # written after those steps carry the same numbers.
    assert [step for step, _ in series["val/loss"]] == [2, 4]
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step*.ckpt"))
    assert names == ["step000002.ckpt", "step000004.ckpt"], names


@pytest.mark.parametrize(
    ("overrides", "total", "description"),
    [
        # 2 micro-batches a step: Lightning's own bar showed 8 of the epoch's 54 micro-batches.
        (["trainer.max_steps=4"], 4, "train"),
        (
            ["trainer.max_steps=-1", "trainer.max_epochs=2", "data.val_set_size=0.8"],
            12,
            "epoch 2/2",
        ),
    ],
)
def test_the_bar_counts_the_runs_optimizer_steps(tmp_path, overrides, total, description):
    bar = [*overrides, "trainer.enable_progress_bar=true", "trainer.limit_val_batches=1"]
    run = build_run(compose_config(TINY + bar, tmp_path))
    (progress,) = [c for c in run.trainer.callbacks if isinstance(c, StepProgressBar)]
    seen = []
    progress._stop_progress = lambda: seen.append(progress.progress.tasks[0])  # before teardown
    run.trainer.fit(run.module, datamodule=run.datamodule)
    task = seen[-1]
    assert (task.total, task.completed) == (total, total) == (total, run.trainer.global_step)
    assert description in task.description
    assert set(progress.get_metrics(run.trainer, run.module)) <= {"loss", "tokens/s", "val_loss"}


def test_validation_metrics_are_logged(tmp_path):
    metrics = train(compose_config(TINY, tmp_path))
    val = logged(tmp_path, "val/loss")
    assert len(val) == 2 and val[1] < val[0]
    assert metrics["val/ppl"] == pytest.approx(torch.tensor(metrics["val/loss"]).exp().item())
    assert logged(tmp_path, "train/tokens_per_s")[-1] > 0
    assert len(logged(tmp_path, "train/lr")) == 4


def test_tokens_per_second_cover_whole_steps_but_not_validation(tmp_path, monkeypatch):
    """train/tokens_per_s times a step from the previous optimizer step on, so the optimizer
    step and the loading between steps count, as in the benchmarks; validation does not. On a
    fake clock: 1 s a micro-batch's forward and backward, 10 s from an optimizer step to the
    next batch."""
    import lightning.pytorch as pl

    import lorafit.model.module as module_code

    class Clock:
        now = 0.0

        @classmethod
        def perf_counter(cls) -> float:
            return cls.now

    class Ticks(pl.Callback):
        def __init__(self) -> None:
            self.step, self.tokens = 0, [0]

        def on_after_backward(self, trainer, pl_module) -> None:
            Clock.now += 1

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.tokens[-1] += int(batch["real_tokens"])
            if trainer.global_step != self.step:  # this micro-batch ended a step
                self.step = trainer.global_step
                self.tokens.append(0)
                Clock.now += 10

    monkeypatch.setattr(module_code, "time", Clock)
    run = build_run(compose_config(TINY, tmp_path))  # 4 steps of 2, validation after 2 and 4
    ticks = Ticks()
    run.trainer.callbacks.append(ticks)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    seconds = [2, 12, 2, 12]  # the first step, and the first after validation, start afresh
    expected = [t / s for t, s in zip(ticks.tokens[:4], seconds, strict=True)]
    assert logged(tmp_path, "train/tokens_per_s") == pytest.approx(expected)


def test_exported_adapter_reloads_with_the_trained_logits(tmp_path):
    run = _fit(tmp_path, [])
    batch = next(iter(run.datamodule.val_dataloader()))
    trained = run.module.eval()
    with torch.no_grad():
        expected = trained(batch["input_ids"], batch["attention_mask"])
    source = instantiate(compose_config(TINY).model.source)
    base = source.load_model(
        dtype=torch.float32, quantization_config=None, attn_implementation="sdpa", device_map=None
    )
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        actual = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(actual.logits, expected, rtol=0, atol=1e-5)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_checkpoints_hold_adapter_and_optimizer_and_keep_the_newest(tmp_path):
    run = _fit(
        tmp_path,
        [
            "callbacks.model_checkpoint.every_n_train_steps=1",
            "callbacks.model_checkpoint.save_top_k=2",
        ],
    )
    folder = tmp_path / "checkpoints"
    names = sorted(p.name for p in folder.iterdir())
    # The newest two, last.ckpt, and the best by val/loss (validation ran at steps 2 and 4).
    assert names == ["best-step000004.ckpt", "last.ckpt", "step000003.ckpt", "step000004.ckpt"]
    checkpoint = torch.load(folder / "last.ckpt", weights_only=True)
    trainable = {n for n, p in run.module.named_parameters() if p.requires_grad}
    assert set(checkpoint["state_dict"]) == trainable
    assert all("lora_" in name for name in trainable)
    assert len(checkpoint["optimizer_states"][0]["state"]) == len(trainable)
    assert checkpoint["global_step"] == 4


@pytest.mark.slow
def test_the_same_seed_gives_the_same_losses_with_dropout(tmp_path):
    runs = []
    for name in ("first", "second"):
        train(
            compose_config([*TINY, "adapter.dropout=0.1", "trainer.max_steps=4"], tmp_path / name)
        )
        runs.append(logged(tmp_path / name, "train/loss"))
    assert runs[0] == runs[1]
    train(
        compose_config(
            [*TINY, "adapter.dropout=0.1", "trainer.max_steps=4", "seed=7"], tmp_path / "other"
        )
    )
    assert logged(tmp_path / "other", "train/loss") != runs[0]


@pytest.mark.slow
def test_two_process_ddp_gives_the_single_process_losses(tmp_path):
    # Same global batch of 8: one process accumulating 4 micro-batches of 2, or two processes
    # (gloo, CPU) accumulating 2 each; the step loss is the mean over the global batch either way.
    common = [
        *TINY,
        "adapter.dropout=0",
        "data.batch_size=8",
        "data.micro_batch_size=2",
        "trainer.max_steps=4",
        "trainer.val_check_interval=1.0",
    ]
    train(compose_config(common, tmp_path / "single"))
    root = Path(__file__).resolve().parents[1]
    ddp = [
        *common,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        f"output_dir={tmp_path / 'ddp'}",
        f"hydra.run.dir={tmp_path / 'ddp'}",
    ]
    result = subprocess.run(
        [sys.executable, str(root / "train.py"), *ddp], cwd=root, capture_output=True, timeout=300
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    torch.testing.assert_close(
        logged(tmp_path / "ddp", "train/loss"),
        logged(tmp_path / "single", "train/loss"),
        rtol=0,
        atol=1e-5,
    )


def test_bf16_on_cpu_trains_near_the_fp32_losses_with_fp32_adapters(tmp_path):
    """trainer=cpu_bf16 model.dtype=bfloat16: bf16 base weights and autocast, fp32 LoRA."""
    overrides = [*GOLDEN_RUN, "adapter=lora", "trainer=cpu_bf16", "model.dtype=bfloat16"]
    cfg = compose_config(overrides, tmp_path)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "cpu"
    run = build_run(cfg)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    losses = logged(tmp_path, "train/loss")
    # bf16 rounds each matmul to 8 bits of mantissa: near the fp32 golden run, not equal to it.
    torch.testing.assert_close(losses, GOLDEN["lora"], rtol=1e-2, atol=0)
    assert losses != GOLDEN["lora"] and losses[-1] < losses[0] - 0.2
    base = [p for n, p in run.module.named_parameters() if "lora_" not in n]
    lora = [p for n, p in run.module.named_parameters() if "lora_" in n]
    assert {p.dtype for p in base} == {torch.bfloat16}
    assert lora and {p.dtype for p in lora} == {torch.float32}


def test_a_micro_batch_reads_no_tensor_back_outside_the_model(tmp_path, monkeypatch):
    """On a GPU, reading a tensor's value on the host (`.item()`, `int()`, `float()`,
    `.tolist()`) waits for the GPU to compute it: in training_step, after the forward, the host
    could queue no backward until the GPU had caught up. So the micro-batches' losses stay on
    the device and their real tokens are counted on the host before the batch moves; the
    logged values are read once an optimizer step. (The model's forward reads the packed examples'
    bounds at its start: transformers' mask preparation and `packed_attention.spans_of`.)"""
    reads = []
    watching = [False]
    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
        real = getattr(torch.Tensor, name)

        def read(self, *args, _real=real, _name=name, **kwargs):
            if watching[0]:
                reads.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    run = build_run(compose_config(TINY + ["data.micro_batch_size=1"], tmp_path))
    module = run.module
    real_step, real_forward = module.training_step, module._loss_sum

    def training_step(*args, **kwargs):
        watching[0] = True
        try:
            return real_step(*args, **kwargs)
        finally:
            watching[0] = False

    def loss_sum(*args, **kwargs):  # the model's forward: not watched
        was, watching[0] = watching[0], False
        try:
            return real_forward(*args, **kwargs)
        finally:
            watching[0] = was

    monkeypatch.setattr(module, "training_step", training_step)
    monkeypatch.setattr(module, "_loss_sum", loss_sum)
    run.trainer.fit(module, datamodule=run.datamodule)
    assert run.trainer.accumulate_grad_batches > 1
    assert reads == []
    assert len(logged(tmp_path, "train/loss")) == 4
