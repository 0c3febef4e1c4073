"""The canonical job's peak training memory, measured on the CPU and projected to 32 layers.

    python bench/peak_memory.py                                   # 2048-token rows, the defaults
    python bench/peak_memory.py --sequence-len 8192 --set adapter.upcast_unquantized=false
    python bench/peak_memory.py --layers 2 3 4                    # check the projection is linear

A GPU's peak allocated memory is what the canonical job's memory targets are about, and the
GPU is where this project rarely runs. What decides it is the same on a CPU: the 4-bit
weights, the unquantized ones, the LoRA weights, their gradients and optimizer state, and
what one training step allocates on top. So this trains `experiment=mistral7b_random_qlora`
(Mistral-7B-v0.1's exact layer shape, random weights, NF4 + LoRA r=32 on every linear layer,
bf16 autocast, gradient checkpointing, one packed row a step) with 2 and 3 decoder layers on the
CPU, and measures for its third optimizer step, in the steady state of a run:

- what lives across steps: the unique storages of parameters, buffers, 4-bit quantization
  states and optimizer state, split by kind;
- the step's own peak above them: the running sum of every allocation and free that torch's
  profiler records on the CPU allocator (forward, recomputation, backward, optimizer step).

Each part grows linearly with the number of layers (one layer's weights, state and kept
checkpoint input; the transient of one layer's recomputation does not grow), so the two runs
give the 32-layer figure. Not from 1 layer: at 8192 tokens its step peaks elsewhere than deeper
models' (1 and 2 layers projected 13.52 GiB, 2 and 3 layers 11.39, the H200 measured 11.35).
With `model.offload_activations` the tensors it sends to host memory leave the count until
backward brings them back, as on a GPU (`HostMemoryOffload`). What differs on a GPU, and is
not modelled: the caching allocator's rounding and fragmentation (reserved memory), CUDA
kernels' workspaces, offloading's copies in flight (up to two layer inputs), and paged
optimizers: bitsandbytes' paged state lives in CUDA managed memory that
`torch.cuda.max_memory_allocated` does not count (`optimizer=paged_adamw_32bit` is the
canonical job's; here torch's AdamW holds the same two fp32 tensors per LoRA weight, reported
apart).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import traceback
import weakref
from pathlib import Path
from unittest import mock

import numpy
import torch
from lightning.pytorch.callbacks import Callback
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from lorafit.model.offload import HostOffload

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from peer_worker import compose  # noqa: E402
from peers import ALPACA, data_overrides  # noqa: E402

PRESET = "experiment=mistral7b_random_qlora"
GIB = 2**30


class StepPeak(Callback):
    """Measures the allocations of one optimizer step (batch `step`) and adds them up.

    Recording starts a step earlier: a block allocated before recording began is freed
    unseen (the profiler says so), and the previous step's gradients are freed during this
    one, before its backward. With `at_peak`, a dispatch mode follows every tensor instead
    of the profiler, and keeps the largest of those alive at the peak: what it is made of.
    """

    MARK = "lorafit: measured step"

    def __init__(self, step: int = 2, at_peak: bool = False):
        self.step = step
        self.at_peak = at_peak
        self.live: dict[str, int] = {}
        self.peak_above = 0
        self.peak_ops = ""
        self.left_above = 0
        self.peak_tensors: list[tuple[int, str]] = []
        self._recorder: profile | LiveTensors | None = None
        self._mark: torch.profiler.record_function | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.step - 1:
            if self.at_peak:
                self._recorder = LiveTensors()
                self._recorder.__enter__()
            else:
                self._recorder = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
                self._recorder.start()
        elif batch_idx == self.step:
            self.live = live_storages(pl_module.model, trainer.optimizers)
            if isinstance(self._recorder, LiveTensors):
                self._recorder.mark()
            else:
                self._mark = torch.profiler.record_function(self.MARK)
                self._mark.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._recorder is None or batch_idx != self.step:
            return
        if isinstance(self._recorder, LiveTensors):
            self._recorder.__exit__(None, None, None)
            self.peak_above = self._recorder.peak - self._recorder.origin
            self.left_above = self._recorder.running - self._recorder.origin
            self.peak_tensors = self._recorder.at_peak
        else:
            self._mark.__exit__(None, None, None)
            self._recorder.stop()
            events = self._recorder.profiler.kineto_results.events()
            self.peak_above, self.left_above, self.peak_ops = running_peak(events, self.MARK)
        self._recorder = None
        trainer.should_stop = True


def running_peak(events, mark: str) -> tuple[int, int, str]:
    """Over the span of the event named `mark`: the peak of the running sum of the profiler's
    allocation events, what is left at its end (near 0 when nothing but the live storages
    outlives a step), and the ops around the peak, innermost first: where it happens."""
    span = next(e for e in events if e.name() == mark)
    memory = sorted(
        (
            e
            for e in events
            if e.name() == "[memory]" and span.start_ns() <= e.start_ns() <= span.end_ns()
        ),
        key=lambda e: e.start_ns(),
    )
    running = peak = 0
    peak_at = None
    for event in memory:
        running += event.nbytes()
        if running > peak:
            peak, peak_at = running, event.start_ns()
    around = [
        e
        for e in events
        if peak_at is not None
        and e.name() not in ("[memory]", mark)
        and e.start_ns() <= peak_at <= e.end_ns()
    ]
    around.sort(key=lambda e: e.end_ns() - e.start_ns())
    return peak, running, " < ".join(dict.fromkeys(e.name() for e in around[:6]))


class LiveTensors(TorchDispatchMode):
    """Follows the storage of every tensor an op returns until it is freed (a weak reference's
    callback), with the op and shape that made it; at each new peak of their sum the largest
    live ones are noted. Slower than the profiler and blind to what kernels allocate inside,
    so it explains the peak rather than measures it. While a dispatch mode is active autograd
    sums the gradients of a tensor with several consumers into a new tensor rather than into
    one of them in place, so this may list a sum a plain run does not make. A tensor of
    `NAMED_FROM` bytes or more is labelled with the lines of the model's code that made it, or
    with the autograd node whose backward made it (`made_in`)."""

    # Frames worth naming where a large tensor is made: the model's code, not torch's.
    OWN_CODE = ("/lorafit/", "/transformers/models/", "/peft/", "/bitsandbytes/")
    NAMED_FROM = 16 * 2**20  # bytes; smaller tensors are not worth a stack walk each

    def __init__(self, keep: int = 12):
        super().__init__()
        self.keep = keep
        self.running = self.peak = self.origin = 0
        self.at_peak: list[tuple[int, str]] = []
        self._live: dict[int, tuple[int, str]] = {}
        self._refs: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
        # A view or an in-place op returns an input's storage: nothing new was allocated.
        inputs = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() in inputs:
                continue
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                label = f"{phase} {func.__name__} {list(tensor.shape)} {tensor.dtype}"
                if tensor.untyped_storage().nbytes() >= self.NAMED_FROM:
                    label += made_in(self.OWN_CODE)
                self._track(tensor, label)
        return out

    def mark(self) -> None:
        """From here on the peak is the measured step's."""
        self.origin = self.peak = self.running
        self.at_peak = []

    def _track(self, tensor: torch.Tensor, label: str) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._live or storage.nbytes() == 0:
            return
        self._live[key] = (storage.nbytes(), label)
        self._refs[key] = weakref.ref(storage, lambda _, key=key: self._free(key))
        self.running += storage.nbytes()
        if self.running > self.peak:
            self.peak = self.running
            if storage.nbytes() >= 2**20:  # a new peak worth a look: note the largest
                largest = sorted(self._live.values(), reverse=True)[: self.keep]
                self.at_peak = largest

    def _free(self, key: int) -> None:
        size, _ = self._live.pop(key, (0, ""))
        self._refs.pop(key, None)
        self.running -= size


