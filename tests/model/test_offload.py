"""`model.offload_activations`: with checkpointing, each decoder layer's input leaves the device
after forward and comes back, unchanged, for backward; weights are never copied. On the CPU the
same path is followed by treating every tensor as offloadable; on a GPU (`pytest -m gpu`) the
device memory a forward leaves behind falls by the layers' inputs."""

from __future__ import annotations

import contextlib
import gc
import math
import weakref

import numpy
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from helpers import TINY, compose_config, logged, packed_test_module
from lorafit.model import offload
from lorafit.model.offload import HostOffload
from lorafit.training import build_run

LAYERS = 2  # tiny_mistral's
TOKENS = 96


def _batch(device: str = "cpu") -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (1, TOKENS), generator=generator)
    positions = torch.cat([torch.arange(40), torch.arange(TOKENS - 40)])[None]
    labels = ids.clone()
    labels[0, :10] = -100
    return {
        k: v.to(device)
        for k, v in {"input_ids": ids, "position_ids": positions, "labels": labels}.items()
    }


def _step(module, batch, hooks: HostOffload | None, autocast: str | None = None):
    """Forward under `hooks`, then which layer inputs are still alive, then backward."""
    layers = module.model.get_base_model().model.layers
    inputs: list[weakref.ref] = []

    def remember(_, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if not torch.is_grad_enabled() or len(inputs) < len(layers):  # forward, not recompute
            inputs.append(weakref.ref(hidden))

    handles = [layer.register_forward_pre_hook(remember, with_kwargs=True) for layer in layers]
    module.zero_grad(set_to_none=True)
    device = batch["input_ids"].device.type
    precision = (
        torch.autocast(device, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    )
    with precision, hooks if hooks is not None else contextlib.nullcontext():
        loss, _ = module._loss_sum(batch)
    gc.collect()
    alive = [ref() is not None for ref in inputs[: len(layers)]]
    loss.backward()
    for handle in handles:
        handle.remove()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    return loss.detach(), alive, grads


@pytest.mark.parametrize("autocast", [None, "bf16"])
def test_layer_inputs_leave_for_the_host_and_come_back_unchanged(autocast):
    module = packed_test_module(checkpointing=True)
    batch = _batch()
    plain_loss, plain_alive, plain_grads = _step(module, batch, None, autocast)
    # On the CPU the host is where the tensors already are: every tensor counts as offloadable
    # here, so the copies and the hand-back are those a GPU run makes.
    hooks = HostOffload(
        weights=list(module.parameters()), offloads=lambda tensor: True, min_bytes=0
    )
    loss, alive, grads = _step(module, batch, hooks, autocast)

    assert plain_alive == [True] * LAYERS  # checkpointing keeps each layer's input
    # With offloading only the host copy is left, the first layer's input included: the
    # embeddings' output, which transformers and peft made a leaf that requires grad (its
    # gradient accumulator then held it on the device) until lorafit's checkpointing took
    # their hooks off (`adapters._no_embedding_output_grad`).
    assert alive == [False] * LAYERS
    # The layers' inputs (fp32 residual stream: 96 tokens x 64 values x 4 bytes each) and
    # the few tensors saved between layers; no weight and nothing from inside a layer.
    layer_input = TOKENS * 64 * 4
    assert LAYERS * layer_input <= hooks.offloaded_bytes <= (LAYERS + 3) * layer_input
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, plain_grads[name]), name


class _Chain:
    """Linear layers, each checkpointed, and the gradients of one step over them, with or
    without hooks: each layer's input and the loss's are saved for backward."""

    def __init__(self, layers: int, reentrant: bool = True):
        torch.manual_seed(0)
        self.layers = [torch.nn.Linear(64, 64) for _ in range(layers)]
        self.weights = [p for layer in self.layers for p in layer.parameters()]
        self.x = torch.randn(32, 64, requires_grad=True)
        self.reentrant = reentrant
        self.saved = layers + 1

    def step(self, hooks: HostOffload | None) -> list[torch.Tensor]:
        for param in [self.x, *self.weights]:
            param.grad = None
        out = self.x
        with hooks if hooks is not None else contextlib.nullcontext():
            for layer in self.layers:
                out = checkpoint(layer, out, use_reentrant=self.reentrant)
            loss = out.square().sum()  # saves the last layer's output too
        loss.backward()
        return [self.x.grad.clone(), *(p.grad.clone() for p in self.weights)]

    def hooks(self) -> HostOffload:
        return HostOffload(weights=self.weights, offloads=lambda tensor: True, min_bytes=0)


@pytest.mark.parametrize("reentrant", [True, False])
def test_backward_finds_each_saved_tensor_fetched_ahead_but_the_first_it_takes(reentrant):
    """Backward takes the saved tensors in the reverse of the forward's order; each take starts
    bringing back the one saved before it, so that on a GPU its copy runs while this layer is
    recomputed. Every tensor but the first taken is then found fetched ahead, and the gradients
    are those without offloading."""
    chain = _Chain(4, reentrant)
    hooks = chain.hooks()
    plain, offloaded = chain.step(None), chain.step(hooks)
    assert hooks.offloaded_bytes == chain.saved * chain.x.nbytes
    assert hooks.fetched_ahead == chain.saved - 1
    for got, want in zip(offloaded, plain, strict=True):
        assert torch.equal(got, want)


class _FakeStreams:
    """CUDA's stream calls stood in for on the CPU, logging what the hooks ask of them: which
    stream waits for which event. The copies themselves run at once, on the CPU."""

    def __init__(self, monkeypatch, copies_done: bool):
        self.copies_done = copies_done
        self.waits: list[tuple[str, str]] = []  # (stream waiting, event's stream and number)
        self.events = 0
        self.recorded: list[str] = []
        streams = self

        class Event:
            def __init__(self, stream):
                streams.events += 1
                self.name = f"{stream.name}:{streams.events}"

            def query(self):
                return streams.copies_done

        class Stream:
            def __init__(self, name="side"):
                self.name = name

            def wait_stream(self, other):
                self.waits.append((self.name, other.name))

            def record_event(self):
                return Event(self)

            def wait_event(self, event):
                streams.waits.append((self.name, event.name))

        Stream.waits = []
        self.compute = Stream("compute")
        monkeypatch.setattr(offload, "_streamed", lambda tensor: True)
        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.compute)
        monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
        monkeypatch.setattr(
            torch.Tensor, "record_stream", lambda tensor, stream: self.recorded.append(stream.name)
        )
        self.stream_class = Stream


