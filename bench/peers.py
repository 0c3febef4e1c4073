"""lorafit against its peers, side by side: same model, data, LoRA and tokens per step.

    python bench/peers.py                     # CPU: SmolLM2-135M fp32, 3 warm-up + 30 steps
    python bench/peers.py --tiny              # every variant on a tiny random Mistral, seconds
    python bench/peers.py --device cuda       # GPU: Mistral-7B-shaped QLoRA at 2048 and 8192
    python bench/peers.py --suite gpu --tiny  # the GPU variant list on CPU, without quantization
    python bench/peers.py --profile hf-flat   # torch.profiler over 2 steps of one variant;
                                              # on a GPU its kernel time by kind too
    python bench/peers.py --levers sdpa,plain-loss   # lorafit packed with each lever too
    python bench/peers.py --variants lorafit-packed,hf-flat --rounds 3   # interleaved, medians

Variants (each in its own process, one after the other, so each peak memory is its own):
  lorafit-packed     lorafit's Trainer / LightningModule / DataModule (lorafit.training.build_run),
                     one packed row of sequence_len tokens a step
  lorafit-unpacked   lorafit, padded batches of as many examples a step as the padded peer
  hf-padded          transformers Trainer + peft, DataCollatorForSeq2Seq padding to the longest
  hf-flat            transformers Trainer + peft, DataCollatorWithFlattening (padding-free)
  trl-packed         TRL SFTTrainer, packing=True, completion-only loss (skipped without trl)

The padded and flattened variants take round(examples / packed rows) examples a step: about
the tokens of one packed row. Every variant reads model, LoRA, optimizer, precision and data
from one composed lorafit config (bench/peer_worker.py) and is timed the same way: real (non-
pad) input tokens of the timed steps over the wall-clock from the end of the last warm-up step
to the end of the last timed step. Prints a markdown table; --out writes the raw results.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().with_name("peer_worker.py")
ALPACA = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"
PROJECTIONS = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"

LABELS = {
    "lorafit-packed": "lorafit packed",
    "lorafit-unpacked": "lorafit unpacked",
    "hf-padded": "transformers Trainer + peft, padded",
    "hf-flat": "transformers Trainer + peft, padding-free",
    "trl-packed": "TRL SFTTrainer, packed",
}
# Per suite: LoRA r / alpha / dropout, learning rate, and the sequence lengths.
SUITE_DEFAULTS = {
    "cpu": {"r": 16, "alpha": 32, "dropout": 0.05, "lr": 2e-4, "seq": [512]},
    "gpu": {"r": 32, "alpha": 16, "dropout": 0.05, "lr": 1e-4, "seq": [2048, 8192]},
}
TINY_GPU_SEQ = [512, 1024]
PACKED = ("lorafit-packed", "trl-packed")  # one packed row a step
# lorafit unpacked's batch is set by the worker: as many examples as the padded peer takes.
KIND_OVERRIDES = {
    "lorafit-packed": [
        "data.sample_packing=true",  # one row of sequence_len tokens a step
        "data.batch_size=1",
        "data.micro_batch_size=1",
    ],
    "lorafit-unpacked": ["data.sample_packing=false"],
}
# --levers: lorafit packed again with one option changed, to measure what each one buys.
LEVERS = {
    "sdpa": ["model.attn_implementation=sdpa"],  # transformers' block mask, the peers' path
    "sdpa_packed": ["model.attn_implementation=sdpa_packed"],  # the default; varlen on CUDA
    "adamw": ["optimizer=adamw"],  # torch's AdamW instead of the config's (paged on GPU)
    # bitsandbytes' own paged AdamW class, which updates a tensor a call and waits for the GPU
    # after each (lorafit's: a call a run of tensors, one wait a step; model/optimizers.py)
    "bnb-waits": [
        "optimizer=paged_adamw_32bit",
        "optimizer._target_=bitsandbytes.optim.PagedAdamW32bit",
        "~optimizer.flat",
    ],
    # lorafit's paged AdamW with a kernel call a tensor, as bitsandbytes makes them (its default
    # makes one a run of parameters)
    "per-tensor-updates": ["optimizer=paged_adamw_32bit", "optimizer.flat=false"],
    "plain-loss": ["model.loss_chunk_size=null"],  # the output layer's logits in full
    "no-dropout": ["adapter.dropout=0"],
    # Gradient checkpointing's granularity (with it on, as on GPU): memory for speed.
    "ckpt-every-2": ["model.checkpoint_every=2"],  # recompute every other layer
    "no-ckpt": ["model.gradient_checkpointing=false"],  # keep every layer's activations
    "liger": ["model.liger_kernels=true"],  # Liger's RMSNorm, SwiGLU and RoPE (CUDA)
    # Norms, embeddings and output layer left in bf16 over the 4-bit base: a bf16 residual stream
    "bf16-stream": ["adapter.upcast_unquantized=false"],
    # 4-bit projections return bf16 as nn.Linear does under autocast; the stream stays fp32
    "autocast-outputs": ["adapter.autocast_outputs=true"],
    # peft's bf16 add of the LoRA update to o_proj's bf16 output (the default adds in fp32)
    "bf16-add": ["adapter.fp32_lora_add=false"],
    "non-reentrant": ["model.reentrant_checkpointing=false"],
    "compile": ["model.compile=true"],  # torch.compile of each layer but its attention core
    # Layer inputs kept for backward in pinned host memory (a no-op on a CPU)
    "offload": ["model.offload_activations=true"],
    "bf16-offload": ["adapter.upcast_unquantized=false", "model.offload_activations=true"],
    "compile-offload": ["model.compile=true", "model.offload_activations=true"],
    # Each decoder layer's forward compiled whole: two graphs a layer, not eight modules
    "compile-layers": ["model.compile=true", "model.compile_scope=layers"],
    "compile-layers-offload": [
        "model.compile=true",
        "model.compile_scope=layers",
        "model.offload_activations=true",
    ],
    "compile-liger": ["model.compile=true", "model.liger_kernels=true"],
    # 4-bit weights dequantized by one compiled kernel a product, not bitsandbytes' three
    "dequant": ["model.dequantize=compiled"],
    "compile-dequant": ["model.compile=true", "model.dequantize=compiled"],
    "compile-layers-dequant": [
        "model.compile=true",
        "model.compile_scope=layers",
        "model.dequantize=compiled",
    ],
    # The canonical experiment's speed settings with it
    "compile-offload-dequant": [
        "model.compile=true",
        "model.offload_activations=true",
        "model.dequantize=compiled",
    ],
    # Each layer's MLP over 2048 tokens at a time: backward's MLP-wide gradients a chunk at a
    # time, for more host work (the MLP's operators once a chunk)
    "mlp-chunks": ["model.mlp_chunk_tokens=2048"],
    "compile-mlp-chunks": ["model.compile=true", "model.mlp_chunk_tokens=2048"],
    # A larger micro batch under a token budget: 4 packed rows a forward (4x the tokens a step)
    "rows-4": ["data.batch_size=4", "data.micro_batch_size=4"],
    # Two rows a forward with the layer inputs in host memory: twice the tokens a step for
    # about one row's peak
    "rows-2-offload": [
        "data.batch_size=2",
        "data.micro_batch_size=2",
        "model.offload_activations=true",
    ],
    # The same compiled: with twice the tokens a step, more of it is the GPU's elementwise
    # work compile fuses (one row at 2048 waits on the host, where compile gave 0.96x)
    "compile-rows-2-offload": [
        "model.compile=true",
        "data.batch_size=2",
        "data.micro_batch_size=2",
        "model.offload_activations=true",
    ],
    # The same without the compiled dequantization, which inside a compiled layer keeps the
    # layer's dequantized weights for backward (0.32 GiB more by bench/peak_memory.py)
    "compile-layers-rows-2-offload": [
        "model.compile=true",
        "model.compile_scope=layers",
        "data.batch_size=2",
        "data.micro_batch_size=2",
        "model.offload_activations=true",
    ],
    # The host levers and the GPU's together at 2048: whole layers compiled, the compiled
    # dequantization, two rows a step within the 7 GB of one row (offloading)
    "compile-layers-dequant-rows-2-offload": [
        "model.compile=true",
        "model.compile_scope=layers",
        "model.dequantize=compiled",
        "data.batch_size=2",
        "data.micro_batch_size=2",
        "model.offload_activations=true",
    ],
}


@dataclass
class Variant:
    key: str
    kind: str
    label: str
    sequence_len: int
    overrides: list[str]
    checkpointing: bool
    result: dict = field(default_factory=dict)
    status: str = "pending"  # ok, skipped, failed
    note: str = ""
    rounds: list[dict] = field(default_factory=list)  # each round's result, with --rounds

    @property
    def lorafit(self) -> bool:
        return self.kind.startswith("lorafit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--suite",
        choices=["cpu", "gpu"],
        help="variant list and settings; default: gpu with --device cuda, else cpu",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny_mistral, 1 warm-up + 2 steps")
    parser.add_argument("--warmup", type=int, help="warm-up optimizer steps (3; GPU 2; tiny 1)")
    parser.add_argument("--steps", type=int, help="timed optimizer steps (30; GPU 8; tiny 2)")
    parser.add_argument("--sequence-len", type=int, nargs="+", help="512; GPU suite 2048 8192")
    parser.add_argument("--lora-r", type=int)
    parser.add_argument("--lora-alpha", type=float)
    parser.add_argument("--lora-dropout", type=float)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="CPU suite: recompute activations (the GPU suite always does)",
    )
    parser.add_argument("--with-trl", action="store_true", help="GPU suite: add TRL packed")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a lorafit override for every variant (peers read the same config), e.g. "
        "trainer.precision=bf16-mixed",
    )
    parser.add_argument(
        "--levers",
        help=f"comma-separated: lorafit packed again with each of {', '.join(LEVERS)}",
    )
    parser.add_argument("--variants", help="comma-separated keys or key@sequence_len to run")
    parser.add_argument("--data", type=Path, default=ALPACA, help="alpaca rows (json)")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="the card's dense bf16 peak (H100/H200 989)",
    )
    parser.add_argument("--profile", metavar="VARIANT", help="profile 2 steps of one variant")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the variant list this many times, interleaved; the table gives each variant's "
        "median round and the median of the per-round ratios (for a noisy host)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="variants at once (timings then clash)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per variant")
    parser.add_argument(
        "--budget",
        type=float,
        help="seconds after which no further variant starts (those left are reported skipped), "
        "so that a run on a leased machine ends with its table",
    )
    parser.add_argument("--out", type=Path, help="write the raw results as JSON")
    args = parser.parse_args(argv)
    args.suite = args.suite or ("gpu" if args.device == "cuda" else "cpu")
    defaults = SUITE_DEFAULTS[args.suite]
    gpu = args.suite == "gpu"
    args.warmup = args.warmup if args.warmup is not None else 1 if args.tiny else 2 if gpu else 3
    args.steps = args.steps if args.steps is not None else 2 if args.tiny else 8 if gpu else 30
    if args.profile:
        args.steps = 2
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1: timing starts at a step's end")
    if args.rounds < 1 or (args.profile and args.rounds > 1):
        parser.error("--rounds must be at least 1, and 1 with --profile")
    seq = defaults["seq"] if not (gpu and args.tiny) else TINY_GPU_SEQ
    args.sequence_len = args.sequence_len or seq
    args.lora_r = args.lora_r or defaults["r"]
    args.lora_alpha = args.lora_alpha or defaults["alpha"]
    args.lora_dropout = defaults["dropout"] if args.lora_dropout is None else args.lora_dropout
    args.lr = args.lr or defaults["lr"]
    return args


def data_overrides(args: argparse.Namespace) -> tuple[list[str], str]:
    if args.data.is_file():
        return ["data=local", f"data.datasets.0.path={args.data}"], str(args.data)
    return ["data=demo"], f"builtin:demo_alpaca ({args.data} is absent)"


def common_overrides(args: argparse.Namespace, sequence_len: int) -> list[str]:
    """What every variant's lorafit config shares, whatever the suite."""
    cuda = args.device == "cuda"
    overrides = [
        *data_overrides(args)[0],
        f"data.sequence_len={sequence_len}",
        "data.val_set_size=0",  # every row trains; no validation inside the timed steps
        "data.train_on_inputs=false",
        f"adapter.r={args.lora_r}",
        f"adapter.alpha={args.lora_alpha}",
        f"adapter.dropout={args.lora_dropout}",
        f"optimizer.lr={args.lr}",
        "optimizer.weight_decay=0",
        "scheduler=constant",  # peers run transformers' constant schedule, no warm-up
        "scheduler.warmup_steps=0",
        f"trainer.max_steps={args.warmup + args.steps}",
        "trainer.enable_progress_bar=false",
        # Writing checkpoints and the adapter is not training; the peers save nothing either.
        "callbacks.model_checkpoint=null",
        "callbacks.best_checkpoint=null",
        "callbacks.export_adapter=null",
        f"seed={args.seed}",
    ]
    if args.suite == "cpu":
        model = "tiny_mistral" if args.tiny else "smollm2_135m"
        overrides = [
            f"model={model}",
            "adapter=lora",
            "adapter.target_linear=false",
            f"adapter.target_modules={PROJECTIONS}",
            "optimizer=adamw",
            "trainer=gpu" if cuda else "trainer=cpu",
            "model.dtype=float32" if not cuda else "model.dtype=bfloat16",
            f"model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
            *overrides,
        ]
    else:
        overrides = ["experiment=mistral7b_random_qlora", *overrides]
        if args.tiny:
            overrides += ["model=tiny_mistral"]
        # The preset's model group turns checkpointing on; tiny_mistral's does not.
        overrides += ["model.gradient_checkpointing=true"]
        if not cuda:
            # bitsandbytes' 4-bit layers and paged optimizers need CUDA: the same path in fp32.
            overrides += ["adapter=lora", "trainer=cpu", "optimizer=adamw", "model.dtype=float32"]
    return overrides


