"""The LightningModule: a (quantized) causal LM with a LoRA adapter, trained on token-level
cross entropy, with adapter-only checkpoints."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import DictConfig, OmegaConf
from torchmetrics import MeanMetric

from lorafit.constants import FINGERPRINT_KEY
from lorafit.errors import ConfigError
from lorafit.model import packed_attention
from lorafit.model.adapters import trainable_parameters
from lorafit.model.chunked_mlp import chunk_mlps
from lorafit.model.compiled_layers import (
    allow_recompiles,
    compile_decoder_layers,
    compile_rotary,
    compile_whole_layers,
)
from lorafit.model.fused_loss import linear_cross_entropy_sum
from lorafit.model.isolation import IsolationReport, check_isolation
from lorafit.model.liger import apply_liger_kernels, check_liger
from lorafit.model.loaded_embeddings import LoadedDtypeLinear
from lorafit.model.lora_branch import dequantize_in_torch
from lorafit.model.losses import token_loss_sum
from lorafit.model.offload import HostOffload
from lorafit.model.quantization import check_bitsandbytes, disable_cpu_weight_repacking

log = logging.getLogger(__name__)


class CausalLMModule(pl.LightningModule):
    """Fine-tunes a causal LM with the adapter, optimizer and schedule of a run's config.

    Args:
        model: The `model` config group (`source`, `dtype`, `attn_implementation`,
            `gradient_checkpointing`, `checkpoint_every`).
        adapter: The `adapter` config group (instantiates a LoraAdapter or FullFineTune).
        optimizer: A partial optimizer config (`_partial_: true`), finished with the
            trainable parameters.
        scheduler: A partial schedule from lorafit.model.schedules.
        fingerprint: What the run's checkpoints belong to (lorafit.runs.resume), saved in
            each of them; None for a module that does not train.
        load_device: Where `configure_model` puts quantized weights when no trainer is
            attached (the eval tools); a trainer's own device wins.

    Build it with `build_module`, as train and eval both do.
    """

    def __init__(
        self,
        model: dict[str, Any],
        adapter: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
        fingerprint: dict[str, Any] | None = None,
        load_device: str | torch.device = "cpu",
    ):
        super().__init__()
        # The run's identity and the eval device are not hyperparameters of the model.
        self.save_hyperparameters(ignore=["fingerprint", "load_device"])
        self.model: torch.nn.Module | None = None
        # Checkpoints hold only trainable weights; the frozen base is reloaded from its source.
        self.strict_loading = False
        self.val_loss = MeanMetric()
        # The losses of the optimizer step's micro-batches, left on the device (`step_loss`).
        self._step_losses: list[torch.Tensor] = []
        self._step_tokens = 0
        self._step_started: float | None = None
        self.load_device = torch.device(load_device)
        self.fingerprint = fingerprint
        # What the packing preflight found, when the run packs.
        self.isolation: IsolationReport | None = None
        # model.offload_activations: the saved-tensor hooks around each training forward.
        self._offload: HostOffload | None = None
        # model.compile: whether this module's decoder layers were compiled for training, and
        # what puts back, when the run ends, what compiling replaced for the process (the
        # rotary embedding's eager function; compiling whole layers, the attention's).
        self._compiled = False
        self._undo_compile: Callable[[], None] | None = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        spec = self.hparams.model
        adapter = instantiate(self.hparams.adapter)
        # The trainer's device, not self.device: Lightning moves the module only after this hook.
        device = self._trainer.strategy.root_device if self._trainer else self.load_device
        if adapter.bits is not None:
            check_bitsandbytes(device, adapter.bits)
        # Speed options for training only: eval, generate and export run the plain model, on
        # any device, whatever the run trained with.
        fitting = self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        liger = fitting and spec.get("liger_kernels", False)
        if liger:
            check_liger(device.type)
        # Loading may draw from the global RNG a varying number of times (weight init it then
        # overwrites); isolating it keeps adapter init and dropout the same for the same seed.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            base = self._load_base(spec, adapter, device)
        disable_cpu_weight_repacking(base)
        if liger:  # before the adapter: peft's layers sit inside the patched modules
            log.info("Liger kernels: %s", ", ".join(apply_liger_kernels(base)))
        self.model = adapter.apply(
            base,
            gradient_checkpointing=spec["gradient_checkpointing"],
            # Absent from the configs of runs saved before the key existed: every layer.
            checkpoint_every=spec.get("checkpoint_every", 1),
            # Likewise; either form gives the same numbers.
            reentrant=spec.get("reentrant_checkpointing", True),
        )
        if fitting and spec.get("dequantize", "bitsandbytes") == "compiled":
            log.info(
                "4-bit weights dequantized by compiled code: %d", dequantize_in_torch(self.model)
            )
        chunk_tokens = spec.get("mlp_chunk_tokens")
        if fitting and chunk_tokens:
            log.info(
                "MLPs run %d tokens a call: %d", chunk_tokens, chunk_mlps(self.model, chunk_tokens)
            )
        if fitting and spec.get("compile", False):
            mode = spec.get("compile_mode")
            if spec.get("compile_scope", "modules") == "layers":
                undo_scope = compile_whole_layers(self.model, mode)
                log.info("compiled decoder layers: whole")
            else:
                log.info("compiled decoder layers: %d", compile_decoder_layers(self.model, mode))
                undo_scope = compile_rotary(self.model, mode)
            undo_limit = allow_recompiles()

            def undo() -> None:
                undo_scope()
                undo_limit()

            self._undo_compile = undo
            self._compiled = True
        # from_pretrained returns eval mode, and Lightning keeps the modes it finds: without
        # this, dropout (lora_dropout included) would silently never apply.
        self.model.train()
        counts = trainable_parameters(self.model)
        log.info("trainable parameters: %(trainable)d of %(total)d (share %(share).5f)", counts)

    @staticmethod
    def _load_base(spec: dict[str, Any], adapter: Any, device: torch.device) -> torch.nn.Module:
        packed_attention.register()
        return instantiate(spec["source"]).load_model(
            dtype=getattr(torch, spec["dtype"]),
            quantization_config=adapter.quantization,
            attn_implementation=spec["attn_implementation"],
            # bitsandbytes quantizes while loading, so the weights must land on the device now.
            device_map={"": device} if adapter.bits is not None else None,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits. Packed batches come with restarting `position_ids` and no attention mask."""
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            # A KV cache would switch off the packed-sequence mask; training never needs one.
            use_cache=False,
        ).logits

    def _output_layer(self) -> tuple[torch.nn.Module, torch.Tensor] | None:
        """The decoder and the output layer's weight, when the fused loss can stand in for the
        model's own head: a plain linear layer, no bias, no logit scaling or capping."""
        causal_lm = (
            self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        )
        head = causal_lm.get_output_embeddings()
        config = causal_lm.config
        if (
            type(head) not in (torch.nn.Linear, LoadedDtypeLinear)
            or head.bias is not None
            or getattr(config, "final_logit_softcapping", None) is not None
            or getattr(config, "logit_scale", None) is not None
        ):
            return None
        return causal_lm.get_decoder(), head.weight

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        inputs = (batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
        chunk = self.hparams.model.get("loss_chunk_size")
        fused = self._output_layer() if chunk else None
        if fused is None:
            return token_loss_sum(self(*inputs), batch["labels"])
        decoder, weight = fused
        hidden = decoder(
            input_ids=inputs[0], attention_mask=inputs[1], position_ids=inputs[2], use_cache=False
        ).last_hidden_state
        return linear_cross_entropy_sum(hidden, weight, batch["labels"], chunk)

    def on_train_start(self) -> None:
        self._step_started = None  # the first step's clock starts at its first batch
        if self.hparams.model.get("offload_activations", False):
            # Here, not in configure_model: Lightning moves an unquantized model to its device
            # after that hook, and the weights are known by where they are.
            self._offload = HostOffload(weights=[*self.parameters(), *self.buffers()])

    def on_fit_start(self) -> None:
        # Prove on real rows, with this model and attention backend, that packed examples do
        # not see each other, before any step is spent.
        # It computes in the trainer's precision context (bf16 autocast on GPU), as the steps
        # will, so its tolerance is that precision's.
        datamodule = self.trainer.datamodule
        if getattr(datamodule, "sample_packing", False):
            with self.trainer.precision_plugin.forward_context(), _eager_if(self._compiled):
                self.isolation = check_isolation(
                    self, datamodule.dataset("train"), datamodule.collate
                )
            log.info("packing preflight: %s", self.isolation)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self._step_started is None:
            self._step_started = time.perf_counter()
        with self._offload if self._offload is not None else contextlib.nullcontext():
            loss_sum, _ = self._loss_sum(batch)
        if self._offload is not None and batch_idx == 0:
            host_mb = self._offload.offloaded_bytes / 1e6
            log.info("activations kept in host memory a forward: %.1f MB", host_mb)
        loss = loss_sum / batch["step_tokens"]
        # Kept on the device: reading it back here would make the host wait for the forward
        # before it could queue the backward.
        self._step_losses.append(loss.detach())
        self._step_tokens += batch["real_tokens"]  # a count made on the host (datamodule.py)
        # Lightning divides by accumulate_grad_batches and DDP averages over ranks; both are
        # undone so the step's gradient is that of the mean over the global batch's tokens.
        return loss * self.trainer.accumulate_grad_batches * self.trainer.world_size

    @property
    def step_loss(self) -> float:
        """The loss of the optimizer step in progress: its micro-batches' losses summed on the
        host, in their order (one read of the device for all of them)."""
        if not self._step_losses:
            return 0.0
        return sum(torch.stack(self._step_losses).tolist())

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # From the previous step's optimizer step (the first: this step's first batch).
        elapsed = time.perf_counter() - self._step_started
        # Summed over ranks: the step's loss is already each rank's share of the global mean.
        loss, tokens_per_s = self.trainer.strategy.reduce(
            torch.tensor([self.step_loss, self._step_tokens / elapsed], device=self.device),
            reduce_op="sum",
        ).tolist()
        values = {
            "train/loss": loss,
            "train/tokens_per_s": tokens_per_s,
            # Here rather than LearningRateMonitor, which logs once per micro-batch when
            # accumulating.
            "train/lr": optimizer.param_groups[0]["lr"],
        }
        # Every optimizer step reaches every logger, whatever trainer.log_every_n_steps (which
        # would keep a short run's CSV empty), numbered as checkpoints are: step N is the state
        # after N optimizer steps, as validation after it is also logged at N.
        for logger in self.loggers:
            logger.log_metrics({**values, "epoch": self.current_epoch}, step=self.global_step + 1)
        # For the progress bar and the callbacks (LossWatchdog, final metrics): not logged again.
        self.log("train/lr", values.pop("train/lr"), logger=False)
        self.log_dict(values, logger=False, prog_bar=True)
        # The next step's clock starts now, so its tokens/s covers a whole step: this optimizer
        # step, the loading of its batches and its forward and backward passes.
        self._step_losses, self._step_tokens = [], 0
        self._step_started = time.perf_counter()

    def teardown(self, stage: str) -> None:
        # The compiled rotary function (or, compiling whole layers, the attention registered
        # for the compiler to skip) replaced transformers' own for the process, and torch's
        # recompile limit was raised: later models in it (an eval after training, the next
        # test) get the eager function and torch's limit back.
        if self._undo_compile is not None:
            self._undo_compile()
            self._undo_compile = None

    def configure_callbacks(self) -> list[pl.Callback]:
        return [_TeardownOnException()] if self.hparams.model.get("compile", False) else []

    # With model.compile, validation and the packing preflight run eager: their rows vary in
    # length and run in eval mode, and each variant compiled would spend the recompile limit
    # (graphs a function, `allow_recompiles`) that the training graphs need, leaving training
    # to run eager.
    def on_validation_start(self) -> None:
        if self._compiled:
            torch.compiler.set_stance("force_eager")

    def on_validation_end(self) -> None:
        if self._compiled:
            torch.compiler.set_stance("default")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, count = self._loss_sum(batch)
        if count:
            self.val_loss.update(loss_sum / count, weight=count)

    def on_validation_epoch_end(self) -> None:
        # Validation between steps is not a training step's time: the next one starts afresh.
        self._step_started = None
        loss = self.val_loss.compute()  # synced over ranks by torchmetrics
        self.val_loss.reset()
        values = {"val/loss": loss, "val/ppl": torch.exp(loss)}
        # Logged at the number of optimizer steps taken (0 before training), like the train
        # rows and the checkpoints; Lightning's own step would be one behind mid-epoch.
        if not self.trainer.sanity_checking:
            row = {name: float(value) for name, value in values.items()}
            for logger in self.loggers:
                logger.log_metrics({**row, "epoch": self.current_epoch}, step=self.global_step)
        self.log_dict(values, prog_bar=True, logger=False)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = instantiate(self.hparams.optimizer)(params)
        scheduler = instantiate(self.hparams.scheduler)(
            optimizer, num_training_steps=self._total_steps()
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def _total_steps(self) -> int:
        """Optimizer steps of the whole run, for the schedule.

        Not trainer.estimated_stepping_batches: it builds Lightning's training loader before a
        checkpoint is restored, and the loader's saved position would then never be applied.
        """
        trainer = self.trainer
        if trainer.max_steps > 0:
            return trainer.max_steps
        if trainer.max_epochs is None or trainer.max_epochs < 0:
            raise ConfigError("set trainer.max_steps or trainer.max_epochs: the run has no end")
        return trainer.datamodule.optimizer_steps_per_epoch() * trainer.max_epochs

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Applied at the first resumed batch: whatever runs between loading and training
        # (model set-up, data loaders) must not shift the dropout masks to come.
        self._rng_to_restore = checkpoint.get("rng")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        state, self._rng_to_restore = getattr(self, "_rng_to_restore", None), None
        if state is not None:
            torch.set_rng_state(state["cpu"])
            if state.get("cuda") and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.fingerprint:
            checkpoint[FINGERPRINT_KEY] = self.fingerprint
        checkpoint["rng"] = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {
            name: tensor for name, tensor in checkpoint["state_dict"].items() if name in trainable
        }


class _TeardownOnException(pl.Callback):
    """A fit that stops on an error skips the module's teardown: what model.compile replaced
    for the process is put back here instead."""

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception) -> None:  # noqa: ANN001
        pl_module.teardown("fit")


# The LightningModule a config names in `model.module`, for run configs that predate the key.
DEFAULT_MODULE = {"_target_": f"{__name__}.CausalLMModule"}


def build_module(cfg: DictConfig, **runtime: Any) -> pl.LightningModule:
    """The LightningModule of a composed config: the class `model.module` names, given the
    model, adapter, optimizer and scheduler groups as plain values (checkpoints store them
    and load with weights_only) and `runtime` arguments such as `fingerprint`."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    model = dict(plain["model"])
    target = model.pop("module", None) or DEFAULT_MODULE
    try:
        module_class = get_class(target["_target_"])
    except Exception as error:  # noqa: BLE001 - Hydra reports a bad path with several types
        raise ConfigError.refused("model.module", error) from error
    settings = {k: v for k, v in target.items() if k != "_target_"}
    return module_class(
        model=model,
        adapter=plain["adapter"],
        optimizer=plain.get("optimizer") or {},
        scheduler=plain.get("scheduler") or {},
        **settings,
        **runtime,
    )


def _eager_if(eager: bool) -> contextlib.AbstractContextManager:
    return torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext()
