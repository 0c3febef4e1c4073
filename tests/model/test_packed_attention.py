"""`sdpa_packed` against a plain reference: each packed example attended alone, causally,
within the model's sliding window; the example spans found once per forward; and the varlen
(flash) path's plumbing on CPU through a stand-in kernel with varlen_attn's contract."""

from __future__ import annotations

import pytest
import torch

from helpers import packed_test_module
from lorafit.data.examples import PackedExamples
from lorafit.data.packing import pack_rows, packed_collate
from lorafit.model import packed_attention
from lorafit.model.packed_attention import packed_sdpa_attention, spans_of

LENGTHS = [5, 9, 3, 7]  # one row of four examples, 24 tokens


def _inputs(heads=4, kv_heads=2, dim=8, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = sum(LENGTHS)
    q = torch.randn(batch, heads, tokens, dim, generator=g)
    k = torch.randn(batch, kv_heads, tokens, dim, generator=g)
    v = torch.randn(batch, kv_heads, tokens, dim, generator=g)
    row = torch.cat([torch.arange(n) for n in LENGTHS])
    position_ids = torch.stack([row, torch.arange(tokens)])[:batch]  # row 2: one example
    return q, k, v, position_ids


def _reference(q, k, v, position_ids, window=None, scale=None):
    """Eager attention with an explicit mask: same example, causal, within the window."""
    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    for b in range(q.shape[0]):
        example = torch.cumsum((position_ids[b] == 0).long(), 0)
        i = torch.arange(q.shape[2], device=q.device)
        seen = (example[:, None] == example[None, :]) & (i[None, :] <= i[:, None])
        if window is not None:
            seen &= i[None, :] > i[:, None] - window
        kb, vb = (t[b].repeat_interleave(groups, dim=0) for t in (k, v))
        scores = q[b] @ kb.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
        out[b] = scores.masked_fill(~seen, float("-inf")).softmax(-1) @ vb
    return out.transpose(1, 2)


@pytest.mark.parametrize("window", [None, 4, 100])
def test_each_example_is_attended_alone_within_the_window(window):
    q, k, v, position_ids = _inputs()
    out, _ = packed_sdpa_attention(
        None, q, k, v, None, position_ids=position_ids, sliding_window=window
    )
    expected = _reference(q, k, v, position_ids, window=window)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_spans_are_found_once_per_forward(demo_examples, monkeypatch):
    """Every layer, and the recomputation of checkpointed layers, gets the same spans."""
    calls = []
    real = packed_attention.segments
    monkeypatch.setattr(packed_attention, "segments", lambda p: calls.append(1) or real(p))
    module = packed_test_module("sdpa_packed", checkpointing=True).train()
    packed = PackedExamples(demo_examples, pack_rows(demo_examples.lengths().tolist(), 256))
    batch = packed_collate([packed[0]], pad_token_id=0, pad_to=256)
    logits = module(batch["input_ids"], position_ids=batch["position_ids"])
    logits.float().sum().backward()
    assert len(calls) == 1
    assert module.model.config.num_hidden_layers > 1


def test_spans_of_a_new_tensor_are_its_own():
    first = torch.tensor([[0, 1, 2, 0, 1]])
    assert spans_of(first).rows == [[(0, 3), (3, 5)]]
    second = torch.tensor([[0, 1, 0, 1, 2]])
    spans = spans_of(second)
    assert spans.rows == [[(0, 2), (2, 5)]]
    assert spans.cu_seqlens.tolist() == [0, 2, 5] and spans.longest == 3
    assert spans.cu_seqlens.dtype == torch.int32


def _stand_in_varlen(new_api: bool):
    """varlen_attn's contract (flattened [tokens, heads, dim], cumulative lengths, causal or a
    left window) carried out by plain attention, so the call's plumbing is checked on CPU."""

    def attend(q, k, v, cu_q, cu_k, max_q, max_k, **options):
        assert torch.equal(cu_q, cu_k) and q.dtype == k.dtype == v.dtype == torch.bfloat16
        q, k, v = (t.float() for t in (q, k, v))
        assert max_q == max(int(b - a) for a, b in zip(cu_q[:-1], cu_q[1:], strict=True))
        if new_api:
            left, right = options["window_size"]
            assert right == 0
        else:
            assert options == {"is_causal": True}
            left = -1
        if k.shape[1] != q.shape[1]:
            assert options.get("enable_gqa"), "grouped heads without enable_gqa"
            groups = q.shape[1] // k.shape[1]
            k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
        scale = options.get("scale", q.shape[-1] ** -0.5)
        out = torch.empty_like(q)
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
            i = torch.arange(b - a)
            seen = i[None, :] <= i[:, None]
            if left >= 0:
                seen &= i[None, :] >= i[:, None] - left
            scores = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * scale
            probs = scores.masked_fill(~seen, float("-inf")).softmax(-1)
            out[a:b] = torch.einsum("hqk,khd->qhd", probs, v[a:b])
        return out.to(torch.bfloat16)

    keywords = {"window_size", "enable_gqa", "scale"} if new_api else {"is_causal"}
    return attend, frozenset(keywords)


@pytest.mark.parametrize("new_api", [True, False])
@pytest.mark.parametrize("window", [None, 4])
def test_the_varlen_call_attends_each_example_alone(new_api, window, monkeypatch):
    if window is not None and not new_api:  # such a torch's kernel is not used for windows
        monkeypatch.setattr(packed_attention, "_varlen", lambda: _stand_in_varlen(False))
        assert not packed_attention._varlen_fits(torch.bfloat16, window - 1)
        assert packed_attention._varlen_fits(torch.bfloat16, None)
        return
    q, k, v, position_ids = _inputs()
    kernel = _stand_in_varlen(new_api)
    spans = spans_of(position_ids)
    monkeypatch.setattr(packed_attention, "_varlen", lambda: kernel)
    out = packed_attention._varlen_attention(
        q, k, v, spans, 0.3, None if window is None else window - 1, torch.bfloat16
    )
    assert out.dtype == torch.bfloat16
    expected = _reference(*(t.bfloat16().float() for t in (q, k, v)), position_ids, window, 0.3)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_autocast_sends_fp32_activations_to_the_half_kernel():
    """Under bf16-mixed the activations are fp32 and autocast would run attention in bf16: the
    varlen kernel (a custom op autocast leaves alone) must get bf16 too, not be passed over."""
    q = torch.randn(1, 2, 4, 8)
    assert packed_attention.half_dtype(q) is None
    assert packed_attention.half_dtype(q.bfloat16()) is torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert packed_attention.half_dtype(q) is torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert packed_attention.half_dtype(q) is None


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("in_fp32", [True, False])
def test_half_attention_on_a_cpu_without_amx_runs_in_fp32(in_fp32, autocast, monkeypatch):
    """Where the CPU has no AMX, bf16 attention is computed in fp32 and rounded once (the
    fp32 kernel is the faster one there); elsewhere it stays bf16. Either way the output and
    the gradients come back in bf16, each example alone."""
    monkeypatch.setattr(packed_attention, "cpu_attends_half_in_fp32", lambda: in_fp32)
    q, k, v, position_ids = _inputs(heads=4, kv_heads=2, dim=16)
    q, k, v = (t.bfloat16().requires_grad_() for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, _ = packed_sdpa_attention(None, q, k, v, None, position_ids=position_ids)
    out.float().square().sum().backward()
    assert out.dtype == q.grad.dtype == k.grad.dtype == torch.bfloat16
    fp32 = _reference(*(t.detach().float() for t in (q, k, v)), position_ids)
    if in_fp32:  # the fp32 result, rounded to bf16 once
        torch.testing.assert_close(out, fp32.bfloat16(), rtol=0, atol=0)
    else:  # bf16's own kernel rounds along the way
        assert not torch.equal(out, fp32.bfloat16())
        torch.testing.assert_close(out.float(), fp32, rtol=2e-2, atol=2e-2)


def test_this_cpu_s_half_attention_choice_follows_amx():
    amx = torch.cpu._is_amx_tile_supported()
    assert packed_attention.cpu_attends_half_in_fp32() is not amx


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", [None, 4])
def test_the_flash_varlen_path_equals_the_reference_on_cuda(window):
    q, k, v, position_ids = (t.cuda() for t in _inputs(heads=8, kv_heads=2, dim=64))
    q, k, v = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
    out, _ = packed_sdpa_attention(
        None, q, k, v, None, position_ids=position_ids, sliding_window=window
    )
    assert packed_attention._varlen() is not None, "this torch has no varlen_attn"
    expected = _reference(q.float(), k.float(), v.float(), position_ids, window=window)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_dropout_keeps_examples_apart():
    """With attention dropout the per-example path still runs; no mask-free shortcut leaks."""
    q, k, v, position_ids = _inputs(batch=1)
    torch.manual_seed(0)
    out, _ = packed_sdpa_attention(None, q, k, v, None, dropout=0.5, position_ids=position_ids)
    # Change the second example's values: the first example's outputs cannot move.
    v2 = v.clone()
    v2[:, :, LENGTHS[0] :] += 10
    torch.manual_seed(0)
    out2, _ = packed_sdpa_attention(None, q, k, v2, None, dropout=0.5, position_ids=position_ids)
    torch.testing.assert_close(out[:, : LENGTHS[0]], out2[:, : LENGTHS[0]])
    assert not torch.allclose(out[:, LENGTHS[0] :], out2[:, LENGTHS[0] :])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp32_activations_under_bf16_autocast_take_the_varlen_kernel(monkeypatch):
    """The canonical job's condition (bf16-mixed: fp32 activations, bf16 autocast)."""
    calls = []
    real = packed_attention._varlen_attention
    monkeypatch.setattr(
        packed_attention, "_varlen_attention", lambda *a: calls.append(1) or real(*a)
    )
    q, k, v, position_ids = (t.cuda() for t in _inputs(heads=8, kv_heads=2, dim=64))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, _ = packed_sdpa_attention(None, q, k, v, None, position_ids=position_ids)
    assert calls and out.dtype == torch.bfloat16
    expected = _reference(q, k, v, position_ids)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_one_row_of_position_ids_serves_the_whole_batch_once(monkeypatch):
    """A model that makes its own position ids passes one row for the whole batch: the spans
    are still found once per forward, not once per layer."""
    calls = []
    real = packed_attention.segments
    monkeypatch.setattr(packed_attention, "segments", lambda p: calls.append(1) or real(p))
    q, k, v, _ = _inputs()
    position_ids = torch.arange(q.shape[2])[None]
    for _layer in range(3):
        out, _ = packed_sdpa_attention(None, q, k, v, None, position_ids=position_ids)
    assert len(calls) == 1 and len(spans_of(position_ids, batch=2).rows) == 2
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
