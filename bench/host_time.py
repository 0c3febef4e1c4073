"""A QLoRA step's host time at the canonical job's depth, on the CPU with its widths shrunk.

    python bench/host_time.py                                # default, compile, compile-layers
    python bench/host_time.py --levers compile,compile-layers --steps 10

At 2048 tokens a GPU waits on the host for much of a QLoRA step (docs/benchmarks.md): the host
dispatches every operator and enters every compiled graph, whatever the widths. What it does
a step depends on the model's depth and structure and on lorafit's options, so it is measured
here on `experiment=mistral7b_random_qlora` with its 32 layers and its options (4-bit, LoRA
r=32 on every projection, dropout, bf16 autocast, checkpointing, bitsandbytes' paged AdamW;
figures recorded before the 32-bit step became one call a group ran torch's AdamW), but hidden
64, an MLP of 128, 2 attention heads and 128-token rows, where the CPU's kernels take little
time: a step's wall-clock is then mostly the host's work. A proxy, not a GPU figure: a CPU
kernel on these widths still takes some microseconds and a CUDA launch costs the host more
than a CPU call, and the CPU attends each packed example apart where CUDA makes one varlen call
a row. Compare the variants with each other, on one machine.

Each variant (`--levers`: bench/peers.py's LEVERS, `default` for none) runs in a process of its
own, one thread, 3 warm-up steps (which compile) and the timed ones after; each step's time is
split where Lightning's hooks mark it (forward, backward with the recomputation, the rest: the
optimizer, logging and the next batch). Medians of the timed steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from peer_worker import RecompileLimits  # noqa: E402
from peers import ALPACA, LEVERS, data_overrides  # noqa: E402

NARROW = [
    "model.source.hidden_size=64",
    "model.source.intermediate_size=128",
    "model.source.num_attention_heads=2",
    "model.source.num_key_value_heads=1",
]
# The canonical job's optimizer (fit_preset's is torch's AdamW, for its state's memory): its
# host work a step is bitsandbytes', which a CPU runs unpaged.
OPTIMIZER = "optimizer=paged_adamw_32bit"
WARMUP = 3
PHASES = ("forward", "backward", "rest")


def measure(lever: str, steps: int, data: list[str], layers: int = 32) -> dict:
    """Train the shrunk canonical job in this process; each step's phases in seconds."""
    import torch
    from lightning.pytorch.callbacks import Callback
    from peak_memory import fit_preset

    class Phases(Callback):
        def __init__(self) -> None:
            self.steps: list[dict[str, float]] = []

        def on_train_batch_start(self, *args) -> None:
            self.start = self.mark = time.perf_counter()

        def on_before_backward(self, *args) -> None:
            self.forward = time.perf_counter() - self.mark
            self.mark = time.perf_counter()

        def on_after_backward(self, *args) -> None:
            self.backward = time.perf_counter() - self.mark

        def on_train_batch_end(self, *args) -> None:
            now = time.perf_counter()
            if self.steps:  # the previous step's rest runs until this step starts
                self.steps[-1]["rest"] += self.start - self.end
            step = {"forward": self.forward, "backward": self.backward}
            step["rest"] = now - self.start - self.forward - self.backward
            self.steps.append(step)
            self.end = now

    torch.set_num_threads(1)  # one host thread dispatches, as on a GPU
    phases = Phases()
    limits = RecompileLimits()
    logging.getLogger(RecompileLimits.LOGGER).addHandler(limits)
    extra = [*NARROW, OPTIMIZER, *LEVERS.get(lever, []), f"trainer.max_steps={WARMUP + steps}"]
    fit_preset(layers, 128, data, extra, phases, gpu_memory=False)
    timed = phases.steps[WARMUP:-1]  # the last step's rest is the run's end
    result = {key: statistics.median(s[key] for s in timed) for key in PHASES}
    return result | {"recompile_limit_hit": limits.functions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levers", default="default,compile,compile-layers")
    parser.add_argument("--steps", type=int, default=8, help="timed steps after 3 warm-up")
    parser.add_argument("--data", type=Path, default=ALPACA, help="alpaca rows (json)")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (the preset's 32)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    data, rows = data_overrides(args)
    if args.worker:
        print(json.dumps(measure(args.worker, args.steps, data, args.layers)))
        return
    levers = args.levers.split(",")
    unknown = sorted(set(levers) - {"default", *LEVERS})
    if unknown:
        sys.exit(f"unknown lever {unknown}; known: default, {', '.join(LEVERS)}")
    print(
        f"rows: {rows}; {args.layers} layers; {WARMUP} warm-up + {args.steps} timed steps; "
        "medians, seconds a step\n"
    )
    print("| variant | forward | backward | rest | step | vs default | recompile limit reached |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    base = None
    for lever in levers:
        command = [sys.executable, __file__, "--worker", lever, "--steps", str(args.steps)]
        command += ["--layers", str(args.layers)]
        done = subprocess.run(
            [*command, "--data", str(args.data)], capture_output=True, text=True, cwd=ROOT
        )
        if done.returncode != 0:
            print(f"| {lever} | failed | | | | | |\n{done.stderr[-2000:]}")
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        step = sum(result[k] for k in PHASES)
        base = step if lever == "default" else base
        ratio = "-" if base is None or lever == "default" else f"{base / step:.2f}x"
        cells = [f"{result[k]:.3f}" for k in PHASES]
        # A compiled function past torch's limit runs its further variants eager.
        limited = "; ".join(result["recompile_limit_hit"]) or "none"
        print(f"| {lever} | {' | '.join(cells)} | {step:.3f} | {ratio} | {limited} |", flush=True)


if __name__ == "__main__":
    main()
