"""The operators a QLoRA training step dispatches, counted on the CPU and projected to 32 layers.

    python bench/step_ops.py                                      # the canonical job's options
    python bench/step_ops.py --set adapter.upcast_unquantized=false
    python bench/step_ops.py --top 20                             # the commonest operators too
    python bench/step_ops.py --traffic                            # and the bytes they move

At 2048 tokens a row an H200 waits on the host for about half of each QLoRA step
(docs/benchmarks.md): the host dispatches every operator, and launches its kernels, one after
another at some microseconds each, so the number of operators a step dispatches bounds its
speed whatever the card. That number depends on the model's structure and options, not on its
widths or its device, so it is counted here on the CPU, on `experiment=mistral7b_random_qlora`
narrowed (hidden 512), with 1 and 2 decoder layers: their difference is one layer's count and
projects the step to the preset's depth, as bench/peak_memory.py does for memory.

Each aten operator of the third optimizer step (a dispatch mode sees each one) is put under the
innermost module that was running it: for the forward pass and checkpointing's recomputation
by the module stack, for backward by the autograd node executing it, which the module that
created the node owns. Kinds: `LoRA projection` (a 4-bit projection with its adapter: the base
matmul, dropout, lora_A, lora_B, scale, add, casts), `norm`, `attention` (what is left of it
outside its projections: rotary embedding, the attention kernel, reshapes), `MLP` (activation
and product), `layer` (the residual adds, checkpointing's own), `outside the layers`
(embedding, final norm, loss) and `optimizer` (with the gradient clipping and zeroing).

With `--traffic` the model keeps the preset's widths (Mistral-7B's, at `--sequence-len` tokens)
and each operator that moves data also adds up the bytes it reads and writes (its tensor
inputs and outputs; an in-place operator reads and writes its first input, one that only
overwrites it, `copy_` or `bernoulli_`, does not read it). Outside the matrix products and the
attention kernel, those passes are bound by the GPU's memory bandwidth: on the H200 at 2048
tokens, casts and elementwise passes took over half of the GPU's time. The sum is the traffic
an eager GPU step makes for them, caches aside.

Where lorafit picks a form by device (the LoRA branch's one-pass forms), the GPU's is counted
(`fit_preset`). Differs from a CUDA run: the attention kernel (on a CPU `sdpa_packed` attends
each packed example in a call of its own, on CUDA one varlen call a row; so `attention` grows
with the examples a row here, and its traffic with the slices of each example and the sums of
their gradients), bitsandbytes' kernels (the same operators, other internals), and the
optimizer (torch's AdamW here, bitsandbytes' paged AdamW on CUDA,
one kernel a tensor). The rest is the same code on either device.
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
import tempfile
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from peak_memory import PRESET, fit_preset  # noqa: E402
from peer_worker import compose  # noqa: E402
from peers import ALPACA, data_overrides  # noqa: E402

KINDS = [
    "LoRA projection",
    "norm",
    "attention",
    "MLP",
    "layer",
    "outside the layers",
    "optimizer",
]
PHASES = ["forward", "recomputation", "backward"]


def kind_of(module: torch.nn.Module) -> str | None:
    """The kind of operators a module's own code dispatches; None: its parent's kind."""
    from peft.tuners.lora import LoraLayer
    from transformers.modeling_layers import GradientCheckpointingLayer

    name = type(module).__name__
    if isinstance(module, LoraLayer):
        return "LoRA projection"
    if name.endswith("RMSNorm") or name.endswith("LayerNorm"):
        return "norm"
    if name.endswith("Attention"):
        return "attention"
    if name.endswith("MLP"):
        return "MLP"
    if isinstance(module, GradientCheckpointingLayer):
        return "layer"
    return None


class OpCounter(TorchDispatchMode):
    """Counts dispatched aten operators by (phase, kind, operator, whether it launches)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        # (phase, kind, operator, dtypes in -> out) -> bytes read and written, outside the
        # matrix products and attention kernels.
        self.moved: collections.Counter[tuple[str, str, str, str]] = collections.Counter()
        self.optimizing = False
        self._stack: list[str] = []
        self._inputs: list[set[int]] = []
        # id(autograd node) -> (node, kind): the node held so that its id stays its own.
        self._nodes: dict[int, tuple[object, str]] = {}
        self._handles = []
        for module in model.modules():
            kind = kind_of(module)
            if kind is not None:
                self._handles.append(module.register_forward_pre_hook(self._enter(kind)))
                # always_call: checkpointing stops a recomputation midway with an exception
                # once it has what backward needs; the stack must still unwind.
                self._handles.append(module.register_forward_hook(self._leave, always_call=True))

    def _enter(self, kind: str):
        def hook(module, args):
            self._stack.append(kind)
            self._inputs.append({id(t.grad_fn) for t in _tensors(args) if t.grad_fn is not None})

        return hook

    def _leave(self, module, args, output) -> None:
        kind = self._stack.pop()
        stop = self._inputs.pop()
        # The autograd nodes this call created: from its outputs back to its inputs' nodes.
        # Inner modules returned first and own theirs already; the walk passes through them.
        pending = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
        seen: set[int] = set()
        while pending:
            node = pending.pop()
            if node is None or id(node) in stop or id(node) in seen:
                continue
            seen.add(id(node))
            self._nodes.setdefault(id(node), (node, kind))
            pending.extend(next_node for next_node, _ in node.next_functions)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        node = torch._C._current_autograd_node()
        if self.optimizing:
            phase, kind = "backward", "optimizer"
        elif self._stack:
            phase = "recomputation" if node is not None else "forward"
            kind = self._stack[-1]
        elif node is not None:
            phase, kind = "backward", self._nodes.get(id(node), (None, "outside the layers"))[1]
        else:
            phase, kind = "forward", "outside the layers"
        name = func.overloadpacket.__name__
        self.counts[(phase, kind, name, launches(func))] += 1
        out = func(*args, **(kwargs or {}))
        if launches(func) and not is_product(name):
            reads, writes = moved(name, args, kwargs or {}, out)
            self.moved[(phase, kind, name, signature(reads, writes))] += sum(
                t.numel() * t.element_size() for t in reads + writes
            )
        return out


