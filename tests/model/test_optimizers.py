"""lorafit's bitsandbytes optimizers: bitsandbytes' updates bit for bit, with one wait for the
device a step instead of one a tensor (src/lorafit/model/optimizers.py)."""

from __future__ import annotations

import warnings

import bitsandbytes.optim as bnb_optim
import pytest
import torch
from bitsandbytes.optim import optimizer as bnb_optimizer

from helpers import TINY, compose_config, logged
from lorafit.model import optimizers
from lorafit.training import train

PAIRS = [
    (bnb_optim.PagedAdamW32bit, optimizers.PagedAdamW32bit),
    (bnb_optim.PagedAdamW8bit, optimizers.PagedAdamW8bit),
    (bnb_optim.AdamW8bit, optimizers.AdamW8bit),
]
IDS = [stock.__name__ for stock, _ in PAIRS]


def _parameters(seed: int = 0) -> list[torch.nn.Parameter]:
    # Shapes of LoRA's A and B, and one over bitsandbytes' 4,096-value floor for 8-bit states.
    generator = torch.Generator().manual_seed(seed)
    shapes = [(8, 64), (64, 8), (8, 640), (640, 8), (3,)]
    return [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]


def _steps(cls, steps: int = 3) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Parameters and optimizer states after `steps` updates with seeded gradients."""
    params = _parameters()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "paged optimizers are not supported on CPU"
        optimizer = cls(params, lr=1e-2, weight_decay=0.01)
        generator = torch.Generator().manual_seed(1)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
    states = [v for p in params for v in optimizer.state[p].values() if torch.is_tensor(v)]
    return [p.detach().clone() for p in params], states


@pytest.mark.parametrize(("stock", "ours"), PAIRS, ids=IDS)
def test_the_updates_are_bitsandbytes_own_bit_for_bit(stock, ours):
    (stock_params, stock_states), (params, states) = _steps(stock), _steps(ours)
    assert len(states) == len(stock_states) > len(params)
    for actual, expected in zip(params + states, stock_params + stock_states, strict=True):
        assert actual.dtype == expected.dtype
        assert torch.equal(actual, expected)
    assert not torch.equal(params[0], _parameters()[0])  # the step did update


class _Waits:
    """Stands in for bitsandbytes' `sync_gpu` and counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, tensor: torch.Tensor) -> None:
        self.calls += 1


@pytest.mark.parametrize(("stock", "ours"), PAIRS, ids=IDS)
def test_a_step_waits_once_where_bitsandbytes_waits_once_a_tensor(stock, ours, monkeypatch):
    counts = {}
    for cls in (stock, ours):
        waits = _Waits()
        monkeypatch.setattr(bnb_optimizer, "sync_gpu", waits)
        _steps(cls, steps=2)
        counts[cls] = waits.calls
        assert bnb_optimizer.sync_gpu is waits  # put back after each step
    tensors, paged = len(_parameters()), stock.__name__.startswith("Paged")
    assert counts[stock] == 2 * (tensors + paged)
    assert counts[ours] == (2 if paged else 0)


def test_the_closure_runs_with_grad_and_bitsandbytes_waits_in_place(monkeypatch):
    waits = _Waits()
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", waits)
    params = _parameters()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = optimizers.PagedAdamW32bit(params, lr=1e-2)
    seen = {}

    def closure():
        seen["grad"] = torch.is_grad_enabled()
        seen["wait"] = bnb_optimizer.sync_gpu
        loss = sum((p**2).sum() for p in params)
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert seen == {"grad": True, "wait": waits}
    assert loss is not None and loss.requires_grad
    assert waits.calls == 1


class _Updates:
    """Counts the calls of bitsandbytes' 32-bit update kernel, and makes them."""

    def __init__(self, monkeypatch):
        import bitsandbytes.functional as bnb_functional

        self.calls, self.update = 0, bnb_functional.optimizer_update_32bit
        monkeypatch.setattr(bnb_functional, "optimizer_update_32bit", self)

    def __call__(self, *args, **kwargs) -> None:
        self.calls += 1
        self.update(*args, **kwargs)


