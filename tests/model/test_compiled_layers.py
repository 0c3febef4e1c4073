"""`model.compile`: the compiled MLPs and norms train what the eager ones train, dropout
masks included, under bf16 autocast as on a GPU."""

from __future__ import annotations

import torch

from helpers import TINY, compose_config, configure_as_fit_does, logged
from lorafit.model.module import CausalLMModule
from lorafit.training import build_run


def _fit(overrides: list[str], out):
    run = build_run(compose_config([*TINY, "trainer.max_steps=3", *overrides], out))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    return run.module


def _gradients(compile: bool) -> dict[str, torch.Tensor]:
    """LoRA gradients of one fp32 forward + backward with dropout 0.5 and non-zero lora_B,
    from the same seed: they depend on every dropout mask drawn."""
    cfg = compose_config([*TINY, f"model.compile={str(compile).lower()}", "adapter.dropout=0.5"])
    torch.manual_seed(0)
    module = CausalLMModule(model=cfg.model, adapter=cfg.adapter, optimizer={}, scheduler={})
    configure_as_fit_does(module)
    for name, p in module.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(3, 1000, (1, 64), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(24), torch.arange(40)])[None]
    torch.manual_seed(2)
    module(ids, position_ids=positions).logsumexp(-1).mean().backward()
    return {n: p.grad for n, p in module.named_parameters() if p.requires_grad}


def test_compiled_layers_draw_the_eager_dropout_masks():
    eager, compiled = _gradients(compile=False), _gradients(compile=True)
    # Other masks would change half the dropped inputs: gradients off by their own size.
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


def test_the_eval_tools_run_the_model_uncompiled():
    """eval, generate and export build the module with no trainer fitting it."""
    cfg = compose_config([*TINY, "model.compile=true"])
    module = CausalLMModule(model=cfg.model, adapter=cfg.adapter, optimizer={}, scheduler={})
    module.configure_model()
    assert module.model.get_base_model().model.layers[0].mlp._compiled_call_impl is None


def test_compiled_layers_train_what_eager_layers_train(tmp_path):
    # bf16 autocast and LoRA dropout on (the canonical job's 0.05): inductor's fused kernels
    # must keep torch's random stream, or the masks, and so the losses, would differ.
    common = ["trainer=cpu_bf16", "adapter.dropout=0.05"]
    eager = _fit(common, tmp_path / "eager")
    compiled = _fit([*common, "model.compile=true"], tmp_path / "compiled")
    layers = compiled.model.get_base_model().model.layers
    assert all(layer.mlp._compiled_call_impl is not None for layer in layers)
    assert all(layer.self_attn._compiled_call_impl is None for layer in layers)
    assert eager.model.get_base_model().model.layers[0].mlp._compiled_call_impl is None
    for key in ("train/loss", "val/loss"):
        expected = torch.tensor(logged(tmp_path / "eager", key))
        # Fused kernels may sum in another order: agreement to rounding, not bit for bit.
        torch.testing.assert_close(
            torch.tensor(logged(tmp_path / "compiled", key)), expected, rtol=1e-4, atol=0
        )
