"""`model.liger_kernels`: refused clearly where it cannot run, and on a GPU equal to the plain
model within bf16 rounding (`pytest -m gpu`)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from helpers import TINY, compose_config, configure_as_fit_does
from lorafit.config_checks import check_machine
from lorafit.errors import ConfigError
from lorafit.model.liger import check_liger
from lorafit.model.module import CausalLMModule

LIGER = importlib.util.find_spec("liger_kernel") is not None


def test_a_cpu_run_is_refused_before_anything_loads():
    cfg = compose_config([*TINY, "model.liger_kernels=true"])  # trainer=cpu
    with pytest.raises(ConfigError, match=r"model\.liger_kernels=true: .*CUDA GPUs.* on cpu"):
        check_machine(cfg)
    auto = compose_config([*TINY, "model.liger_kernels=true", "trainer.accelerator=auto"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"on cpu"):
            check_machine(auto)
    check_machine(compose_config(TINY))  # switched off: nothing asked


def test_a_gpu_run_without_the_package_is_told_how_to_get_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match=r"model\.liger_kernels=true needs .*pip install"):
        check_liger("cuda")


def test_the_module_checks_before_loading_weights(monkeypatch):
    """Where the trainer's device is only known when the model is configured
    (trainer.accelerator=auto)."""
    cfg = compose_config([*TINY, "model.liger_kernels=true"])
    module = CausalLMModule(model=cfg.model, adapter=cfg.adapter, optimizer={}, scheduler={})
    monkeypatch.setattr(
        CausalLMModule, "_load_base", staticmethod(lambda *a: pytest.fail("weights loaded"))
    )
    with pytest.raises(ConfigError, match=r"model\.liger_kernels=true: .* on cpu"):
        configure_as_fit_does(module, "cpu")


def test_the_eval_tools_run_a_liger_run_on_any_device():
    """eval, generate and export build the module with no trainer fitting it: the plain model,
    so a run trained with Liger on a GPU is evaluated on a CPU too."""
    cfg = compose_config([*TINY, "model.liger_kernels=true"])
    module = CausalLMModule(model=cfg.model, adapter=cfg.adapter, optimizer={}, scheduler={})
    module.configure_model()
    norm = module.model.get_base_model().model.layers[0].input_layernorm
    assert "forward" not in vars(norm)  # the class's own forward, not Liger's


def _loss_and_grads(liger: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A tiny Mistral with LoRA (non-zero B) in bf16 on CUDA, one packed row of two examples
    under bf16 autocast, checkpointing on as in the canonical job."""
    cfg = compose_config(
        [
            *TINY,
            f"model.liger_kernels={str(liger).lower()}",
            "model.dtype=bfloat16",
            "model.gradient_checkpointing=true",
            "adapter.dropout=0",
        ]
    )
    torch.manual_seed(0)
    module = CausalLMModule(model=cfg.model, adapter=cfg.adapter, optimizer={}, scheduler={})
    configure_as_fit_does(module, "cuda")
    for name, p in module.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    module.cuda()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (1, 96), generator=generator).cuda()
    positions = torch.cat([torch.arange(40), torch.arange(56)])[None].cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = module(ids, position_ids=positions).float().logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad.float() for n, p in module.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not LIGER, reason="needs CUDA and Liger")
def test_liger_kernels_train_what_the_plain_model_trains(monkeypatch):
    from transformers.models.mistral import modeling_mistral

    # Liger replaces the family's rotary embedding (and classes) module-wide: put them back
    # after this test.
    for name in ("apply_rotary_pos_emb", "MistralRMSNorm", "MistralMLP"):
        monkeypatch.setattr(modeling_mistral, name, getattr(modeling_mistral, name))
    plain_loss, plain_grads = _loss_and_grads(liger=False)
    loss, grads = _loss_and_grads(liger=True)
    assert modeling_mistral.apply_rotary_pos_emb.__module__.startswith("liger_kernel")
    torch.testing.assert_close(loss, plain_loss, rtol=1e-2, atol=1e-2)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        # bf16 kernels round differently: compare each gradient to its own scale.
        scale = plain_grads[name].abs().max()
        torch.testing.assert_close(grad / scale, plain_grads[name] / scale, rtol=0, atol=3e-2)
