"""4-bit weights dequantized by bitsandbytes against `model.dequantize=compiled`: one weight of
each of Mistral-7B's four projection shapes (NF4, double-quantized, from bf16), timed apart from
any model, and projected to the dequantizations of one training step.

    python bench/dequantize.py                      # on the CPU
    python bench/dequantize.py --device cuda        # on a GPU, timed by CUDA events
    python bench/dequantize.py --device cuda --out dequantize.json

A step of the canonical job (gradient checkpointing, 32 layers) dequantizes each of a layer's
seven weights three times: in forward, in the recomputation, and for the input's gradient
(q, k and v of the first layer excepted, whose input needs none). bitsandbytes makes the
double-quantized scales, adds their offset and expands the 4-bit values in three kernels; the
compiled code in one (lorafit/model/dequantize.py). Both outputs are checked equal bit for bit
before anything is timed. The figures are the kernels' own: no product, no host wait between.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from lorafit.model.dequantize import dequantized  # noqa: E402

# Mistral-7B's projections (out, in) and how many of each a decoder layer has.
SHAPES = {
    "q_proj, o_proj": ((4096, 4096), 2),
    "k_proj, v_proj": ((1024, 4096), 2),
    "gate_proj, up_proj": ((14336, 4096), 2),
    "down_proj": ((4096, 14336), 1),
}
LAYERS = 32
PASSES = 3  # forward, recomputation, the input's gradient


def _layer(shape: tuple[int, int], device: str) -> torch.nn.Module:
    out_features, in_features = shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
    params = bnb.nn.Params4bit(
        weight.to(torch.bfloat16), requires_grad=False, quant_type="nf4", compress_statistics=True
    )
    layer.weight = params._quantize(device)
    return layer


def _seconds(call, device: str, repeats: int) -> float:
    """Mean seconds a call, after three warm-up calls (compiling, caches)."""
    for _ in range(3):
        call()
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(repeats):
            call()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / repeats
    began = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - began) / repeats


def measure(device: str, repeats: int, divide: int = 1) -> list[dict]:
    rows = []
    for name, ((out_features, in_features), per_layer) in SHAPES.items():
        layer = _layer((out_features // divide, in_features // divide), device)
        state = layer.weight.quant_state
        theirs = functools.partial(bnb_functional.dequantize_4bit, layer.weight.data, state)
        ours = functools.partial(dequantized, layer, torch.bfloat16)
        if not torch.equal(theirs(), ours()):
            raise SystemExit(f"{name}: the compiled dequantization differs from bitsandbytes'")
        values = state.shape[0] * state.shape[1]
        # Bytes a dequantization must move at least: the packed values, the 8-bit scales, the
        # bf16 output (the second-level scales are a few KB).
        moved = values // 2 + values // state.blocksize + 2 * values
        row = {"weight": name, "shape": list(state.shape), "per_layer": per_layer}
        for key, call in (("bitsandbytes", theirs), ("compiled", ours)):
            seconds = _seconds(call, device, repeats)
            row[f"{key}_ms"] = seconds * 1000
            row[f"{key}_gb_per_s"] = moved / seconds / 1e9
        rows.append(row)
    return rows


def per_step_ms(rows: list[dict], key: str) -> float:
    """The canonical step's dequantizations: each weight 3 times, less the first layer's q, k
    and v input gradients."""
    calls = {row["weight"]: LAYERS * PASSES * row["per_layer"] for row in rows}
    calls["q_proj, o_proj"] -= 1
    calls["k_proj, v_proj"] -= 2
    return sum(calls[row["weight"]] * row[f"{key}_ms"] for row in rows)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--divide", type=int, default=1, help="shrink each width by this")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = measure(args.device, args.repeats, args.divide)
    if args.device == "cuda":
        card = torch.cuda.get_device_name()
    else:
        card = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"{card}; torch {torch.__version__}, bitsandbytes {bnb.__version__}")
    print("| weight | shape | bitsandbytes ms (GB/s) | compiled ms (GB/s) | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['weight']} | {row['shape'][0]} x {row['shape'][1]} "
            f"| {row['bitsandbytes_ms']:.3f} ({row['bitsandbytes_gb_per_s']:.0f}) "
            f"| {row['compiled_ms']:.3f} ({row['compiled_gb_per_s']:.0f}) "
            f"| {row['bitsandbytes_ms'] / row['compiled_ms']:.2f}x |"
        )
    theirs, ours = per_step_ms(rows, "bitsandbytes"), per_step_ms(rows, "compiled")
    print(f"a step's dequantizations: {theirs:.1f} ms bitsandbytes, {ours:.1f} ms compiled")
    if args.out:
        args.out.write_text(json.dumps({"card": card, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