@pytest.mark.parametrize("copies_done", [False, True])
def test_the_copy_stream_protocol_run_on_the_cpu(monkeypatch, copies_done):
    """The CUDA path of the hooks, with fake streams: each copy to the host waits for the
    compute stream; a device tensor whose copy has not run is let go only once the compute
    stream waits for that copy; each tensor fetched ahead is used only after the compute
    stream waits for its copy back, and its block waits for the copy stream. The numbers are
    those without offloading."""
    chain = _Chain(5)
    plain = chain.step(None)
    streams = _FakeStreams(monkeypatch, copies_done)
    hooks = chain.hooks()
    offloaded = chain.step(hooks)
    for got, want in zip(offloaded, plain, strict=True):
        assert torch.equal(got, want)
    saved = chain.saved
    assert hooks.fetched_ahead == saved - 1
    side_waits = streams.stream_class.waits
    # Each copy out and each copy back first waits for the compute stream.
    assert side_waits == [("side", "compute")] * (saved + saved - 1)
    compute_waits = [event for stream, event in streams.waits if stream == "compute"]
    # Events are numbered in the order made: the copies out first (1..saved), then back.
    outs = [e for e in compute_waits if int(e.split(":")[1]) <= saved]
    backs = [e for e in compute_waits if int(e.split(":")[1]) > saved]
    # Copies out still running are waited for by the compute stream before their tensors go;
    # done, they are let go without a wait.
    assert len(outs) == (saved if not copies_done else 0)
    assert len(set(outs)) == len(outs)
    assert len(backs) == saved - 1 == len(set(backs))  # every copy back, before its use
    assert streams.recorded == ["side"] * (saved - 1)
    assert hooks._in_flight == []


def test_weights_and_small_tensors_stay_put():
    weight = torch.nn.Parameter(torch.randn(512, 512))
    frozen = torch.randn(512, 512)
    hooks = HostOffload(weights=[frozen], offloads=lambda tensor: True)
    activation = torch.randn(1024, 512, requires_grad=True)  # 2 MiB: offloaded
    small = torch.randn(8, 512, requires_grad=True)  # 16 KiB: kept
    with hooks:
        out = (activation @ weight).sum() + (small @ frozen).sum() + (activation * 2).sum()
    out.backward()
    # activation was saved twice (for both products) but copied once; the weights not at all.
    assert hooks.offloaded_bytes == activation.nbytes
    torch.testing.assert_close(weight.grad, activation.T @ torch.ones(1024, 512))


