"""One variant of bench/peers.py, run in a process of its own so that its peak memory is its own.

    python bench/peer_worker.py SPEC.json RESULT.json

SPEC names the variant (lorafit packed / unpacked, transformers Trainer padded / flattened, TRL
SFTTrainer packed) and the lorafit Hydra overrides every variant shares. The peers read model,
LoRA, optimizer, precision and data settings from the same composed lorafit config, so nothing
differs between variants but the training loop. Every variant is timed by the same StepMeter,
fed at the end of each optimizer step by a Lightning or a transformers callback.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
IGNORE_INDEX = -100
PROFILED_STEPS = 2  # --profile: the steps after the warm-up that torch.profiler records


def compose(overrides: list[str], output_dir: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=[*overrides, f"output_dir={output_dir}"])


class StepMeter:
    """Times whole optimizer steps, identically for every trainer.

    `step_end` is called once an optimizer step (with its zero_grad) has finished; the timed
    window runs from the end of the last warm-up step to the end of the last step, so data
    loading, collation, the optimizer and everything else between steps are inside it.
    With `profile`, torch.profiler records the two steps after the warm-up, and writes them to
    `trace` (gzipped Chrome trace JSON) when one is named; on CUDA it also reports the share of
    that window in which the GPU was running kernels.

    lorafit's variants also note, each step, where the host's wall-clock went (`PHASES`).
    """

    def __init__(self, warmup: int, cuda: bool, profile: bool, trace: str | None = None):
        self.warmup = warmup
        self.cuda = cuda
        self.profile = profile
        self.trace = trace
        self.gpu_busy_share: float | None = None
        self.gpu_time_by_kind: dict[str, dict[str, float]] | None = None
        # Per step: host seconds in each of PHASES (lorafit's variants only).
        self.phases: list[dict[str, float]] = []
        self.times: list[float] = []
        self.usage: list[resource.struct_rusage] = []  # this process's CPU time and faults
        self.tokens: list[int] = []
        self.losses: list[float] = []
        self._pending_tokens = 0
        self._profiler = None
        self.profile_table: str | None = None
        self.load_peak: int | None = None

    def add_tokens(self, count: int) -> None:
        self._pending_tokens += int(count)

    def step_end(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()  # the step's kernels have run, not merely been queued
        self.times.append(time.perf_counter())
        self.usage.append(resource.getrusage(resource.RUSAGE_SELF))
        self.tokens.append(self._pending_tokens)
        self._pending_tokens = 0
        done = len(self.times)
        if self.cuda and done == 1:
            # Loading (a random 7B is even built on the GPU) can peak above training: from
            # here on the peak is training's own, with the optimizer states made by step 1.
            import torch

            self.load_peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        if self.profile and done == self.warmup:
            self._start_profiler()
        elif self._profiler is not None and done == self.warmup + PROFILED_STEPS:
            self._stop_profiler()

    def _start_profiler(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        # Shapes name each product's sides, which tell LoRA's thin products from the base's.
        self._profiler = profile(activities=activities, record_shapes=self.cuda)
        self._profiler.start()

    def _stop_profiler(self) -> None:
        self._profiler.stop()
        if self.cuda:
            events = self._profiler.events()
            self.gpu_busy_share = gpu_busy_share(events)
            self.gpu_time_by_kind = gpu_time_by_kind(events, PROFILED_STEPS)
        if self.trace:
            _write_trace(self._profiler, self.trace)
        averages = self._profiler.key_averages()
        self.profile_table = averages.table(sort_by="self_cpu_time_total", row_limit=25)
        if self.cuda:
            by_gpu = averages.table(sort_by="self_device_time_total", row_limit=25)
            self.profile_table += "\n\ntop 25 by self GPU time:\n" + by_gpu
        if self.gpu_time_by_kind:
            kinds = kinds_table(self.gpu_time_by_kind)
            self.profile_table += "\n\nGPU kernel time a step, by kind:\n" + kinds
        self._profiler = None

    def summary(self) -> dict[str, Any]:
        timed = slice(self.warmup, None)
        steps = len(self.times) - self.warmup
        if self.warmup < 1 or steps < 1:
            raise RuntimeError(f"{len(self.times)} steps ran; need {self.warmup} warm-up + 1")
        elapsed = self.times[-1] - self.times[self.warmup - 1]
        tokens = sum(self.tokens[timed])
        losses = self.losses[timed]
        start, end = self.usage[self.warmup - 1], self.usage[-1]
        user, system = end.ru_utime - start.ru_utime, end.ru_stime - start.ru_stime
        timed_phases = self.phases[self.warmup :]
        return {
            "steps": steps,
            "seconds": elapsed,
            # Mean host seconds a timed step in each phase (PHASES), lorafit's variants only.
            "host_phases_s": {
                name: sum(p.get(name, 0.0) for p in timed_phases) / len(timed_phases)
                for name in PHASES
            }
            if timed_phases
            else None,
            "gpu_busy_share": self.gpu_busy_share,
            "gpu_time_by_kind": self.gpu_time_by_kind,
            "tokens": tokens,
            "tokens_per_s": tokens / elapsed,
            "tokens_per_step": tokens / steps,
            # Where the wall-clock went: CPU time of this process (all its threads) over the
            # timed steps, the kernel's share of it, and the pages first touched. On a shared
            # host a step's CPU time varies less than its wall-clock.
            "cpu_seconds_per_step": (user + system) / steps,
            "system_share": system / (user + system) if user + system else math.nan,
            "page_faults_per_step": (end.ru_minflt - start.ru_minflt) / steps,
            "mean_loss": sum(losses) / len(losses) if losses else math.nan,
            "step_losses": self.losses,
            "step_tokens": self.tokens,
        }


# Where a lorafit step's wall-clock goes, as the host sees it (no synchronisation is added:
# the two waits named here are the step's own). Lightning's hooks mark the boundaries:
# - forward: from the batch's start until backward is called (the host issuing the forward);
# - backward: issuing backward, checkpointed layers' recomputation included;
# - backward's tail: Lightning's hooks before the optimizer step, where reading the step's loss
#   waits for the GPU to finish the backward: long when the GPU sets the pace;
# - optimizer: gradient clipping and the optimizer's update;
# - optimizer's tail: the meter's wait for the GPU at the step's end;
# - between steps: logging, the next batch's loading and collation, Lightning's loop.
PHASES = ("forward", "backward", "backward's tail", "optimizer", "optimizer's tail", "between")


class RecompileLimits(logging.Handler):
    """The compiled functions that reached torch's recompile limit during the run, as torch's
    warning names them. Past it a function's further variants (another shape, dtype or autograd
    state) run eager, silently but for that warning: a compiled variant's figures are then
    partly eager's, which the report says."""

    LOGGER = "torch._dynamo.convert_frame"

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.functions: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("torch._dynamo hit config."):
            args = record.args if isinstance(record.args, tuple) else ()
            self.functions.append(str(args[2]) if len(args) > 2 else record.getMessage())