def _paged(params, flat: bool = True, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "paged optimizers are not supported on CPU"
        if flat is None:
            return bnb_optim.PagedAdamW32bit(params, **kwargs)
        return optimizers.PagedAdamW32bit(params, flat=flat, **kwargs)


def _train(optimizer, params, steps: int, seed: int = 1, skip: int | None = None) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for i, p in enumerate(params):
            p.grad = None if i == skip else torch.randn(p.shape, generator=generator)
        optimizer.step()


def _state(optimizer, params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params] + [
        optimizer.state[p][k].clone() for p in params for k in ("state1", "state2")
    ]


def test_the_32_bit_step_is_one_kernel_call_a_group_with_bitsandbytes_numbers(monkeypatch):
    """Two groups (their own learning rates and decay), three steps: one update call a group
    a step, where bitsandbytes makes one a tensor; the same parameters, states and steps."""
    results, calls = {}, {}
    for flat in (None, False, True):
        params = _parameters()
        groups = [{"params": params[:3]}, {"params": params[3:], "lr": 3e-3, "weight_decay": 0.1}]
        optimizer = _paged(groups, flat, lr=1e-2, weight_decay=0.01)
        updates = _Updates(monkeypatch)
        _train(optimizer, params, steps=3)
        results[flat], calls[flat] = _state(optimizer, params), updates.calls
        assert {optimizer.state[p]["step"] for p in params} == {3}
    assert calls == {None: 3 * len(params), False: 3 * len(params), True: 3 * 2}
    for stock, flat_off, flat_on in zip(*results.values(), strict=True):
        assert torch.equal(flat_off, stock) and torch.equal(flat_on, stock)


def test_a_group_larger_than_a_run_is_updated_a_run_a_call(monkeypatch):
    """Runs of at most `RUN_VALUES` values, a parameter larger than that alone: with 1,100,
    the five parameters (512, 512, 5,120, 5,120 and 3 values) make four calls a step."""
    monkeypatch.setattr(optimizers, "RUN_VALUES", 1100)
    results = {}
    for flat in (None, True):
        params = _parameters()
        optimizer = _paged(params, flat, lr=1e-2, weight_decay=0.01)
        updates = _Updates(monkeypatch)
        _train(optimizer, params, steps=3)
        results[flat] = _state(optimizer, params)
    assert updates.calls == 3 * 4
    for ours, stock in zip(results[True], results[None], strict=True):
        assert torch.equal(ours, stock)


def test_a_parameter_without_gradient_takes_bitsandbytes_call_a_tensor(monkeypatch):
    """bitsandbytes skips it, so its step count parts from the others': the group is updated a
    tensor at a time then, and its numbers stay bitsandbytes'."""
    results = {}
    for flat in (None, True):
        params = _parameters()
        optimizer = _paged(params, flat, lr=1e-2)
        _train(optimizer, params, steps=2)
        updates = _Updates(monkeypatch)
        _train(optimizer, params, steps=1, seed=2, skip=1)
        _train(optimizer, params, steps=1, seed=3)  # steps 3 against 4: still a tensor a call
        results[flat] = _state(optimizer, params)
        assert updates.calls == 2 * len(params) - 1
    for ours, stock in zip(results[True], results[None], strict=True):
        assert torch.equal(ours, stock)


def test_a_state_saved_and_loaded_resumes_as_the_uninterrupted_run():
    """Saved after 2 steps with torch.save (the states are views of one buffer), loaded into a
    new optimizer, 2 steps more: the 4 steps' numbers bit for bit, from lorafit's state as from
    bitsandbytes' own (the same layout)."""
    import io

    uninterrupted = _parameters()
    optimizer = _paged(uninterrupted, lr=1e-2)
    _train(optimizer, uninterrupted, steps=2)
    _train(optimizer, uninterrupted, steps=2, seed=2)
    want = _state(optimizer, uninterrupted)
    for saved_by in (True, None):
        params = _parameters()
        first = _paged(params, saved_by, lr=1e-2)
        _train(first, params, steps=2)
        buffer = io.BytesIO()
        torch.save(first.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=False)
        layout = {k: sorted(v) for k, v in state["state"].items()}
        stock = _paged(_parameters(), None, lr=1e-2)
        _train(stock, list(stock.param_groups[0]["params"]), steps=1)
        assert layout == {k: sorted(v) for k, v in stock.state_dict()["state"].items()}
        resumed = _paged(params, lr=1e-2)
        resumed.load_state_dict(state)
        _train(resumed, params, steps=2, seed=2)
        assert_equal = [
            torch.equal(a, b) for a, b in zip(_state(resumed, params), want, strict=True)
        ]
        assert all(assert_equal), saved_by


def test_a_state_loaded_after_steps_is_copied_into_the_same_paged_buffers(monkeypatch):
    """Loading a state dict after flat steps links the states to the group's buffers again, the
    loaded values copied in, rather than to new paged buffers: bitsandbytes never frees paged
    memory. The numbers are those of a run that loaded nothing. The CPU stands in for paged
    memory with plain tensors."""
    import bitsandbytes.functional as bnb_functional

    monkeypatch.setattr(optimizers.PagedAdamW32bit, "_pages", lambda self, numel, like: True)
    monkeypatch.setattr(
        bnb_functional, "get_paged", lambda n, dtype, device: torch.zeros(n, dtype=dtype)
    )
    monkeypatch.setattr(bnb_functional, "fill", lambda tensor, value: tensor.fill_(value))
    results = {}
    for load in (False, True):
        params = _parameters()
        optimizer = _paged(params, lr=1e-2)
        # The page manager is bitsandbytes' one for the process: left as found.
        monkeypatch.setattr(optimizer.page_mng, "paged_tensors", [])
        _train(optimizer, params, steps=2)
        first = optimizer._buffers[0]
        if load:
            optimizer.load_state_dict(optimizer.state_dict())  # states are new tensors now
            assert optimizer.state[params[0]]["state1"].data_ptr() != first[0].data_ptr()
        _train(optimizer, params, steps=2, seed=2)
        assert all(a is b for a, b in zip(optimizer._buffers[0], first, strict=True))
        assert len(optimizer.page_mng.paged_tensors) == 2
        results[load] = _state(optimizer, params)
    for loaded, plain in zip(results[True], results[False], strict=True):
        assert torch.equal(loaded, plain)
    # A state saved before any step, loaded after steps: the buffers' old values are cleared,
    # as in an optimizer that starts from those weights.
    restarted = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = _paged(restarted, lr=1e-2)
    optimizer.load_state_dict(fresh.state_dict())
    for run, each in ((optimizer, params), (fresh, restarted)):
        _train(run, each, steps=2, seed=3)
    for ours, restart in zip(_state(optimizer, params), _state(fresh, restarted), strict=True):
        assert torch.equal(ours, restart)


def test_the_canonical_job_s_lora_weights_make_six_update_calls_a_step():
    """448 tensors of 84M values in runs of at most `RUN_VALUES`: the count docs/benchmarks.md
    and the README give (the GPU test counts the calls themselves)."""
    params = [torch.empty(shape, device="meta") for shape in _canonical_lora_shapes()]
    runs = optimizers._runs(params, optimizers.RUN_VALUES)
    assert len(params) == 448 and sum(p.numel() for p in params) == 83_886_080
    assert len(runs) == 6 and [p for run in runs for p in run] == params


def _canonical_lora_shapes() -> list[tuple[int, int]]:
    """The canonical job's trained tensors in the model's order: LoRA r=32 A and B of the 7
    projections of Mistral-7B's 32 layers."""
    sizes = [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096)]
    sizes += [(4096, 14336), (4096, 14336), (14336, 4096)]
    return [s for n_in, n_out in sizes for s in ((32, n_in), (n_out, 32))] * 32