def made_in(own_code: tuple[str, ...], frames: int = 3) -> str:
    """' <- file:line function / ...': the innermost frames of the model's code on the stack,
    outermost first; a checkpointed layer's recomputation shows its forward's lines. Made by
    autograd's engine with none of that code on the stack: ' <- autograd's NodeName'."""
    stack = [f for f in traceback.extract_stack() if any(part in f.filename for part in own_code)]
    if not stack:
        node = torch._C._current_autograd_node()
        return f" <- autograd's {node.name()}" if node is not None else ""
    named = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in stack[-frames:]]
    return " <- " + " / ".join(named)


def live_storages(model: torch.nn.Module, optimizers) -> dict[str, int]:
    """Bytes of every storage that outlives a step, by kind, each storage counted once."""
    seen: set[int] = set()
    sizes = dict.fromkeys(
        ["4-bit weights", "other frozen weights", "LoRA weights", "LoRA gradients", "optimizer"], 0
    )

    def add(kind: str, tensor: torch.Tensor | None) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            return
        seen.add(storage.data_ptr())
        sizes[kind] += storage.nbytes()

    for parameter in model.parameters():
        state = getattr(parameter, "quant_state", None)
        if state is not None:
            add("4-bit weights", parameter)
            for part in (state.absmax, state.code, getattr(state, "offset", None)):
                add("4-bit weights", part)
            if state.state2 is not None:
                add("4-bit weights", state.state2.absmax)
                add("4-bit weights", state.state2.code)
        else:
            add("LoRA weights" if parameter.requires_grad else "other frozen weights", parameter)
            add("LoRA gradients", parameter.grad)
    for buffer in model.buffers():
        add("other frozen weights", buffer)
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for value in state.values():
                add("optimizer", value)
    return sizes