def _ran_on_gpu(event) -> bool:
    """A kernel, copy or fill on the GPU; not a range a `record_function` marks on its
    timeline, which spans kernels and the gaps between them."""
    from torch.autograd import DeviceType

    return event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)


def gpu_busy_share(events) -> float | None:
    """The share of a profiled window in which at least one GPU kernel ran: the union of the
    kernels' intervals over the window from the first event's start to the last one's end."""

    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in events
        if _ran_on_gpu(e) and e.time_range.end > e.time_range.start
    )
    if not spans:
        return None
    window = max(e.time_range.end for e in events) - min(e.time_range.start for e in events)
    busy, reach = 0.0, -math.inf
    for start, end in spans:
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy / window if window > 0 else None


# What a GPU kernel does, told by its name and the op that launched it. Kernel names: cuBLAS'
# and CUTLASS products (gemm, nvjet, xmma), flash and cuDNN attention, bitsandbytes' kernels
# (kDequantize..., kOptimizer...), torch's foreach kernels (multi_tensor_apply: AdamW, and the
# clipping's norms), Inductor's Triton kernels (triton_..., named after the aten ops they fuse:
# the compiled NF4 dequantization shifts and masks bytes, `bitwise_and`; triton_tem: products).
PRODUCT_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm"}
PRODUCT_NAMES = ("gemm", "nvjet", "xmma", "cutlass", "cublas", "splitk")
ATTENTION_NAMES = ("flash", "fmha", "attention", "attn", "sdpa")
THIN = 64  # a product with a side this short or shorter is a LoRA one (r = 32 in the job)
KINDS = (
    "products, base",
    "products, LoRA (a side of 64 or less)",
    "attention",
    "4-bit dequantization",
    "optimizer and clipping",
    "compiled elementwise and reductions",
    "eager elementwise and reductions",
    "copies and fills",
    "not claimed by an op",
)


