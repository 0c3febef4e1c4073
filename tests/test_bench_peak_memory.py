"""bench/peak_memory.py: the CPU allocator's events add up to the bytes allocated, every kind of
storage that outlives a step is counted once, and the parts grow linearly with the layer count,
which the 32-layer projection rests on."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import peak_memory  # noqa: E402

MIB = 2**20


def test_the_running_sum_of_allocations_peaks_where_the_bytes_did() -> None:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        before = torch.empty(32 * MIB, dtype=torch.uint8)  # outside the measured span
        with torch.profiler.record_function("measured"):
            del before  # freed inside it: the span starts 32 MiB down
            first = torch.empty(4 * MIB, dtype=torch.uint8)
            second = torch.empty(8 * MIB, dtype=torch.uint8)
            del first
            third = torch.empty(2 * MIB, dtype=torch.uint8)
            del second, third
            kept = torch.empty(3 * MIB, dtype=torch.uint8)
    events = prof.profiler.kineto_results.events()
    peak, left, ops = peak_memory.running_peak(events, "measured")
    assert peak == 0  # never above where the span started: the 32 MiB went first
    assert left == kept.untyped_storage().nbytes() - 32 * MIB

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.profiler.record_function("measured"):
            first = torch.empty(4 * MIB, dtype=torch.uint8)
            second = torch.empty(8 * MIB, dtype=torch.uint8)
            del first
            third = torch.empty(2 * MIB, dtype=torch.uint8)
            del second, third
    peak, left, ops = peak_memory.running_peak(prof.profiler.kineto_results.events(), "measured")
    assert peak == 12 * MIB  # first and second together; third came after first was freed
    assert left == 0
    assert ops.startswith("aten::empty")  # the op that reached the peak, innermost first


def test_the_live_tensors_at_the_peak_are_those_alive_together() -> None:
    outside = torch.empty(16 * MIB, dtype=torch.uint8)  # made before: not the step's
    with peak_memory.LiveTensors() as live:
        before = torch.empty(32 * MIB, dtype=torch.uint8)
        live.mark()
        outside.view(4, -1).add_(1)  # a view and an in-place op allocate nothing
        first = torch.empty(4 * MIB, dtype=torch.uint8)
        second = torch.ones(2, MIB, dtype=torch.float32)  # 8 MiB
        del first
        third = torch.empty(2 * MIB, dtype=torch.uint8)
        del before, second, third
    assert live.peak - live.origin == 12 * MIB
    assert live.running - live.origin == -32 * MIB
    sizes = [(size, label.split()[1]) for size, label in live.at_peak]
    assert sizes == [
        (32 * MIB, "empty.memory_format"),  # made before the mark and alive: part of the peak
        (8 * MIB, "ones.default"),
        (4 * MIB, "empty.memory_format"),
    ]


def _made_here() -> torch.Tensor:
    return torch.empty(16 * MIB, dtype=torch.uint8)


def test_a_large_live_tensor_names_the_code_that_made_it(monkeypatch) -> None:
    monkeypatch.setattr(peak_memory.LiveTensors, "OWN_CODE", ("/test_bench_peak_memory.py",))
    with peak_memory.LiveTensors() as live:
        live.mark()
        large = _made_here()
        small = torch.empty(MIB, dtype=torch.uint8)  # under NAMED_FROM: no stack walk
        del large, small
    (large_label, small_label) = [label for _, label in live.at_peak]
    line = _made_here.__code__.co_firstlineno + 1
    assert large_label.endswith(f"test_bench_peak_memory.py:{line} _made_here"), large_label
    assert " <- test_bench_peak_memory.py:" in large_label  # the test itself, outermost first
    assert "<-" not in small_label


def test_a_large_tensor_autograd_makes_names_its_node(monkeypatch) -> None:
    monkeypatch.setattr(peak_memory.LiveTensors, "NAMED_FROM", MIB)
    x = torch.zeros(MIB // 4, requires_grad=True)  # 1 MiB of fp32
    with peak_memory.LiveTensors() as live:
        live.mark()
        # Backward peaks where ToCopyBackward0 widens the bf16 gradient back to fp32 for x.
        x.to(torch.bfloat16).sum().backward()
    labels = [label for _, label in live.at_peak]
    assert any(
        label.startswith("backward _to_copy") and label.endswith("<- autograd's ToCopyBackward0")
        for label in labels
    ), labels


def _measure(layers: int) -> dict:
    return peak_memory.measure(
        layers,
        sequence_len=128,
        data=["data=demo"],
        extra=["model=tiny_mistral", "model.gradient_checkpointing=true"],
    )


@pytest.mark.slow
def test_a_tiny_qlora_step_grows_linearly_with_its_layers() -> None:
    runs = {layers: _measure(layers) for layers in (1, 2, 3)}
    parts = ["4-bit weights", "LoRA weights", "LoRA gradients", "optimizer"]
    for part in parts:
        one, two, three = (runs[n][part] for n in (1, 2, 3))
        assert one > 0, part  # each kind is found (4-bit weights: the packed data and states)
        assert three - two == two - one, part  # exactly one layer's worth each time
    # LoRA weights are fp32; gradients one fp32 tensor of each, AdamW two (and a step count).
    assert runs[1]["LoRA gradients"] == runs[1]["LoRA weights"]
    assert runs[1]["optimizer"] == pytest.approx(2 * runs[1]["LoRA weights"], rel=1e-3)
    # Besides the embedding and output layer, a layer's two fp32 norms of 64 values, and its
    # 7 LoRA layers' two fp32 constants (`DropoutLinear.zero` and `one`).
    frozen = [runs[n]["other frozen weights"] for n in (1, 3)]
    assert frozen[1] - frozen[0] == 2 * (2 * 64 * 4 + 7 * 2 * 4)
    # The step's own peak: a layer's checkpointed input more per layer (128 tokens x 64 fp32
    # values = 32 KiB), the transient of one recomputed layer the same for any count.
    steps = [runs[n]["step peak above"] for n in (1, 2, 3)]
    # Nothing outlives a step but what is counted as live: the previous step's gradients,
    # freed in this one, were allocated while recording, so their free is seen.
    assert all(abs(runs[n]["left"]) < 1024 for n in (1, 2, 3))
    assert steps[0] > 0
    assert steps[2] - steps[1] == pytest.approx(steps[1] - steps[0], abs=8 * 1024)


def test_the_gpu_forms_give_the_same_bits_and_are_undone_after() -> None:
    from lorafit.model import lora_branch, lora_dropout, module, offload

    x = torch.randn(600, 96)
    keep = (torch.rand(600, 96) < 0.9).view(torch.uint8)
    scale = (torch.ones(()) / 0.9).item()
    zero, one = torch.full((1,), -0.0), torch.ones(1)
    base, product = torch.randn(2, 300, 96).bfloat16().unbind()
    original = lora_dropout.mixed_addcmul
    with peak_memory.gpu_forms():
        assert lora_dropout.CPU_FORM_DEVICES == frozenset()
        assert lora_branch.mixed_addcmul is lora_dropout.mixed_addcmul is not original
        assert module.HostOffload is peak_memory.HostMemoryOffload
        for dtype in (torch.bfloat16, torch.float32):
            expected = (x * keep.bool() * scale).to(dtype)
            assert torch.equal(lora_dropout.dropped_as(x, keep, scale, dtype, zero), expected)
        grad = x.bfloat16()
        expected = (grad * keep).float() * scale
        assert torch.equal(lora_dropout.mixed_addcmul(zero, grad, keep, scale, x.dtype), expected)
        expected = torch.add(base.float(), product, alpha=0.5)
        assert torch.equal(lora_dropout.mixed_addcmul(base, product, one, 0.5, x.dtype), expected)
    assert lora_dropout.CPU_FORM_DEVICES == frozenset({"cpu"})
    assert lora_branch.mixed_addcmul is lora_dropout.mixed_addcmul is original
    assert module.HostOffload is offload.HostOffload


def test_without_gpu_memory_the_gpu_forms_keep_lorafit_s_own_function() -> None:
    # bench/step_ops.py counts operators: the memory stand-in's row chunks would add some.
    from lorafit.model import lora_branch, lora_dropout

    original = lora_dropout.mixed_addcmul
    with peak_memory.gpu_forms(gpu_memory=False):
        assert lora_dropout.CPU_FORM_DEVICES == frozenset()
        assert lora_branch.mixed_addcmul is original and lora_dropout.mixed_addcmul is original


def test_offloaded_tensors_leave_the_count_until_backward_brings_them_back() -> None:
    """`model.offload_activations` modelled on the CPU: a saved 4 MiB tensor leaves the count
    once its only holder is autograd (as a GPU frees it after the copy to the host), and
    backward's gradients are those of a run without offloading."""
    x = torch.randn(MIB, requires_grad=True)
    left, grads = {}, {}
    for offloaded in (False, True):
        hooks = peak_memory.HostMemoryOffload() if offloaded else contextlib.nullcontext()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with torch.profiler.record_function("forward"), hooks:
                kept = x * 2  # saved by sin for its backward
                y = kept.sin()
                del kept
        events = prof.profiler.kineto_results.events()
        left[offloaded] = peak_memory.running_peak(events, "forward")[1]
        y.sum().backward()
        grads[offloaded], x.grad = x.grad, None
        del y  # freed outside the next run's span
    # y and sin's input, or y alone (a few bytes more: the scalar 2 as a tensor)
    assert {k: round(v / MIB, 3) for k, v in left.items()} == {False: 8, True: 4}
    assert torch.equal(grads[True], grads[False])
