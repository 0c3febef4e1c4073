"""`model.offload_activations`: what a training step keeps for backward outside the checkpointed
layers waits in host memory instead of GPU memory.

With gradient checkpointing a decoder layer keeps only its input for backward, but all of them
at once: for Mistral-7B, 32 layers x 4096 values a token, 1 GiB at 2048 tokens in fp32 and 4
GiB at 8192. Either form of torch's checkpoint saves each layer's input through the saved-tensor
hooks in force around it, and nothing else of the layer: the reentrant form runs the layer
without autograd, the non-reentrant one sends the layer's own activations through its own hooks,
which take precedence. So hooks around the model's forward catch exactly those inputs, and the
few tensors saved between layers (the final norm's input, the loss's).

A tensor is copied to pinned host memory on a stream of its own, so that the copy runs while
the compute stream goes on with the next layer; the device tensor is held until its copy has
run (no host wait: the copy's event is polled, and past a few copies in flight the compute
stream, not the host, waits for the oldest). In backward each tensor comes back on that stream
one ahead of need: when backward takes the input of one layer, the input of the layer before
it starts coming back, while this layer is recomputed and differentiated; the compute stream
waits for a copy only where it uses it. Weights and small tensors stay where they are; a
tensor saved twice in one forward is copied once. Without the overlap (on the compute stream)
each step waited for every layer input to cross the bus twice: 0.89x the speed at 8192 tokens
on an H200 (docs/benchmarks.md).

"Saved twice" must mean the same tensor, not the same address: once its host copy is made, the
device tensor can be freed, and a GPU's caching allocator hands the block straight to the next
tensor of that size (the next layer's input, same shape, same version). So a copy is reused
only while the tensor it was made from is still alive.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.autograd.graph import saved_tensors_hooks

# Below this a copy costs more in latency than the memory it frees.
MIN_BYTES = 1 << 20
# Copies to the host in flight at once; past this the compute stream waits for the oldest, so
# that a slow bus holds at most this many device tensors beyond what offloading keeps anyway.
MAX_IN_FLIGHT = 2


def _on_accelerator(tensor: torch.Tensor) -> bool:
    return tensor.device.type not in ("cpu", "meta")


def _streamed(tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s copies run on a CUDA stream of their own (tests stand in fake
    streams to follow that path on the CPU)."""
    return tensor.is_cuda


class _Saved:
    """What the hooks hand autograd for an offloaded tensor: its host copy, where it came from,
    its place in the forward's order, and its copy back once fetched ahead of need."""

    __slots__ = ("__weakref__", "device", "fetched", "host", "index", "ready", "streamed", "taken")

    def __init__(self, device: torch.device, host: torch.Tensor, index: int, streamed: bool):
        self.device = device
        self.host = host
        self.index = index
        self.streamed = streamed  # copied on a stream of its own (`_streamed`)
        self.fetched: torch.Tensor | None = None  # on the device, or on its way there
        self.ready: torch.cuda.Event | None = None  # when `fetched` has arrived
        self.taken = False  # unpacked once: fetching it ahead again would be wasted