def kernel_kind(kernel: str, op: str, shapes: list) -> str:
    """One of KINDS for a kernel, from its name and the launching op's name and input shapes."""
    name = kernel.lower()
    if "kdequantize" in name or (name.startswith("triton") and "bitwise" in name):
        return "4-bit dequantization"
    if "optimizer" in name or "multi_tensor_apply" in name:
        return "optimizer and clipping"
    if name.startswith("triton_tem"):  # Inductor's product templates
        return "products, base"
    if name.startswith("triton"):
        # Before the attention's names: a kernel fused from the ops around an attention call
        # is named after it too, but the attention itself is flash's or cuDNN's.
        return "compiled elementwise and reductions"
    if any(part in name for part in ATTENTION_NAMES):
        return "attention"
    if "memcpy" in name or "memset" in name:
        return "copies and fills"
    if op in PRODUCT_OPS or any(part in name for part in PRODUCT_NAMES):
        sides = [side for shape in shapes if len(shape) >= 2 for side in shape[-2:]]
        thin = sides and min(sides) <= THIN
        return "products, LoRA (a side of 64 or less)" if thin else "products, base"
    return "eager elementwise and reductions"


def product_flops(shapes: list) -> int | None:
    """2 M K N (times the batch) for a product op's input shapes: its last two operands of two
    dimensions or more, [..., M, K] and [..., K, N] (mm, addmm's after its bias, bmm)."""
    matrices = [shape for shape in shapes if len(shape) >= 2][-2:]
    if len(matrices) != 2 or matrices[0][-1] != matrices[1][-2]:
        return None
    (*batch, m, k), n = matrices[0], matrices[1][-1]
    return 2 * math.prod(batch) * m * k * n


def gpu_time_by_kind(events, steps: int) -> dict[str, dict[str, float]] | None:
    """Kernel milliseconds and kernels a step by kind, from a profile's events: each kernel as
    the op that launched it claims it; what no op claims (its launch seen without a torch op
    around it) in a kind of its own, so the kinds add up to all the kernel time. For the
    products, the TFLOP/s they ran at, over those whose op's shapes give their FLOPs."""
    from torch.autograd import DeviceType

    total = sum(e.time_range.end - e.time_range.start for e in events if _ran_on_gpu(e))
    if not total:
        return None
    # Per kind: kernel us, kernels, and FLOPs with the us of the ops that FLOPs are known for.
    found = {kind: [0.0, 0, 0, 0.0] for kind in KINDS}
    for op in events:
        if op.device_type != DeviceType.CPU or not op.kernels:
            continue
        shapes = op.input_shapes or []
        op_kinds = [kernel_kind(kernel.name, op.name, shapes) for kernel in op.kernels]
        for kernel, kind in zip(op.kernels, op_kinds, strict=True):
            found[kind][0] += kernel.duration
            found[kind][1] += 1
        flops = product_flops(shapes) if op.name in PRODUCT_OPS else None
        if flops:  # the op's FLOPs over all its kernels' time (a split-K product has two)
            tally = found[op_kinds[0]]
            tally[2] += flops
            tally[3] += sum(kernel.duration for kernel in op.kernels)
    claimed = sum(tally[0] for tally in found.values())
    found["not claimed by an op"][0] += max(total - claimed, 0.0)
    kinds = {}
    for kind, (us, count, flops, timed) in found.items():
        if us > 0:
            kinds[kind] = {"ms": us / 1000 / steps, "share": us / total, "kernels": count / steps}
            if flops:
                kinds[kind]["tflops"] = flops / timed / 1e6  # FLOP a us to TFLOP a s
    return kinds


def kinds_table(kinds: dict[str, dict[str, float]]) -> str:
    columns = ["kind", "ms a step", "share of kernel time", "kernels a step", "TFLOP/s"]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for kind, row in sorted(kinds.items(), key=lambda item: -item[1]["ms"]):
        rate = f"{row['tflops']:.0f}" if "tflops" in row else "-"
        cells = [kind, f"{row['ms']:.1f}", f"{row['share']:.1%}", f"{row['kernels']:.0f}", rate]
        lines.append("| " + " | ".join(cells) + " |")
    total = sum(row["ms"] for row in kinds.values())
    kernels = sum(row["kernels"] for row in kinds.values())
    lines.append(f"| all | {total:.1f} | 100% | {kernels:.0f} | - |")
    return "\n".join(lines)


def _write_trace(profiler, path: str) -> None:
    import gzip
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as plain:
        profiler.export_chrome_trace(plain.name)
        with open(plain.name, "rb") as source, gzip.open(path, "wb") as target:
            target.write(source.read())