def plan(args: argparse.Namespace) -> list[Variant]:
    checkpointing = args.suite == "gpu" or args.gradient_checkpointing
    if args.suite == "cpu":
        kinds = [(k, args.sequence_len[0]) for k in LABELS]
    else:
        first = args.sequence_len[0]
        kinds = [("lorafit-packed", s) for s in args.sequence_len]
        kinds += [("hf-padded", first)]
        kinds += [("hf-flat", s) for s in args.sequence_len]
        if args.with_trl:
            kinds += [("trl-packed", first)]
    levers = [lever for lever in (args.levers or "").split(",") if lever]
    unknown = sorted(set(levers) - set(LEVERS))
    if unknown:
        sys.exit(f"unknown lever {unknown}; known: {', '.join(LEVERS)}")
    kinds = [(kind, seq, None) for kind, seq in kinds]
    kinds += [("lorafit-packed", seq, lever) for lever in levers for seq in args.sequence_len]
    several = len({s for _, s, _ in kinds}) > 1
    variants = []
    for kind, seq, lever in kinds:
        key = kind + (f"+{lever}" if lever else "") + (f"@{seq}" if several else "")
        label = LABELS[kind] + (f", {lever}" if lever else "") + (f" @ {seq}" if several else "")
        overrides = common_overrides(args, seq) + KIND_OVERRIDES.get(kind, [])
        overrides += args.set + LEVERS.get(lever, [])
        variants.append(Variant(key, kind, label, seq, overrides, checkpointing))
    if args.variants or args.profile:
        wanted = (args.profile or args.variants).split(",")

        def asked(v: Variant) -> str | None:
            """The name this variant was asked by: its key, or its key without @length."""
            return next((name for name in (v.key, v.key.split("@")[0]) if name in wanted), None)

        # In the order asked for: a run cut short has what came first.
        variants = sorted((v for v in variants if asked(v)), key=lambda v: wanted.index(asked(v)))
        if not variants:
            sys.exit(
                f"no variant matches {wanted}; known: {', '.join(v.key for v in plan_keys(args))}"
            )
    return variants


