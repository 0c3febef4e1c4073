"""What tests share: the real Hydra config shrunk by overrides, a run's logged metrics, and
tiny packed models and rows."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch.utils._python_dispatch import TorchDispatchMode

from lorafit.runs.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"
SHARED_DATA = ROOT.parent / "shared" / "data"

# The base of every training test: tiny random Mistral, fp32 on CPU, a few steps, no clutter.
TINY = [
    "experiment=tiny",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",  # with callbacks.progress_bar left configured
]


def compose_config(overrides: list[str], output_dir: Path | str = "unused") -> DictConfig:
    """The config exactly as `python train.py <overrides>` would compose it, or as eval.py,
    generate.py and export.py would (conf/eval.yaml) when the overrides name a `ckpt`."""
    name = "eval" if any(o.startswith("ckpt=") for o in overrides) else "train"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=[*overrides, f"output_dir={output_dir}"])


def logged(output_dir: Path, key: str) -> list[float]:
    """Every value of one metric in the run's metrics.csv, in logging order."""
    return [value for _, value in read_metrics(output_dir / "csv" / "metrics.csv").get(key, [])]


def packed_test_module(
    attn: str = "sdpa", checkpointing: bool = False, overrides: tuple[str, ...] = ()
):
    """A tiny LoRA module with non-zero adapter weights, so the adapter takes part in what is
    compared, and no dropout."""
    from lorafit.model.module import CausalLMModule

    cfg = compose_config(
        [
            *TINY,
            f"model.attn_implementation={attn}",
            "adapter.dropout=0",
            f"model.gradient_checkpointing={str(checkpointing).lower()}",
            *overrides,
        ]
    )
    torch.manual_seed(0)
    module = CausalLMModule(model=cfg.model, adapter=cfg.adapter, optimizer={}, scheduler={})
    module.configure_model()
    for name, p in module.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return module


def tiny_qlora_grads(unfused: tuple[type, int] | None = None) -> list[torch.Tensor]:
    """The loss and LoRA gradients of one batch through the tiny QLoRA model as the canonical
    job runs it (peft's fp32 stream, dropout, checkpointed layers, bf16 autocast). With
    `unfused` (a transformers class, how many modules of it the model has), those modules,
    switched by lorafit to a subclass, are first put back to the class itself."""
    module = packed_test_module(
        checkpointing=True, overrides=("adapter=qlora", "adapter.dropout=0.3")
    ).train()
    if unfused is not None:
        cls, count = unfused
        found = [m for m in module.model.modules() if type(m).__name__ == cls.__name__]
        assert len(found) == count and all(type(m) is not cls for m in found)  # fused
        for m in found:
            m.__class__ = cls
    ids = torch.randint(3, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "position_ids": torch.arange(32)[None], "labels": ids}
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = module._loss_sum(batch)
    loss.backward()  # reentrant checkpointing: torch.autograd.grad cannot reach the layers
    return [loss.detach(), *[p.grad for p in module.parameters() if p.requires_grad]]


def configure_as_fit_does(module, device: str = "cpu") -> None:
    """`module.configure_model()` as `trainer.fit` calls it: the training-only options
    (`model.liger_kernels`, `model.compile`) apply. The stand-in holds what the hook reads of
    its trainer: the device it trains on and that it is fitting."""
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    module._trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device(device)),
        state=SimpleNamespace(fn=TrainerFn.FITTING),
    )
    try:
        module.configure_model()
    finally:
        module._trainer = None


def packed_demo(examples, capacity: int = 256):
    """The examples packed into rows of `capacity`, and a collate for one row at a time."""
    from lorafit.data.examples import PackedExamples
    from lorafit.data.packing import pack_rows, packed_collate

    packed = PackedExamples(examples, pack_rows(examples.lengths().tolist(), capacity))
    return packed, lambda items: packed_collate(items, pad_token_id=0)


class CountOps(TorchDispatchMode):
    """Counts the aten operators dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


class MovedBytes(TorchDispatchMode):
    """Adds up the bytes the operators dispatched while it is active read and write outside
    matrix products, as `bench/step_ops.py --traffic` counts them: the memory traffic a GPU's
    elementwise passes make for them."""

    def __init__(self):
        super().__init__()
        import sys

        sys.path.insert(0, str(ROOT / "bench"))
        import step_ops

        self.step_ops = step_ops
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if self.step_ops.launches(func) and not self.step_ops.is_product(name):
            reads, writes = self.step_ops.moved(name, args, kwargs, out)
            self.n += sum(t.numel() * t.element_size() for t in reads + writes)
        return out


def four_bit_linear(
    n_in: int,
    n_out: int,
    device: str = "cpu",
    bias: bool = False,
    dtype: torch.dtype = torch.float32,
    nested: bool = True,
    quant_type: str = "nf4",
):
    """A bitsandbytes 4-bit layer (bf16 compute) with random weights in `dtype`, quantized on
    `device`, its scales quantized too where `nested` (bitsandbytes' default)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(n_in, n_out, bias=bias, compute_dtype=torch.bfloat16)
    weight = (torch.randn(n_out, n_in) / n_in**0.5).to(dtype)
    params = bnb.nn.Params4bit(
        weight, requires_grad=False, quant_type=quant_type, compress_statistics=nested
    )
    layer.weight = params._quantize(device)
    return layer


def assert_bitwise_equal(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    """Each tensor equal to its counterpart to the last bit, dtype included (losses and
    gradients of a rewritten path against the path it replaces)."""
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert got.dtype == want.dtype
        assert torch.equal(got, want)