# ---------------------------------------------------------------- data shared by the peers


_EXAMPLES: dict[int, tuple[list[dict], list[dict]]] = {}


def load_examples(cfg) -> tuple[list[dict], list[dict]]:
    """The rows and lorafit's own tokenization of them (prompt masked, EOS, at most
    sequence_len tokens), so the peers train on exactly lorafit's examples."""
    if cfg.data.sequence_len in _EXAMPLES:
        return _EXAMPLES[cfg.data.sequence_len]
    from hydra.utils import instantiate

    from lorafit.data.sources import load_rows
    from lorafit.data.tokenization import tokenize_rows

    rows = load_rows([dict(source) for source in cfg.data.datasets])
    tokenizer = instantiate(cfg.model.source).load_tokenizer()
    examples, _ = tokenize_rows(
        rows,
        tokenizer,
        cfg.data.sequence_len,
        cfg.data.train_on_inputs,
        cfg.data.overlong,
    )
    _EXAMPLES[cfg.data.sequence_len] = rows, examples
    return rows, examples


def examples_per_step(cfg) -> int:
    """How many examples a packed row of sequence_len holds on average, rounded: the padded
    and flattened variants take that many a step, so every variant sees about as many tokens
    a step."""
    from lorafit.data.packing import pack_rows

    _, examples = load_examples(cfg)
    rows = pack_rows([len(e["input_ids"]) for e in examples], cfg.data.sequence_len)
    return max(1, round(len(examples) / len(rows)))


def model_size(config) -> int:
    """Parameters that cost a multiply-add per token: the base model's, less an untied input
    embedding (a lookup). Counted on the meta device, so a 4-bit load's packing does not
    halve it."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    if embedding is not model.get_output_embeddings().weight:
        total -= embedding.numel()
    return total


def recomputed_share(cfg, config, kind: str) -> float:
    """The share of decoder layers gradient checkpointing recomputes in backward: lorafit's
    every `model.checkpoint_every`-th layer (0, n, 2n, ...), the peers' every layer."""
    if not cfg.model.gradient_checkpointing:
        return 0.0
    every = cfg.model.get("checkpoint_every", 1) if kind.startswith("lorafit") else 1
    layers = config.num_hidden_layers
    return math.ceil(layers / every) / layers


def model_config(cfg):
    """The model's transformers config, read from its source without loading weights."""
    from hydra.utils import instantiate

    return instantiate(cfg.model.source).load_config()


# ---------------------------------------------------------------- lorafit


def _checkpoint_kwargs(cfg) -> dict:
    """The peers checkpoint in the form lorafit's config names (`model.reentrant_checkpointing`),
    so that a comparison holds the checkpoint's host work equal too."""
    return {"use_reentrant": bool(cfg.model.get("reentrant_checkpointing", True))}


def run_lorafit(spec: dict, cfg, meter: StepMeter) -> None:
    from lightning.pytorch.callbacks import Callback

    from lorafit.training import build_run

    class LightningMeter(Callback):
        def __init__(self) -> None:
            self.global_step = 0
            self.loss = math.nan
            self.phases: dict[str, float] = {}
            self.mark = time.perf_counter()

        def _lap(self, phase: str, now: float | None = None) -> None:
            """Add the time since the last mark, or until `now`, to `phase` (micro-batches add
            up)."""
            now = time.perf_counter() if now is None else now
            self.phases[phase] = self.phases.get(phase, 0.0) + now - self.mark
            self.mark = now

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._lap("between")

        def on_before_backward(self, trainer, pl_module, loss) -> None:
            self._lap("forward")

        def on_after_backward(self, trainer, pl_module) -> None:
            self._lap("backward")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._lap("optimizer")
            meter.add_tokens(int(batch["real_tokens"]))
            if trainer.global_step != self.global_step:  # this micro-batch ended a step
                self.global_step = trainer.global_step
                meter.losses.append(self.loss)
                meter.step_end()
                # Ended at the meter's own time for the step, so that the phases tile the timed
                # window exactly, whatever the host does after it (the rest of `step_end` falls
                # in the next step's "between").
                self._lap("optimizer's tail", now=meter.times[-1])
                # The first step's "between" holds the run's start: the meter times from the
                # end of the warm-up, and the phases of warm-up steps are left out.
                meter.phases.append(self.phases)
                self.phases = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            # Callbacks run before the module's hook, which resets the step's summed loss.
            self.loss = float(getattr(pl_module, "step_loss", math.nan))
            self._lap("backward's tail")

    run = build_run(cfg)
    run.trainer.callbacks.append(LightningMeter())
    run.trainer.fit(run.module, datamodule=run.datamodule)