def test_a_lightning_fit_offloads_each_training_forward(tmp_path, monkeypatch):
    # The option's wiring through training_step, on the CPU's path for a GPU: every tensor
    # offloadable, no size floor; bf16 autocast as on a GPU. Equality with the plain path is
    # the direct test's above.
    monkeypatch.setattr(offload, "_on_accelerator", lambda tensor: True)
    monkeypatch.setattr(offload, "MIN_BYTES", 0)
    overrides = [
        *TINY,
        "trainer=cpu_bf16",
        "model.gradient_checkpointing=true",
        "model.offload_activations=true",
        "trainer.max_steps=2",
    ]
    run = build_run(compose_config(overrides, tmp_path))
    forwards = []
    real_enter = HostOffload.__enter__
    monkeypatch.setattr(
        HostOffload, "__enter__", lambda self: forwards.append(1) or real_enter(self)
    )
    run.trainer.fit(run.module, datamodule=run.datamodule)
    # Each training micro-batch's forward; validation and the packing preflight take none.
    assert len(forwards) == 2 * run.trainer.accumulate_grad_batches
    # At least each layer's input after the first: 256-token rows of 64 fp32 values.
    assert run.module._offload.offloaded_bytes >= (LAYERS - 1) * 256 * 64 * 4
    assert all(math.isfinite(loss) for loss in logged(tmp_path, "train/loss"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_layer_inputs_leave_device_memory():
    module = packed_test_module(
        checkpointing=True,
        overrides=(
            "model.dtype=bfloat16",
            "model.source.hidden_size=512",
            "model.source.intermediate_size=1024",
            "model.source.num_hidden_layers=4",
        ),
    ).cuda()
    generator = torch.Generator().manual_seed(1)
    tokens = 4096
    ids = torch.randint(3, 1000, (1, tokens), generator=generator)
    batch = {
        "input_ids": ids.cuda(),
        "position_ids": torch.arange(tokens)[None].cuda(),
        "labels": ids.cuda(),
    }
    left = {}
    results = {}
    runs = {"plain": None, "plain again": None, "offloaded": HostOffload(list(module.parameters()))}
    with _deterministic():
        for name, hooks in runs.items():
            module.zero_grad(set_to_none=True)
            torch.manual_seed(0)
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            with torch.autocast("cuda", dtype=torch.bfloat16), hooks or contextlib.nullcontext():
                loss, _ = module._loss_sum(batch)
                # The copies to the host run on a stream of their own; the hooks let go of
                # the device tensors once theirs have run, at the latest as the context ends.
                torch.cuda.synchronize()
            left[name] = torch.cuda.memory_allocated() - before
            loss.backward()
            results[name] = (
                loss.detach(),
                [p.grad.clone() for p in module.parameters() if p.requires_grad],
            )
    # 4 layers x 4096 tokens x 512 bf16 values: 16 MiB kept on the device without offloading.
    assert left["plain"] - left["offloaded"] >= 0.9 * 4 * tokens * 512 * 2
    # Brought back one ahead of need on the copy stream: all but the first taken.
    assert runs["offloaded"].fetched_ahead >= 3
    assert torch.equal(results["offloaded"][0], results["plain"][0])
    # On an H200 two plain runs gave other gradients (the same loss): some CUDA backward kernels
    # sum with atomics where no deterministic form exists. The offloaded run may part from the
    # plain one no further than a second plain run does: bit for bit where backward repeats
    # itself. A layer recomputed from a wrong input (the bug once found here) parts by far more.
    noise = _distance(results["plain again"][1], results["plain"][1])
    assert _distance(results["offloaded"][1], results["plain"][1]) <= 3 * noise


@contextlib.contextmanager
def _deterministic():
    """torch's deterministic kernels where they exist (a warning where not)."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return math.sqrt(
        sum(float((x.float() - y.float()).square().sum()) for x, y in zip(a, b, strict=True))
    )


def test_a_new_tensor_at_a_dead_tensors_address_gets_its_own_copy():
    """On a GPU the caching allocator hands a freed block straight to the next tensor of its
    size, so the next layer's input often sits where the last one's did, with the same shape
    and version; reusing the first one's host copy for it gave wrong gradients on an H200.
    Reproduced on the CPU with two tensors over one buffer, written outside torch so that
    both are at version 0."""
    buffer = bytearray(4 * 1024)
    values = numpy.frombuffer(buffer, dtype=numpy.float32)
    weight = torch.nn.Parameter(torch.ones(1024))
    hooks = HostOffload(offloads=lambda tensor: True, min_bytes=0)
    with hooks:
        values[:] = 1.0
        first = torch.frombuffer(buffer, dtype=torch.float32)
        total = (first * weight).sum()  # saves `first` for the weight's gradient
        pointer = first.data_ptr()
        del first  # only its host copy is left
        values[:] = 2.0
        second = torch.frombuffer(buffer, dtype=torch.float32)
        assert second.data_ptr() == pointer and second._version == 0
        total = total + (second * weight).sum()
    total.backward()
    assert torch.equal(weight.grad, torch.full((1024,), 3.0))
    assert hooks.offloaded_bytes == 2 * 4 * 1024