# Bare allocations, and `_unsafe_view`: a view whose schema does not say so (matmul's reshape).
NO_DATA = {"empty", "empty_strided", "new_empty", "empty_like", "_unsafe_view"}


@functools.cache
def launches(func) -> bool:
    """Whether an operator reads or writes tensor data (on a GPU, launches a kernel): not a
    view (its schema returns an alias it does not write) nor a bare allocation."""
    if func.overloadpacket.__name__ in NO_DATA:
        return False
    returns = func._schema.returns
    return not any(r.alias_info is not None and not r.alias_info.is_write for r in returns)


# Matrix products and attention kernels: bound by arithmetic, not by memory traffic.
PRODUCTS = ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "gemm_4bit")


def is_product(name: str) -> bool:
    return name in PRODUCTS or "attention" in name


# Operators that overwrite their first input without reading it.
OVERWRITES = {"copy_", "fill_", "zero_", "bernoulli_", "uniform_", "normal_", "random_"}


def moved(name: str, args, kwargs, out) -> tuple[list[torch.Tensor], list[torch.Tensor]]:  # noqa: ANN001
    """The tensors an operator reads and those it writes (an `out=` tensor is written only)."""
    written = _tensors(out)
    skip = {id(t) for t in _tensors(kwargs.get("out"))}
    if name in OVERWRITES:
        skip |= {id(t) for t in _tensors(args[:1])}
    reads = [t for t in _tensors((args, kwargs)) if id(t) not in skip]
    return reads, written


def signature(reads: list[torch.Tensor], writes: list[torch.Tensor]) -> str:
    """`float32,uint8->bfloat16`: the dtypes read and written."""

    def names(tensors):
        return ",".join(str(t.dtype).removeprefix("torch.") for t in tensors)

    return f"{names(reads)}->{names(writes)}"


def _tensors(value) -> list[torch.Tensor]:
    leaves = torch.utils._pytree.tree_leaves(value)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


class StepOps(Callback):
    """Counts the operators of optimizer step `step` (its batch, backward and optimizer)."""

    def __init__(self, step: int = 2):
        self.step = step
        self.counter: OpCounter | None = None
        self.counts: collections.Counter | None = None
        self.moved: collections.Counter | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.step:
            self.counter = OpCounter(pl_module.model)
            self.counter.__enter__()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.counter is not None:
            self.counter.optimizing = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.counter is None or batch_idx != self.step:
            return
        self.counter.__exit__(None, None, None)
        self.counter.remove()
        self.counts, self.moved = self.counter.counts, self.counter.moved
        self.counter = None
        trainer.should_stop = True


