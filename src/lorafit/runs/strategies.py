"""Lightning strategies of lorafit's own."""

from __future__ import annotations

from lightning.pytorch.strategies import SingleDeviceStrategy


class StayOnDevice(SingleDeviceStrategy):
    """One device, and the module stays on it when a Lightning call ends.

    Lightning's teardown moves the module to the CPU after every `fit`, `validate` or `test`
    (and the optimizer state with it). The eval tools validate first and then generate and
    export with the same model: on a GPU that move sent a 7B model's generation to the CPU.
    Everything else the teardown does (releasing the accelerator's cached memory, closing the
    checkpoint writer) still happens.
    """

    def teardown(self) -> None:
        module, self._lightning_module = self._lightning_module, None
        try:
            super().teardown()
        finally:
            self._lightning_module = module
