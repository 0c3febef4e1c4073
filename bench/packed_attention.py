"""The attention of one packed row, forward and backward, by each path lorafit can take.

    python bench/packed_attention.py               # CUDA: Mistral-7B's heads, rows of 2048, 8192
    python bench/packed_attention.py --tokens 512  # any row lengths (CPU: fp32, no varlen)
    python bench/packed_attention.py --tokens 512 --heads 9 3 64 --dtype bfloat16   # SmolLM2's

Paths: `sdpa` with the dense block-diagonal mask transformers builds for packed rows;
`sdpa_packed` one fused causal call per example; `packed_sdpa_attention` as the model calls it
(on CUDA in bf16, torch's varlen flash kernel; on a CPU without AMX, bf16 attended in fp32);
and, as a floor that does not isolate examples, one causal call over the whole row. Examples
are 100-400 tokens, like alpaca's. Prints the median milliseconds of a forward + backward and
each path's largest difference from the per-example path.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F

from lorafit.model import packed_attention


def row_positions(tokens: int, seed: int) -> tuple[torch.Tensor, int]:
    rng, lengths = random.Random(seed), []
    while sum(lengths) < tokens:
        lengths.append(min(rng.randint(100, 400), tokens - sum(lengths)))
    return torch.cat([torch.arange(n) for n in lengths])[None], len(lengths)


def block_mask(position_ids: torch.Tensor) -> torch.Tensor:
    example = torch.cumsum((position_ids[0] == 0).long(), 0)
    i = torch.arange(position_ids.shape[1], device=position_ids.device)
    return ((example[:, None] == example[None, :]) & (i[None, :] <= i[:, None]))[None, None]


def dense_mask(q, k, v, position_ids, scale):
    mask = block_mask(position_ids)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def per_example(q, k, v, position_ids, scale):
    parts = [
        F.scaled_dot_product_attention(
            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, scale=scale, enable_gqa=True
        )
        for a, b in packed_attention.spans_of(position_ids).rows[0]
    ]
    return torch.cat(parts, dim=2).transpose(1, 2)


def as_the_model_calls_it(q, k, v, position_ids, scale):
    return packed_attention.packed_sdpa_attention(
        None, q, k, v, None, scaling=scale, position_ids=position_ids
    )[0]


def whole_row(q, k, v, position_ids, scale):
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


PATHS = {
    "sdpa, dense block mask": dense_mask,
    "sdpa_packed, one call per example": per_example,
    "packed_sdpa_attention (the model's)": as_the_model_calls_it,
    "whole row causal (no isolation)": whole_row,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--heads",
        type=int,
        nargs=3,
        metavar=("QUERY", "KEY_VALUE", "DIM"),
        help="attention heads and head size (CUDA: 32 8 128, Mistral-7B's; CPU: 8 2 64)",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="CUDA bf16, CPU fp32")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    heads, kv_heads, dim = args.heads or ((32, 8, 128) if cuda else (8, 2, 64))
    kernel = packed_attention._varlen()
    card = torch.cuda.get_device_name() if cuda else "cpu"
    keywords = sorted(kernel[1]) if kernel else None
    print(f"device {card}, torch {torch.__version__}, {dtype}, varlen_attn keywords: {keywords}")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for tokens in args.tokens or ([2048, 8192] if cuda else [512]):
        position_ids, count = row_positions(tokens, seed=tokens)
        position_ids = position_ids.to(device)
        g = torch.Generator(device).manual_seed(0)
        q = torch.randn(1, heads, tokens, dim, device=device, dtype=dtype, generator=g)
        k = torch.randn(1, kv_heads, tokens, dim, device=device, dtype=dtype, generator=g)
        v = torch.randn(1, kv_heads, tokens, dim, device=device, dtype=dtype, generator=g)
        scale = dim**-0.5
        reference = per_example(q, k, v, position_ids, scale).float()
        print(
            f"\nrow of {tokens} tokens, {count} examples; {heads} heads / {kv_heads} kv, dim {dim}"
        )
        for name, path in PATHS.items():
            diff = (path(q, k, v, position_ids, scale).float() - reference).abs().max().item()
            times = []
            for repeat in range(args.repeats + 3):
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                sync()
                start = time.perf_counter()
                path(*leaves, position_ids, scale).float().sum().backward()
                sync()
                if repeat >= 3:
                    times.append(time.perf_counter() - start)
            times.sort()
            print(f"  {name:36s} {1e3 * times[len(times) // 2]:8.2f} ms  max diff {diff:.3g}")


if __name__ == "__main__":
    main()