def count(
    layers: int, data: list[str], extra: list[str], sequence_len: int | None = None
) -> tuple[collections.Counter, collections.Counter]:
    """The operators of a step, and the bytes they move outside matrix products. Without
    `sequence_len`, narrowed and at 256 tokens: counts only, in seconds (they depend on neither
    widths nor length); with it, at the preset's widths and that length, for the bytes."""
    meter = StepOps()
    # Narrow: the count does not depend on widths (4-bit blocks need multiples of 64).
    narrow = ["model.source.hidden_size=512", "model.source.intermediate_size=1792"]
    widths = narrow if sequence_len is None else []
    fit_preset(layers, sequence_len or 256, data, [*widths, *extra], meter, gpu_memory=False)
    return meter.counts, meter.moved


def project(one: collections.Counter, two: collections.Counter, depth: int) -> collections.Counter:
    """The count at `depth` layers: one layer's, plus (depth - 1) times the second layer's."""
    return collections.Counter(
        {key: one[key] + (two[key] - one[key]) * (depth - 1) for key in one | two}
    )


def table(counts: collections.Counter, layer: collections.Counter, depth: int) -> str:
    """Per kind: one layer's operators in each phase, and the whole projected step's."""

    def total(counter, phase: str | None, kind: str | None, data_only: bool = False) -> int:
        return sum(
            n
            for (p, k, _, moves), n in counter.items()
            if phase in (None, p) and kind in (None, k) and (moves or not data_only)
        )

    lines = [
        f"| kind | a layer: {' | '.join(PHASES)} | {depth} layers: a step | of which launch |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for kind in [*KINDS, None]:
        phases = " | ".join(str(total(layer, phase, kind)) for phase in PHASES)
        step, data = total(counts, None, kind), total(counts, None, kind, data_only=True)
        lines.append(f"| {kind or 'all'} | {phases} | {step:,} | {data:,} |")
    return "\n".join(lines)


def traffic_table(moved: collections.Counter, layer: collections.Counter, depth: int) -> str:
    """Per kind: the GB one layer moves outside matrix products in each phase, and the step's."""

    def total(counter, phase: str | None, kind: str | None) -> float:
        return sum(
            n for (p, k, _, _), n in counter.items() if phase in (None, p) and kind in (None, k)
        )

    lines = [
        f"| kind (GB) | a layer: {' | '.join(PHASES)} | {depth} layers: a step |",
        "| --- | --- | --- | --- | --- |",
    ]
    for kind in [*KINDS, None]:
        phases = " | ".join(f"{total(layer, phase, kind) / 1e9:.3f}" for phase in PHASES)
        lines.append(f"| {kind or 'all'} | {phases} | {total(moved, None, kind) / 1e9:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ALPACA, help="alpaca rows (json)")
    parser.add_argument("--set", action="append", default=[], help="a lorafit override")
    parser.add_argument("--top", type=int, default=0, help="list a layer's commonest operators")
    parser.add_argument(
        "--traffic", action="store_true", help="at full width: the bytes moved outside products"
    )
    parser.add_argument("--sequence-len", type=int, default=2048, help="with --traffic")
    args = parser.parse_args()
    data, rows = data_overrides(args)
    with tempfile.TemporaryDirectory() as output:
        depth = compose([PRESET], output).model.source.num_hidden_layers
    length = args.sequence_len if args.traffic else None
    (one, moved_one), (two, moved_two) = (count(n, data, args.set, length) for n in (1, 2))
    layer = collections.Counter({k: two[k] - one[k] for k in one | two})
    print(f"rows: {rows}; overrides: {args.set or 'none'}\n")
    print(table(project(one, two, depth), layer, depth))
    if args.traffic:
        moved = project(moved_one, moved_two, depth)
        moved_layer = collections.Counter({k: moved_two[k] - moved_one[k] for k in moved})
        print(f"\nbytes moved outside matrix products and attention kernels, {length} tokens:")
        print(traffic_table(moved, moved_layer, depth))
        if args.top:
            print(f"\na layer's {args.top} largest movers:")
            for (phase, kind, op, sig), n in moved_layer.most_common(args.top):
                print(f"  {n / 1e9:6.3f} GB  {phase:13s} {kind:16s} {op:18s} {sig}")
    if args.top:
        ops = collections.Counter()
        for (_, kind, op, _), n in layer.items():
            ops[(kind, op)] += n
        print(f"\na layer's {args.top} commonest operators (forward, recomputation, backward):")
        for (kind, op), n in ops.most_common(args.top):
            print(f"  {n:5d}  {op:28s} {kind}")


if __name__ == "__main__":
    main()