def plan_keys(args: argparse.Namespace) -> list[Variant]:
    return plan(argparse.Namespace(**{**vars(args), "variants": None, "profile": None}))


def run_variant(variant: Variant, args: argparse.Namespace, folder: Path) -> Variant:
    """Run one variant in a worker process of its own; on success its result is appended to
    `variant.rounds` and `variant.result` is the latest."""
    if variant.kind == "trl-packed" and importlib.util.find_spec("trl") is None:
        variant.status, variant.note = "skipped", "trl is not installed (pip install -e .[bench])"
        return variant
    work = folder / f"{variant.key.replace('@', '_')}_round{len(variant.rounds) + 1}"
    work.mkdir()
    spec = {
        "kind": variant.kind,
        "packed": variant.kind in PACKED,  # one packed row a step, not examples
        "overrides": variant.overrides,
        "device": args.device,
        "warmup": args.warmup,
        "steps": args.steps,
        "profile": bool(args.profile),
        "output_dir": str(work / "run"),
    }
    if args.profile and args.out:  # the profiled steps' trace, beside the results
        name = f"{args.out.stem}-trace-{variant.key.replace('@', '_')}.json.gz"
        spec["trace"] = str(args.out.with_name(name).resolve())
    (work / "spec.json").write_text(json.dumps(spec))
    log = work / "log.txt"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "ignore",
    }
    if args.jobs > 1:  # variants at once share the cores rather than oversubscribe them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    print(f"running {variant.key} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    command = [sys.executable, str(WORKER), str(work / "spec.json"), str(work / "result.json")]
    try:
        with open(log, "w") as handle:
            done = subprocess.run(
                command, stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=args.timeout
            )
        failed = done.returncode != 0
    except subprocess.TimeoutExpired:
        failed = True
    if failed or not (work / "result.json").is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        variant.status, variant.note = "failed", tail
        print(f"{variant.key} failed:\n{tail}", file=sys.stderr, flush=True)
    else:
        variant.result = json.loads((work / "result.json").read_text())
        variant.rounds.append(variant.result)
        variant.status = "ok"
        print(
            f"{variant.key}: {variant.result['tokens_per_s']:.1f} tokens/s "
            f"({time.perf_counter() - start:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    return variant


def versions() -> str:
    names = ["torch", "transformers", "peft", "trl", "lightning"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found)


def lorafit_revision() -> str:
    """Which lorafit the workers import (PYTHONPATH may point at a snapshot of a commit), its
    commit, and whether its code differed from the commit."""
    spec = importlib.util.find_spec("lorafit")
    source = Path(spec.origin).resolve().parents[1] if spec and spec.origin else ROOT / "src"

    def git(*command: str) -> str:
        done = subprocess.run(["git", *command], cwd=source, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return f"lorafit from {source} (not a git checkout)"
    dirty = git("status", "--porcelain", "--", ".", "../conf")
    return f"lorafit {commit}" + (" with uncommitted changes in src/ or conf/" if dirty else "")


def machine(variants: list[Variant], args: argparse.Namespace) -> str:
    if args.device == "cuda":
        names = {v.result.get("device_name") for v in variants if v.status == "ok"}
        return ", ".join(sorted(n for n in names if n)) or "CUDA (no variant ran)"
    threads = {v.result.get("threads") for v in variants if v.status == "ok"}
    return f"{os.cpu_count()} CPU cores, torch threads {', '.join(map(str, sorted(threads)))}"


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def _best_peer(variants: list[Variant], sequence_len: int, round_index: int | None = None):
    """The fastest non-lorafit variant's tokens/s at this length: of its median run, or of
    one round."""
    speeds = [
        (v.result if round_index is None else v.rounds[round_index])["tokens_per_s"]
        for v in variants
        if v.status == "ok"
        and not v.lorafit
        and v.sequence_len == sequence_len
        and (round_index is None or round_index < len(v.rounds))
    ]
    return max(speeds, default=None)


def vs_best_peer(variant: Variant, variants: list[Variant]) -> float | None:
    """tokens/s over the best peer's; with several rounds, the median of the ratios taken
    within each round (variants of one round ran minutes apart, not hours)."""
    if len(variant.rounds) > 1:
        ratios = []
        for index, result in enumerate(variant.rounds):
            peer = _best_peer(variants, variant.sequence_len, index)
            if peer:
                ratios.append(result["tokens_per_s"] / peer)
        return statistics.median(ratios) if ratios else None
    peer = _best_peer(variants, variant.sequence_len)
    return variant.result["tokens_per_s"] / peer if peer else None


PEAKS = ("peak_rss_kib", "cuda_allocated", "cuda_reserved", "cuda_allocated_with_load")


def take_median_round(variant: Variant) -> None:
    """With several rounds: the round of median tokens/s stands for the variant, with the
    highest peak memory of any round."""
    if len(variant.rounds) < 2:
        return
    ordered = sorted(variant.rounds, key=lambda r: r["tokens_per_s"])
    result = dict(ordered[(len(ordered) - 1) // 2])
    for key in PEAKS:
        if all(key in r for r in variant.rounds):
            result[key] = max(r[key] for r in variant.rounds)
    variant.result = result


def table(variants: list[Variant], args: argparse.Namespace) -> str:
    cuda = args.device == "cuda"
    columns = ["variant", "real tokens/s", "vs best peer", "peak memory", "mean loss", "steps"]
    columns += ["tokens/step"] + (["share of bf16 peak"] if cuda else ["CPU s/step"])
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for v in variants:
        if v.status != "ok":
            note = v.note.splitlines()[0] if v.status == "skipped" else "see the log above"
            cells = [v.label, v.status, "", "", "", "", note, ""]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        r = v.result
        ratio = vs_best_peer(v, variants)
        speed = f"{r['tokens_per_s']:.1f}"
        if len(v.rounds) > 1:
            speeds = [x["tokens_per_s"] for x in v.rounds]
            speed += f" ({min(speeds):.1f}-{max(speeds):.1f})"
        if cuda:
            memory = f"{_gib(r['cuda_allocated'])} alloc / {_gib(r['cuda_reserved'])} reserved"
            if r.get("cuda_allocated_with_load"):
                memory += f" ({_gib(r['cuda_allocated_with_load'])} with the load)"
        else:
            memory = f"{_gib(r['peak_rss_kib'] * 1024)} RSS"
        cells = [
            v.label,
            speed,
            "-" if ratio is None else f"{ratio:.2f}x",
            memory,
            f"{r['mean_loss']:.4f}",
            str(r["steps"]),
            f"{r['tokens_per_step']:.0f}",
        ]
        if cuda:
            # Recomputing a layer repeats its forward: 2 N more for a share of the layers.
            share = r.get("recomputed_share", 1.0 if v.checkpointing else 0.0)
            per_token = 6 + 2 * share
            flops = per_token * r["n_params"] * r["tokens_per_s"]
            cells.append(f"{flops / (args.peak_tflops * 1e12):.1%}")
        else:
            cpu = r.get("cpu_seconds_per_step")
            cells.append("-" if cpu is None else f"{cpu:.2f} ({r['system_share']:.0%} system)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def phases_table(variants: list[Variant]) -> str | None:
    """Where each lorafit variant's step went, as host seconds a step (peer_worker.PHASES, in
    the order the worker wrote them)."""
    rows = [v for v in variants if v.status == "ok" and v.result.get("host_phases_s")]
    if not rows:
        return None
    names = list(rows[0].result["host_phases_s"])
    columns = ["variant", *names, "s a step", "GPU busy (profiled)"]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for v in rows:
        phases = v.result["host_phases_s"]
        busy = v.result.get("gpu_busy_share")
        cells = [v.label, *(f"{phases[p]:.3f}" for p in names)]
        cells += [f"{sum(phases.values()):.3f}", "-" if busy is None else f"{busy:.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(variants: list[Variant], args: argparse.Namespace, data: str) -> str:
    ok = [v for v in variants if v.status == "ok"]
    examples = sorted({v.result["examples_per_step"] for v in ok if v.kind not in PACKED})
    lines = [
        f"machine: {machine(variants, args)}; {versions()}; {args.revision}",
        f"command: python {shlex.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])}",
        f"data: {data}; sequence_len {', '.join(map(str, args.sequence_len))}; "
        f"LoRA r={args.lora_r} alpha={args.lora_alpha:g} dropout={args.lora_dropout:g}; "
        f"lr {args.lr:g}; {args.warmup} warm-up + {args.steps} timed steps; seed {args.seed}; "
        + (f"overrides {' '.join(args.set)}; " if args.set else "")
        + f"padded / flattened variants: {', '.join(map(str, examples)) or '-'} examples a step",
        "",
        table(variants, args),
        "",
        "real tokens/s: non-pad input tokens of the timed steps / wall-clock from the end of the "
        "last warm-up step to the end of the last timed step (optimizer, zero_grad, data loading "
        "and collation included). vs best peer: against the fastest non-lorafit variant of the "
        "same sequence_len. mean loss: of the timed steps.",
    ]
    if args.rounds > 1:
        lines.append(
            f"{args.rounds} rounds, each running every variant once in the order listed: "
            "tokens/s is the median round's (lowest to highest in brackets), vs best peer the "
            "median of the ratios within each round, peak memory the highest of any round."
        )
    if args.device != "cuda":
        lines.append(
            "CPU s/step: this process's CPU time (all threads, user + system) per timed step; "
            "on a shared host it varies less than the wall-clock."
        )
    if args.device == "cuda":
        lines.append(
            "peak memory: torch's peak allocated and reserved over the steps after the first "
            "(optimizer states included); in brackets, the peak of loading and the first step."
        )
        lines.append(
            "share of bf16 peak: 6 N FLOPs per token (8 N with gradient checkpointing's "
            "recomputation of every layer, 7 N of every other), N the base model's parameters "
            "less the input embedding, against "
            f"{args.peak_tflops:g} TFLOP/s; attention FLOPs are not counted."
        )
    phases = phases_table(variants)
    if phases:
        lines += [
            "",
            "where a lorafit step's wall-clock went, host seconds a timed step (mean): forward "
            "and backward: issuing them; backward's tail: waiting at the step's loss for the "
            "GPU to finish backward; optimizer: clipping and the update; optimizer's tail: "
            "waiting for the GPU at the step's end; between: logging, data, Lightning's loop. "
            "GPU busy: the share of the profiled steps in which a kernel ran (--profile).",
            "",
            phases,
        ]
    limited = [v for v in ok if v.result.get("recompile_limit_hit")]
    if limited:
        lines += [
            "",
            "compiled functions that reached torch's recompile limit (their further "
            "variants ran eager, so these variants' figures are partly eager's):",
        ]
        lines += [f"- {v.label}: {'; '.join(v.result['recompile_limit_hit'])}" for v in limited]
    lines.append(f"the whole run, model loads included: {args.wall_s:.0f} s")
    if args.jobs > 1:
        lines.append(f"{args.jobs} variants ran at once: these timings do not compare.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    variants = plan(args)
    data = data_overrides(args)[1]
    start = time.perf_counter()
    args.revision = lorafit_revision()  # before the runs: the code they measure

    def save() -> None:
        """The raw results so far: a run cut short still leaves the variants it finished."""
        if not args.out:
            return
        args.wall_s = round(time.perf_counter() - start, 1)
        raw = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "command": sys.argv,
            "versions": versions(),
            "lorafit": args.revision,
            "machine": machine(variants, args),
            "data": data,
            "variants": [asdict(v) for v in variants],
        }
        args.out.write_text(json.dumps(raw, indent=1) + "\n")

    def run(variant: Variant) -> Variant:
        if args.budget is not None and time.perf_counter() - start > args.budget:
            print(f"{variant.key}: not started, the budget is spent", file=sys.stderr, flush=True)
            if not variant.rounds:  # one finished round still stands for the variant
                variant.status, variant.note = "skipped", f"not started: {args.budget:g} s spent"
            return variant
        done = run_variant(variant, args, Path(folder))
        save()
        return done

    with tempfile.TemporaryDirectory(prefix="lorafit-peers-") as folder:
        for _ in range(args.rounds):  # interleaved: each round runs the whole list once
            # A variant that failed or was skipped sits out the later rounds, so the rounds
            # of the variants that remain stay aligned for the per-round ratios.
            remaining = [v for v in variants if v.status in ("pending", "ok")]
            with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
                list(pool.map(run, remaining))
    for variant in variants:
        take_median_round(variant)
    args.wall_s = round(time.perf_counter() - start, 1)
    print(report(variants, args, data))
    if args.profile:
        for v in variants:
            if v.status == "ok":
                print(f"\ntorch.profiler, {v.label}, 2 steps, top 25 by self CPU time:")
                print(v.result.get("profile"))
    save()
    return 1 if any(v.status == "failed" for v in variants) else 0


if __name__ == "__main__":
    sys.exit(main())