# ---------------------------------------------------------------- transformers / TRL


def _load_base(cfg, device: str):
    import torch
    from hydra.utils import instantiate

    quantization = instantiate(cfg.adapter.quantization) if cfg.adapter.quantization else None
    # sdpa_packed is lorafit's own; the peers attend packed rows with transformers' sdpa.
    attention = cfg.model.attn_implementation
    model = instantiate(cfg.model.source).load_model(
        dtype=getattr(torch, cfg.model.dtype),
        quantization_config=quantization,
        attn_implementation="sdpa" if attention == "sdpa_packed" else attention,
        device_map={"": device} if quantization is not None else None,
    )
    return model, quantization is not None


def _lora_config(cfg):
    from peft import LoraConfig

    adapter = cfg.adapter
    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules="all-linear" if adapter.target_linear else list(adapter.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


# lorafit's optimizer classes and the names transformers' TrainingArguments gives them.
OPTIMIZERS = {
    "torch.optim.AdamW": "adamw_torch",
    "bitsandbytes.optim.PagedAdamW32bit": "paged_adamw_32bit",
    "bitsandbytes.optim.PagedAdamW8bit": "paged_adamw_8bit",
    "bitsandbytes.optim.AdamW8bit": "adamw_bnb_8bit",
    # lorafit's forms of those (one wait for the GPU a step); the peers keep transformers' own.
    "lorafit.model.optimizers.PagedAdamW32bit": "paged_adamw_32bit",
    "lorafit.model.optimizers.PagedAdamW8bit": "paged_adamw_8bit",
    "lorafit.model.optimizers.AdamW8bit": "adamw_bnb_8bit",
}


def _training_arguments(cfg, spec: dict, output_dir: str, batch_size: int) -> dict[str, Any]:
    optimizer = cfg.optimizer
    checkpointing = bool(cfg.model.gradient_checkpointing)
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        max_steps=spec["warmup"] + spec["steps"],
        learning_rate=optimizer.lr,
        weight_decay=optimizer.weight_decay,
        adam_beta1=optimizer.betas[0],
        adam_beta2=optimizer.betas[1],
        adam_epsilon=optimizer.eps,
        optim=OPTIMIZERS[optimizer._target_],
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=cfg.trainer.gradient_clip_val or 0.0,
        bf16=str(cfg.trainer.precision).startswith("bf16"),
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs=_checkpoint_kwargs(cfg) if checkpointing else None,
        logging_steps=1,  # each step's loss, as lorafit logs it
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=spec["device"] == "cpu",
        seed=cfg.seed,
        data_seed=cfg.seed,
    )


def _counting(trainer_class, meter: StepMeter):
    """The trainer, counting the non-pad tokens of each batch it trains on. Counted here, not in
    the collator: accelerate's loader collates one batch ahead of the one being trained."""

    class Counting(trainer_class):
        def training_step(self, model, inputs, *args, **kwargs):
            mask = inputs.get("attention_mask")
            meter.add_tokens(int(mask.sum()) if mask is not None else inputs["input_ids"].numel())
            return super().training_step(model, inputs, *args, **kwargs)

    return Counting


def _hf_callback(meter: StepMeter):
    from transformers import TrainerCallback

    class HFMeter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            meter.step_end()

        def on_log(self, args, state, control, logs=None, **kwargs):
            # Logged after on_step_end, for the step that just ended (logging_steps=1).
            if logs and "loss" in logs and len(meter.losses) < len(meter.times):
                meter.losses.append(float(logs["loss"]))

    return HFMeter()