def _mixed_addcmul_in_rows(start, tensor1, tensor2, value, dtype):  # noqa: ANN001, ANN202
    """`lora_dropout.mixed_addcmul` with the same bits and a GPU's memory: a CPU computes it
    through fp32 temporaries of its operands' size (a byte mask, bf16 inputs, a bf16 result),
    which a GPU's kernel does not make; here it is made 256 rows at a time."""
    shape = tensor1.shape
    out = torch.empty(shape, dtype=dtype, device=tensor1.device)

    def rows(t):  # noqa: ANN001, ANN202
        return t.reshape(-1, shape[-1]) if t.numel() > 1 else t

    operands, into = [rows(t) for t in (start, tensor1, tensor2)], rows(out)
    for first in range(0, into.shape[0], 256):
        piece = slice(first, first + 256)
        chunk = [t[piece] if t.numel() > 1 else t for t in operands]
        torch.addcmul(*chunk, value=value, out=into[piece])
    return out


class HostMemoryOffload(HostOffload):
    """`model.offload_activations` with a GPU's memory, on the CPU: the large saved tensors go
    to host memory as on a GPU (a CPU tensor is on no accelerator, so lorafit's hooks keep it
    where it is), each host copy held in numpy's memory, which torch's allocator and so the
    profiler's count never see, as a GPU's allocated memory leaves out host memory; backward
    gets each back as a new tensor, as a GPU gets a device copy (counted)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "offloads": lambda tensor: True})

    def _host_buffer(self, source: torch.Tensor) -> torch.Tensor:
        raw = numpy.empty(source.numel() * source.element_size(), dtype=numpy.uint8)
        return torch.from_numpy(raw).view(source.dtype).view(source.shape)

    def _back(self, saved) -> torch.Tensor:  # noqa: ANN001
        return saved.host.clone()


def gpu_forms(gpu_memory: bool = True) -> contextlib.ExitStack:
    """Where lorafit picks a form by device (`lora_dropout.one_pass`), the GPU's; with
    `gpu_memory`, made with a GPU's memory (`_mixed_addcmul_in_rows`, whose row chunks add
    operators a GPU does not dispatch: not for counting them; offloading's host copies out of
    the count, `HostMemoryOffload`)."""
    from lorafit.model import lora_branch, lora_dropout, module

    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(lora_dropout, "CPU_FORM_DEVICES", frozenset()))
    if gpu_memory:
        for forms in (lora_dropout, lora_branch):
            stack.enter_context(mock.patch.object(forms, "mixed_addcmul", _mixed_addcmul_in_rows))
        stack.enter_context(mock.patch.object(module, "HostOffload", HostMemoryOffload))
    return stack


def fit_preset(
    layers: int,
    sequence_len: int,
    data: list[str],
    extra: list[str],
    meter,  # noqa: ANN001
    gpu_memory: bool = True,
) -> None:
    """Train `PRESET` with `layers` decoder layers on the CPU for the few steps `meter` (a
    callback that stops the run) needs; nothing is written but a temporary folder. Where
    lorafit picks a form by device (LoRA dropout's passes), the GPU's form runs: these runs
    stand in for a GPU's (`gpu_forms`)."""
    from lorafit.training import build_run

    with gpu_forms(gpu_memory), tempfile.TemporaryDirectory() as output:
        cfg = compose(
            [
                PRESET,
                "trainer=cpu_bf16",
                "optimizer=adamw",  # paged AdamW needs CUDA; the same state, see above
                f"model.source.num_hidden_layers={layers}",
                "++model.source.build_device=cpu",
                f"data.sequence_len={sequence_len}",
                "data.val_set_size=0",
                "trainer.max_steps=4",
                "trainer.enable_progress_bar=false",
                "logger=csv",
                "callbacks.model_checkpoint=null",
                "callbacks.best_checkpoint=null",
                "callbacks.export_adapter=null",
                *data,
                *extra,
            ],
            output,
        )
        run = build_run(cfg)
        run.trainer.callbacks.append(meter)
        run.trainer.fit(run.module, datamodule=run.datamodule)


def measure(
    layers: int, sequence_len: int, data: list[str], extra: list[str], at_peak: bool = False
) -> dict:
    meter = StepPeak(at_peak=at_peak)
    fit_preset(layers, sequence_len, data, extra, meter)
    if at_peak:
        print(f"{layers} layer(s): the largest tensors alive at the step's peak")
        for size, label in meter.peak_tensors:
            print(f"  {size / 2**20:8.1f} MiB  {label}")
    else:
        print(f"{layers} layer(s): the step peaks in {meter.peak_ops}", flush=True)
    return {**meter.live, "step peak above": meter.peak_above, "left": meter.left_above}


def table(results: dict[int, dict[str, int]], projected: dict[str, int], layers: int) -> str:
    parts = [k for k in next(iter(results.values())) if k != "left"]
    head = [f"{n} layer{'s' if n > 1 else ''}" for n in results] + [f"{layers} layers, projected"]
    lines = ["| part | " + " | ".join(head) + " |", "| --- |" + " --- |" * len(head)]

    def row(name: str, values: list[int]) -> str:
        return f"| {name} | " + " | ".join(f"{v / GIB:.3f} GiB" for v in values) + " |"

    columns = [*results.values(), projected]
    for part in parts:
        lines.append(row(part, [c[part] for c in columns]))
    lines.append(row("peak (sum)", [sum(c[p] for p in parts) for c in columns]))
    without_optimizer = [sum(c[p] for p in parts if p != "optimizer") for c in columns]
    lines.append(row("peak, optimizer state paged out of torch's count", without_optimizer))
    left = ", ".join(f"{n}: {r['left'] / 2**20:.1f} MiB" for n, r in results.items())
    return "\n".join(lines) + f"\n\nleft allocated after the step, by layer count: {left}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequence-len", type=int, default=2048)
    parser.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=[2, 3],
        help="layer counts measured; the first two give the projection (with "
        "model.checkpoint_every=n, make them n apart: 2 4 for n=2)",
    )
    parser.add_argument("--data", type=Path, default=ALPACA, help="alpaca rows (json)")
    parser.add_argument("--set", action="append", default=[], help="a lorafit override")
    parser.add_argument(
        "--at-peak",
        action="store_true",
        help="list the largest tensors alive at the peak of one step, the first layer count, "
        "each of 16 MiB or more with the lines of lorafit's, transformers', peft's or "
        "bitsandbytes' code that made it (or autograd's node, for what its engine makes)",
    )
    args = parser.parse_args()
    data, rows = data_overrides(args)
    print(f"rows: {rows}")
    if args.at_peak:
        measure(args.layers[0], args.sequence_len, data, args.set, True)
        return
    if len(args.layers) < 2 or sorted(set(args.layers)) != args.layers:
        parser.error("--layers takes two or more increasing layer counts")
    # The preset's own depth: Mistral-7B's 32 decoder layers.
    with tempfile.TemporaryDirectory() as output:
        full = compose([PRESET], output).model.source.num_hidden_layers
    results = {n: measure(n, args.sequence_len, data, args.set) for n in args.layers}
    first, second = results[args.layers[0]], results[args.layers[1]]
    slope_layers = args.layers[1] - args.layers[0]
    projected = {
        k: first[k] + (second[k] - first[k]) * (full - args.layers[0]) // slope_layers
        for k in first
    }
    print(f"sequence_len {args.sequence_len}, overrides {args.set or 'none'}\n")
    print(table(results, projected, full))


if __name__ == "__main__":
    main()
