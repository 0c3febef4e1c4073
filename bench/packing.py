"""Packing and data-preparation benchmarks on the real alpaca rows in ../shared/data.

    python bench/packing.py                 # all parts, ~5 min on 2 cores
    python bench/packing.py --skip-training # packing, preparation and cache only, ~1 min

Prints one markdown table per part; docs/benchmarks.md records a run. Parts:
1. packing quality and speed: 52,002 samples (the size of Alpaca), lengths drawn from the real
   rows' token lengths, packed at sequence_len 2048 and 8192;
2. template + tokenize + pack throughput on 20,000 rows, and a second, cached preparation;
3. CPU training throughput (SmolLM2-135M, LoRA, fp32) of packed rows against a baseline that
   pads each batch of 4 examples to its longest, on the same rows and settings.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from lorafit.data.datamodule import FineTuneDataModule
from lorafit.data.packing import pack_rows
from lorafit.data.tokenization import tokenize_alpaca
from lorafit.model.sources import mistral_tokenizer
from lorafit.training import build_run

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"


def compose_config(overrides: list[str], output_dir: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[*overrides, f"output_dir={output_dir}"])


def logged(output_dir: Path, key: str) -> list[float]:
    with open(output_dir / "csv" / "metrics.csv") as handle:
        return [float(row[key]) for row in csv.DictReader(handle) if row.get(key)]


def packing_quality(lengths: list[int]) -> None:
    rng = random.Random(0)
    sample = [rng.choice(lengths) for _ in range(52_002)]
    print("| sequence_len | samples | tokens | rows | bound ceil(T/L)+1 | non-pad share | time |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for capacity in (2048, 8192):
        clipped = [min(n, capacity) for n in sample]
        start = time.perf_counter()
        rows = pack_rows(clipped, capacity)
        elapsed = time.perf_counter() - start
        total = sum(clipped)
        bound = math.ceil(total / capacity) + 1
        share = total / (len(rows) * capacity)
        print(
            f"| {capacity} | {len(sample)} | {total} | {len(rows)} | {bound} | "
            f"{share:.4f} | {elapsed:.3f} s |"
        )


def preparation(rows: list[dict[str, str]], tokenizer) -> None:
    rng = random.Random(1)
    many = [rng.choice(rows) for _ in range(20_000)]
    start = time.perf_counter()
    examples, _ = tokenize_alpaca(many, tokenizer, sequence_len=2048)
    pack_rows([len(e["input_ids"]) for e in examples], 2048)
    elapsed = time.perf_counter() - start
    tokens = sum(len(e["input_ids"]) for e in examples)
    print(
        f"| template + tokenize + pack, 20,000 rows | {tokens} tokens | {elapsed:.2f} s | "
        f"{tokens / elapsed:,.0f} tokens/s |"
    )
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "rows.json"
        data.write_text(json.dumps(many))
        for attempt in ("first (builds the cache)", "second (cached)"):
            start = time.perf_counter()
            datamodule = FineTuneDataModule(
                datasets=[{"path": str(data)}],
                sequence_len=2048,
                val_set_size=0.05,
                train_on_inputs=False,
                batch_size=1,
                micro_batch_size=1,
                sample_packing=True,
                dataset_prepared_path=str(Path(folder) / "cache"),
            )
            datamodule.connect(tokenizer)
            datamodule.setup("fit")
            elapsed = time.perf_counter() - start
            print(
                f"| prepare 20,000 rows, {attempt} | from cache: "
                f"{datamodule.prepared_from_cache} | {elapsed:.2f} s | |"
            )


def training_throughput(steps: int) -> None:
    common = [
        "experiment=quickstart",
        "data=local",
        f"data.datasets.0.path={ALPACA}",
        "data.sequence_len=1024",
        "validate_before_training=false",
        f"trainer.max_steps={steps}",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "callbacks.progress_bar=null",
        "callbacks.model_checkpoint=null",
        "callbacks.export_adapter=null",
        "trainer.limit_val_batches=0",
        "adapter.dropout=0",
    ]
    variants = {
        "padded, 4 examples a batch": ["data.batch_size=4", "data.micro_batch_size=4"],
        "packed, one 1024-token row a batch": [
            "data.sample_packing=true",
            "data.batch_size=1",
            "data.micro_batch_size=1",
        ],
    }
    results = {}
    for name, overrides in variants.items():
        with tempfile.TemporaryDirectory() as folder:
            run = build_run(compose_config(common + overrides, folder))
            run.trainer.fit(run.module, datamodule=run.datamodule)
            speeds = logged(Path(folder), "train/tokens_per_s")[1:]  # the first step warms up
            results[name] = statistics.median(speeds)
            if name.startswith("padded"):
                share = _padded_share(run.datamodule)
    padded, packed = results.values()
    ideal = 1 / share
    print("| variant | non-pad tokens/s (median) |")
    print("| --- | --- |")
    for name, speed in results.items():
        print(f"| {name} | {speed:.1f} |")
    print(
        f"\nbaseline non-pad share {share:.3f}: ideal gain {ideal:.2f}x, measured "
        f"{packed / padded:.2f}x = {packed / padded / ideal:.1%} of ideal"
    )


def _padded_share(datamodule) -> float:
    real = padded = 0
    for batch in datamodule.train_dataloader():
        real += int(batch["real_tokens"])
        padded += batch["input_ids"].numel()
    return real / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--steps", type=int, default=9)
    args = parser.parse_args()
    if not ALPACA.is_file():
        sys.exit(f"{ALPACA} is missing: these benchmarks read the shared alpaca rows")
    rows = json.loads(ALPACA.read_text())
    tokenizer = mistral_tokenizer()
    examples, _ = tokenize_alpaca(rows, tokenizer, sequence_len=1 << 20)
    packing_quality([len(e["input_ids"]) for e in examples])
    print()
    preparation(rows, tokenizer)
    if not args.skip_training:
        print()
        training_throughput(args.steps)


if __name__ == "__main__":
    main()