class HostOffload(saved_tensors_hooks):
    """Saved-tensor hooks that keep large activations in host memory until backward needs them.

    Args:
        weights: Tensors never to copy (a model's parameters and buffers): they stay on the
            device anyway, and copying them would only add a second copy.
        offloads: Which tensors go to the host; by default those on an accelerator. Tests pass
            `lambda tensor: True` to follow the same path on the CPU.
        min_bytes: Smaller tensors stay put; by default `MIN_BYTES`.
    """

    def __init__(
        self,
        weights: list[torch.Tensor] | None = None,
        offloads: Callable[[torch.Tensor], bool] | None = None,
        min_bytes: int | None = None,
    ):
        self.offloads = offloads or _on_accelerator
        self.min_bytes = MIN_BYTES if min_bytes is None else min_bytes
        self.weight_storages = {w.untyped_storage().data_ptr() for w in weights or []}
        self.offloaded_bytes = 0
        # How many unpacks found their tensor fetched ahead (the rest waited for a copy).
        self.fetched_ahead = 0
        # One host copy per tensor saved several times in one forward (the same storage, view
        # and version), with a weak reference to the tensor copied: a dead one's address may
        # belong to another tensor by now. Kept for the context's duration, one forward.
        self._copies: dict[tuple, tuple[weakref.ref, _Saved]] = {}
        # The forward's offloaded tensors in order, weakly: autograd's saved handles own them.
        self._order: list[weakref.ref] = []
        # Device tensors whose copy to the host may still be running, with its event.
        self._in_flight: list[tuple[torch.Tensor, torch.cuda.Event]] = []
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> HostOffload:
        self._release_in_flight(keep=0)
        self._copies, self._order = {}, []
        self.offloaded_bytes = 0
        self.fetched_ahead = 0
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._copies = {}  # the saved handles keep what backward needs
        self._release_in_flight(keep=MAX_IN_FLIGHT, wait=False)
        super().__exit__(*exc)

    def _keeps(self, tensor: torch.Tensor) -> bool:
        return (
            not self.offloads(tensor)
            or isinstance(tensor, torch.nn.Parameter)
            or tensor.untyped_storage().nbytes() < self.min_bytes
            or tensor.untyped_storage().data_ptr() in self.weight_storages
        )

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        """The side stream the copies of `device` run on."""
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor | _Saved:
        if self._keeps(tensor):
            return tensor
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor._version,
        )
        source_ref, saved = self._copies.get(key, (None, None))
        if source_ref is None or source_ref() is None:
            # A view's own elements only, laid out contiguously; the storage may be larger.
            source = tensor.contiguous()
            host = self._host_buffer(source)
            streamed = _streamed(source)
            if streamed:
                self._copy_out(source, host)
            else:
                host.copy_(source)
            saved = _Saved(tensor.device, host, len(self._order), streamed)
            self._order.append(weakref.ref(saved))
            self._copies[key] = (weakref.ref(tensor), saved)
            self.offloaded_bytes += host.nbytes
        return saved

    def _host_buffer(self, source: torch.Tensor) -> torch.Tensor:
        """An empty host tensor for `source`'s copy, pinned where it comes from a GPU."""
        return torch.empty(
            source.shape, dtype=source.dtype, device="cpu", pin_memory=source.is_cuda
        )

    def _back(self, saved: _Saved) -> torch.Tensor:
        """The host copy of `saved` on its device again, where it is not streamed (on the CPU:
        the host copy itself)."""
        return saved.host.to(saved.device)

    def _copy_out(self, source: torch.Tensor, host: torch.Tensor) -> None:
        """Copy `source` to `host` on the side stream, after what the compute stream has queued
        (which writes it), holding `source` until the copy has run."""
        side = self._stream(source.device)
        side.wait_stream(torch.cuda.current_stream(source.device))
        with torch.cuda.stream(side):
            host.copy_(source, non_blocking=True)
        self._in_flight.append((source, side.record_event()))
        self._release_in_flight(keep=MAX_IN_FLIGHT)

    def _release_in_flight(self, keep: int, wait: bool = True) -> None:
        """Let go of device tensors whose copy to the host has run, and past `keep` of the
        oldest others once the compute stream waits for their copy (the host never waits): a
        block freed on the compute stream is reused only by work queued after that wait."""
        self._in_flight = [(t, done) for t, done in self._in_flight if not done.query()]
        if not wait:
            return
        while len(self._in_flight) > keep:
            tensor, done = self._in_flight.pop(0)
            torch.cuda.current_stream(tensor.device).wait_event(done)

    def _unpack(self, packed: torch.Tensor | _Saved) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        self._release_in_flight(keep=0)  # backward has begun: the forward's copies are wanted
        tensor = self._take(packed)
        self._fetch_ahead(packed.index - 1)
        return tensor

    def _take(self, saved: _Saved) -> torch.Tensor:
        """The device tensor of `saved`: fetched ahead (the compute stream waits for its copy),
        else copied now on the compute stream."""
        fetched, saved.fetched, saved.taken = saved.fetched, None, True
        if fetched is not None:
            self.fetched_ahead += 1
            if saved.ready is not None:
                torch.cuda.current_stream(saved.device).wait_event(saved.ready)
            return fetched
        if not saved.streamed:
            return self._back(saved)
        return saved.host.to(saved.device, non_blocking=True)

    def _fetch_ahead(self, index: int) -> None:
        """Start bringing back the tensor saved before this one: backward takes them in the
        reverse of the forward's order. Made for the compute stream (its memory is the compute
        stream's to free), written by the side stream once the compute stream's queued work is
        done (the block may have been another tensor's until then)."""
        saved = self._order[index]() if index >= 0 else None
        if saved is None or saved.taken or saved.fetched is not None:
            return
        if not saved.streamed:
            saved.fetched = self._back(saved)
            return
        side = self._stream(saved.device)
        saved.fetched = torch.empty_like(saved.host, device=saved.device)
        side.wait_stream(torch.cuda.current_stream(saved.device))
        with torch.cuda.stream(side):
            saved.fetched.copy_(saved.host, non_blocking=True)
        saved.ready = side.record_event()
        # Should backward drop it untaken, its block waits for this copy before reuse.
        saved.fetched.record_stream(side)
