"""What applying a one-byte dropout mask costs on this machine, by the ways torch can do it.

    python bench/mask_product.py                    # one [512, 1536] input, SmolLM2's down_proj
    python bench/mask_product.py --shape 2048 14336 # Mistral-7B's down_proj at 2048 tokens

A float tensor times a bool tensor goes through torch's per-element casting loop on CPU; the
same mask viewed as uint8 converts to the float dtype in one vectorized pass, after which the
product is float times float. `lorafit.model.lora_dropout` takes the second way. Then the whole
dropped input in the matmul's dtype (`lora_dropout.dropped_as`) in its two forms: four passes
(mask to float, two products, cast), which it takes on a CPU, and one from an fp32 input (the
product by scale and the byte mask, written in the matmul's dtype), which it takes on a GPU.
Prints the median milliseconds of each.
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch

from lorafit.model import lora_dropout


def median_ms(work, repeats: int) -> float:
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[512, 1536], metavar=("ROWS", "COLS"))
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    keep = torch.rand(args.shape, generator=generator) < 0.95
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, shape {args.shape}")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(args.shape, generator=generator).to(dtype)
        mask = keep.view(torch.uint8).to(dtype)
        ways = {
            "x * bool mask": lambda x=x: x * keep,
            "x * float mask": lambda x=x, mask=mask: x * mask,
            "bool mask .to(dtype)": lambda dtype=dtype: keep.to(dtype),
            "uint8 view .to(dtype)": lambda dtype=dtype: keep.view(torch.uint8).to(dtype),
        }
        print(f"\n{dtype}")
        for name, work in ways.items():
            print(f"  {name:24s} {median_ms(work, args.repeats):8.3f} ms")
    print("\nthe dropped input, input -> matmul dtype: CPU form, GPU form")
    scale, mask_bytes = (torch.ones(()) / (1 - 0.05)).item(), keep.view(torch.uint8)
    zero = torch.full((1,), -0.0)
    for source, target in [
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
    ]:
        x = torch.randn(args.shape, generator=generator).to(source)
        times = []
        for devices in (frozenset({"cpu"}), frozenset()):
            with mock.patch.object(lora_dropout, "CPU_FORM_DEVICES", devices):
                work = lambda x=x, target=target: lora_dropout.dropped_as(  # noqa: E731
                    x, mask_bytes, scale, target, zero
                )
                times.append(median_ms(work, args.repeats))
        print(f"  {str(source):15s} -> {str(target):15s} {times[0]:8.3f} ms {times[1]:8.3f} ms")


if __name__ == "__main__":
    main()