def test_a_run_with_paged_adamw_logs_bitsandbytes_losses(tmp_path):
    run = [*TINY, "optimizer=paged_adamw_32bit", "optimizer.lr=1e-3", "trainer.max_steps=4"]
    cfg = compose_config(run, tmp_path / "ours")
    assert cfg.optimizer._target_ == "lorafit.model.optimizers.PagedAdamW32bit"
    train(cfg)
    stock = ["optimizer._target_=bitsandbytes.optim.PagedAdamW32bit", "~optimizer.flat"]
    train(compose_config([*run, *stock], tmp_path / "stock"))
    ours, theirs = (logged(tmp_path / name, "train/loss") for name in ("ours", "stock"))
    assert len(ours) == 4 and ours[0] != ours[-1]
    assert ours == theirs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_paged_adamw_waits_once_a_step_with_bitsandbytes_numbers(monkeypatch):
    # The canonical job's trained tensors (448, 84M fp32 values), paged 32-bit AdamW states.
    shapes = _canonical_lora_shapes()
    real = torch.cuda.synchronize
    waits = {"calls": 0}

    def counted(device=None):
        waits["calls"] += 1
        real(device)

    monkeypatch.setattr(torch.cuda, "synchronize", counted)
    results, calls, updates = {}, {}, {}
    counted_updates = _Updates(monkeypatch)
    for cls in (bnb_optim.PagedAdamW32bit, optimizers.PagedAdamW32bit):
        counted_updates.calls = 0
        generator = torch.Generator(device="cuda").manual_seed(0)
        params = [
            torch.nn.Parameter(torch.randn(s, device="cuda", generator=generator) * 0.01)
            for s in shapes
        ]
        optimizer = cls(params, lr=1e-4)
        waits["calls"] = 0
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda", generator=generator) * 1e-3
            optimizer.step()
        calls[cls], updates[cls] = waits["calls"], counted_updates.calls
        results[cls] = [p.detach() for p in params[:14]] + [params[-1].detach()]
    assert len(shapes) == 448
    assert calls[bnb_optim.PagedAdamW32bit] >= 3 * 448  # bitsandbytes: one wait a tensor
    assert calls[optimizers.PagedAdamW32bit] == 3
    # A kernel call a run of up to 2**24 values (6 for these 448 tensors) a step, where
    # bitsandbytes makes one a tensor.
    assert len(optimizers._runs(params, optimizers.RUN_VALUES)) == 6
    assert updates == {bnb_optim.PagedAdamW32bit: 3 * 448, optimizers.PagedAdamW32bit: 3 * 6}
    for ours, stock in zip(*results.values(), strict=True):
        assert torch.equal(ours, stock)