def run_transformers(spec: dict, cfg, meter: StepMeter, output_dir: str) -> None:
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        DataCollatorForSeq2Seq,
        DataCollatorWithFlattening,
        Trainer,
        TrainingArguments,
    )

    _, examples = load_examples(cfg)
    from hydra.utils import instantiate

    tokenizer = instantiate(cfg.model.source).load_tokenizer()
    data = [
        {**e, "attention_mask": [1] * len(e["input_ids"])} if spec["kind"] == "hf-padded" else e
        for e in examples
    ]
    model, quantized = _load_base(cfg, spec["device"])
    if quantized:
        checkpointing = bool(cfg.model.gradient_checkpointing)
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs=_checkpoint_kwargs(cfg) if checkpointing else None,
        )
    model = get_peft_model(model, _lora_config(cfg))
    if cfg.model.gradient_checkpointing:
        # The Trainer turns checkpointing on after peft has looked for it: the reentrant form
        # needs the frozen embeddings' output to require grad, or no gradient reaches LoRA.
        model.enable_input_require_grads()
    model.config.use_cache = False
    if spec["kind"] == "hf-padded":
        collator = DataCollatorForSeq2Seq(
            tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX, return_tensors="pt"
        )
    else:
        # One row of the batch's examples, position ids restarting, labels of each example's
        # first token masked, no attention mask: the same packed form lorafit trains on.
        collator = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    args = TrainingArguments(**_training_arguments(cfg, spec, output_dir, spec["batch_size"]))
    trainer = _counting(Trainer, meter)(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=collator,
        callbacks=[_hf_callback(meter)],
    )
    trainer.train()


def run_trl(spec: dict, cfg, meter: StepMeter, output_dir: str) -> None:
    from datasets import Dataset
    from hydra.utils import instantiate
    from trl import SFTConfig, SFTTrainer

    from lorafit.data.prompts import format_alpaca

    rows, _ = load_examples(cfg)
    pairs = [format_alpaca(row) for row in rows]
    data = Dataset.from_list([{"prompt": p, "completion": c} for p, c in pairs])
    tokenizer = instantiate(cfg.model.source).load_tokenizer()
    model, _ = _load_base(cfg, spec["device"])
    args = SFTConfig(
        **_training_arguments(cfg, spec, output_dir, 1),
        max_length=cfg.data.sequence_len,
        packing=True,  # best-fit decreasing rows of max_length, flattened without padding
        completion_only_loss=True,  # the prompt is masked, as in lorafit
        dataset_num_proc=None,
    )
    trainer = _counting(SFTTrainer, meter)(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=_lora_config(cfg),
        callbacks=[_hf_callback(meter)],
    )
    trainer.train()


# ---------------------------------------------------------------- entry point


def _fill_model_cache(cfg) -> None:
    """Build or convert the base model into lorafit's cache first, so that the peak "with the
    load" is loading's: a random 7B's build (14.5 GB of bf16 drawn on the GPU, once a machine)
    reads 13.5 GiB otherwise, and only in the first variant to run."""
    import torch
    from hydra.utils import instantiate

    source = instantiate(cfg.model.source)
    if hasattr(source, "prepare"):
        source.prepare()
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    import torch

    cuda = spec["device"] == "cuda"
    meter = StepMeter(
        spec["warmup"], cuda=cuda, profile=spec.get("profile", False), trace=spec.get("trace")
    )
    limits = RecompileLimits()
    logging.getLogger(RecompileLimits.LOGGER).addHandler(limits)
    output_dir = spec["output_dir"]
    cfg = compose(spec["overrides"], output_dir)
    # Packed variants take one row a step; the others as many examples as a row holds.
    batch_size = 1 if spec["packed"] else examples_per_step(cfg)
    spec["batch_size"] = batch_size
    if spec["kind"] == "lorafit-unpacked":
        batch = [f"data.batch_size={batch_size}", f"data.micro_batch_size={batch_size}"]
        cfg = compose([*spec["overrides"], *batch], output_dir)
    if cuda:
        _fill_model_cache(cfg)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    kind = spec["kind"]
    if kind.startswith("lorafit"):
        run_lorafit(spec, cfg, meter)
    elif kind.startswith("hf"):
        run_transformers(spec, cfg, meter, output_dir)
    elif kind == "trl-packed":
        run_trl(spec, cfg, meter, output_dir)
    else:
        raise ValueError(f"unknown variant kind {kind!r}")
    config = model_config(cfg)
    result = {
        **meter.summary(),
        "wall_s": time.perf_counter() - start,
        "n_params": model_size(config),
        "recomputed_share": recomputed_share(cfg, config, kind),
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "profile": meter.profile_table,
        "threads": torch.get_num_threads(),
        "examples_per_step": batch_size,
        "recompile_limit_hit": limits.functions,
    }
    if cuda:
        # Peaks of the steps after the first; the load's (and first step's) beside them.
        result["cuda_allocated"] = torch.cuda.max_memory_allocated()
        result["cuda_reserved"] = torch.cuda.max_memory_reserved()
        result["cuda_allocated_with_load"] = meter.load_peak
        result["device_name"] = torch.cuda.get_device_name()
    Path(sys.argv[2]).write_text(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
