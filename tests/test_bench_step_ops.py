"""bench/step_ops.py: every operator of a step is counted once, under the module whose code (or
whose autograd node) dispatched it, through checkpointing's recomputation, which stops midway;
and one layer's count projects linearly."""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch.utils.checkpoint import checkpoint

from helpers import CountOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import step_ops  # noqa: E402


class ToyRMSNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(16))

    def forward(self, x):
        return x * self.weight


class ToyMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = ToyRMSNorm()
        self.proj = torch.nn.Linear(16, 16, bias=False)

    def forward(self, x):
        # The doubling is the MLP's own, and its autograd node sits behind the projection's.
        return x + self.proj(self.norm(x) * 2)


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = ToyMLP()

    def forward(self, x):
        # Non-reentrant checkpointing stops the recomputation once it has what backward
        # needs: here after the norm, before the projection's forward returns.
        return checkpoint(self.layer, x, use_reentrant=False)


def _step(model, x, mode):
    with mode:
        loss = model(x).sum()
        loss.backward()


def test_each_operator_is_counted_once_under_its_module() -> None:
    torch.manual_seed(0)
    model = get_peft_model(Toy(), LoraConfig(r=4, target_modules=["proj"]))
    x = torch.randn(3, 16, requires_grad=True)
    everything = CountOps()
    _step(model, x, everything)
    counter = step_ops.OpCounter(model)
    _step(model, x, counter)
    counter.remove()

    assert sum(counter.counts.values()) == everything.n  # nothing lost, nothing twice
    assert counter._stack == []  # the stopped recomputation unwound
    by = collections.Counter()
    ops = collections.Counter()
    for (phase, kind, op, _), n in counter.counts.items():
        by[(phase, kind)] += n
        ops[(phase, kind, op)] += n
    # The norm: one product forward and once more recomputed; in backward its MulBackward
    # node gives the input's and the weight's gradients.
    norm = {k: v for k, v in ops.items() if k[1] == "norm"}
    assert norm[("forward", "norm", "mul")] == 1
    assert norm[("recomputation", "norm", "mul")] == 1
    assert by[("backward", "norm")] >= 2
    # The LoRA projection: its base and adapter matmuls in each pass, and its gradients.
    assert by[("forward", "LoRA projection")] > 0
    assert by[("recomputation", "LoRA projection")] > 0
    assert ops[("backward", "LoRA projection", "mm")] >= 3  # x, lora_A, lora_B
    # The MLP's own product and add, found in backward past the projection's nodes.
    assert ops[("forward", "MLP", "mul")] == 1
    assert ops[("backward", "MLP", "mul")] >= 1
    # What no module owns: the loss's sum and its gradient seed.
    assert by[("forward", "outside the layers")] == 2
    assert by[("backward", "outside the layers")] >= 1  # the sum's backward


def test_views_and_allocations_are_told_from_operators_that_move_data() -> None:
    aten = torch.ops.aten
    for op in (aten.view.default, aten.t.default, aten.detach.default, aten.view.dtype):
        assert not step_ops.launches(op)
    assert not step_ops.launches(aten.empty.memory_format)
    for op in (aten.mul_.Tensor, aten.mul.out, aten._to_copy.default, aten.mm.default):
        assert step_ops.launches(op)


def test_one_layer_s_count_projects_linearly() -> None:
    one = collections.Counter({("forward", "norm", "mul"): 3, ("forward", "optimizer", "add"): 5})
    two = collections.Counter({("forward", "norm", "mul"): 5, ("forward", "optimizer", "add"): 7})
    projected = step_ops.project(one, two, 32)
    assert projected[("forward", "norm", "mul")] == 3 + 2 * 31
    assert projected[("forward", "optimizer", "add")] == 5 + 2 * 31


def test_bytes_moved_count_each_read_and_write_once() -> None:
    a, out = torch.ones(4, 8), torch.empty(4, 8)
    b = torch.ones(4, 8, dtype=torch.bfloat16)
    # An out= tensor is written, not read.
    reads, writes = step_ops.moved("mul", (a, b), {"out": out}, out)
    assert (reads, writes) == ([a, b], [out])
    assert step_ops.signature(reads, writes) == "float32,bfloat16->float32"
    # In place: the first input read and written.
    reads, writes = step_ops.moved("mul_", (a, b), {}, a)
    assert (reads, writes) == ([a, b], [a])
    # An overwrite does not read what it overwrites.
    reads, writes = step_ops.moved("copy_", (out, a), {}, out)
    assert (reads, writes) == ([a], [out])
    assert step_ops.is_product("mm") and step_ops.is_product("gemm_4bit")
    assert step_ops.is_product("_scaled_dot_product_flash_attention_for_cpu_backward")
    assert not step_ops.is_product("mul") and not step_ops.is_product("addcmul")


def test_the_counter_adds_up_the_bytes_of_a_step() -> None:
    torch.manual_seed(0)
    model = get_peft_model(Toy(), LoraConfig(r=4, target_modules=["proj"]))
    x = torch.randn(3, 16, requires_grad=True)
    counter = step_ops.OpCounter(model)
    _step(model, x, counter)
    counter.remove()
    moved = counter.moved
    # The norm's forward product: x and its weight read, the product written (fp32).
    assert moved[("forward", "norm", "mul", "float32,float32->float32")] == (48 + 16 + 48) * 4
    assert all(not step_ops.is_product(op) for (_, _, op, _) in moved)
    assert sum(moved.values()) > 0
