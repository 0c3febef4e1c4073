"""`model.offload_activations`: what a training step keeps for backward outside the checkpointed
layers waits in host memory instead of GPU memory.

With gradient checkpointing a decoder layer keeps only its input for backward, but all of them
at once: for Mistral-7B, 32 layers x 4096 values a token, 1 GiB at 2048 tokens in fp32 and 4
GiB at 8192. Either form of torch's checkpoint saves each layer's input through the saved-tensor
hooks in force around it, and nothing else of the layer: the reentrant form runs the layer
without autograd, the non-reentrant one sends the layer's own activations through its own hooks,
which take precedence. So hooks around the model's forward catch exactly those inputs, and the
few tensors saved between layers (the final norm's input, the loss's).

A tensor is copied to pinned host memory on the compute stream (no host wait: the copy is
queued like a kernel, and the caching allocator does not hand its GPU block to a later kernel
before the copy has run) and brought back the same way when backward reaches it. Weights and
small tensors stay where they are; a tensor saved twice in one forward is copied once. The
price is the copies' time on the stream: each layer input crosses the bus twice a step.

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


def _on_accelerator(tensor: torch.Tensor) -> bool:
    return tensor.device.type not in ("cpu", "meta")


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
        # One host copy per tensor saved several times in one forward (the same storage, view
        # and version), with a weak reference to the tensor copied: a dead one's address may
        # belong to another tensor by now. Kept for the context's duration, one forward.
        self._copies: dict[tuple, tuple[weakref.ref, torch.Tensor]] = {}
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> HostOffload:
        self._copies = {}
        self.offloaded_bytes = 0
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._copies = {}  # the saved handles keep what backward needs
        super().__exit__(*exc)

    def _keeps(self, tensor: torch.Tensor) -> bool:
        return (
            not self.offloads(tensor)
            or isinstance(tensor, torch.nn.Parameter)
            or tensor.untyped_storage().nbytes() < self.min_bytes
            or tensor.untyped_storage().data_ptr() in self.weight_storages
        )

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor | tuple[torch.device, torch.Tensor]:
        if self._keeps(tensor):
            return tensor
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor._version,
        )
        source_ref, host = self._copies.get(key, (None, None))
        if source_ref is None or source_ref() is None:
            # A view's own elements only, laid out contiguously; the storage may be larger.
            source = tensor.contiguous()
            host = torch.empty(
                source.shape,
                dtype=source.dtype,
                device="cpu",
                pin_memory=source.is_cuda,
            )
            host.copy_(source, non_blocking=source.is_cuda)
            self._copies[key] = (weakref.ref(tensor), host)
            self.offloaded_bytes += host.nbytes
        return tensor.device, host

    @staticmethod
    def _unpack(packed: torch.Tensor | tuple[torch.device, torch.Tensor]) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        if device.type == "cpu":
            return host
        return host.to(device, non_blocking=host.is_pinned())
