"""bench/peers.py end to end at the tiny shape: every variant of the CPU suite and of the GPU
suite (on the CPU, without quantization) trains, is timed and lands in the table. No timing is
asserted: the figures of 2 steps on a tiny model mean nothing."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import compose_config

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "bench" / "peers.py"
CPU_SUITE = {
    "lorafit packed",
    "lorafit unpacked",
    "transformers Trainer + peft, padded",
    "transformers Trainer + peft, padding-free",
    "TRL SFTTrainer, packed",
}
# TRL's code path is the CPU suite's; left out here to keep the test short.
GPU_SUITE = {
    "lorafit packed",
    "transformers Trainer + peft, padded",
    "transformers Trainer + peft, padding-free",
}


def _table_rows(stdout: str, which: int = 0) -> dict[str, list[str]]:
    """The rows of the report's `which`-th table (0: the main one), by variant."""
    tables, rows = [], []
    for line in [*stdout.splitlines(), ""]:
        if line.startswith("| "):
            rows.append(line.strip("| ").split(" | "))
        elif rows:
            tables.append(rows)
            rows = []
    return {cells[0]: cells for cells in tables[which][2:]}  # past the header and its rule


@pytest.mark.slow
def test_every_variant_trains_at_the_tiny_shape(tmp_path: Path) -> None:
    runs = {
        "cpu": ["--tiny", "--sequence-len", "256"],
        # The GPU suite's code path: the Mistral-7B preset with tiny_mistral, checkpointing on.
        "gpu": ["--suite", "gpu", "--tiny", "--sequence-len", "256"],
    }
    started = {
        name: subprocess.Popen(
            [sys.executable, str(HARNESS), *flags, "--out", str(tmp_path / f"{name}.json")],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # Two harnesses at once: one thread each, so they do not fight over the cores.
            env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"},
        )
        for name, flags in runs.items()
    }
    trl = importlib.util.find_spec("trl") is not None
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name}:\n{stdout}\n{stderr[-4000:]}"
        table = _table_rows(stdout)
        assert set(table) == (CPU_SUITE if name == "cpu" else GPU_SUITE), stdout
        raw = json.loads((tmp_path / f"{name}.json").read_text())
        for variant in raw["variants"]:
            if variant["kind"] == "trl-packed" and not trl:
                assert variant["status"] == "skipped"
                continue
            assert variant["status"] == "ok", variant
            result = variant["result"]
            assert result["tokens_per_s"] > 0 and result["steps"] == 2
            assert all(math.isfinite(loss) for loss in result["step_losses"])
            assert float(table[variant["label"]][1]) > 0
            assert math.isfinite(float(table[variant["label"]][4]))
        assert "command: python bench/peers.py" in stdout and "torch " in stdout
        # Where lorafit's steps went: its phases tile the timed wall-clock, on any host load.
        phases = _table_rows(stdout, which=1)
        assert set(phases) == {"lorafit packed", "lorafit unpacked"} & set(table), stdout
        for variant in raw["variants"]:
            if variant["kind"].startswith("lorafit"):
                result = variant["result"]
                spent = sum(result["host_phases_s"].values()) * result["steps"]
                assert spent == pytest.approx(result["seconds"], rel=1e-9)
                assert result["host_phases_s"]["forward"] > 0


def _harness():
    spec = importlib.util.spec_from_file_location("peers", HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules["peers"] = module  # dataclasses resolve the module's annotations through it
    spec.loader.exec_module(module)
    return module


def test_rounds_compare_within_each_round_and_keep_the_highest_peak() -> None:
    """With --rounds the ratio is the median of same-round ratios, not a ratio of medians: a
    host that slows down for a whole round must not read as one trainer being faster."""
    peers = _harness()

    def variant(kind: str, speeds: list[float], peaks: list[int]):
        v = peers.Variant(kind, kind, kind, 512, [], False, status="ok")
        v.rounds = [
            {"tokens_per_s": s, "peak_rss_kib": p, "round": i, "mean_loss": 1.0}
            | {"steps": 20, "tokens_per_step": 500.0}
            for i, (s, p) in enumerate(zip(speeds, peaks, strict=True))
        ]
        v.result = v.rounds[-1]
        return v

    # Round 2 ran on a host half as fast. Two rounds of three say lorafit is 1.5x the peer;
    # the medians alone (120 against 100) would say 1.2x.
    lorafit = variant("lorafit-packed", [150.0, 75.0, 120.0], [10, 30, 20])
    flat = variant("hf-flat", [100.0, 50.0, 100.0], [40, 40, 40])
    slow = variant("hf-padded", [80.0, 40.0, 70.0], [50, 50, 50])
    for v in (lorafit, flat, slow):
        peers.take_median_round(v)
    variants = [lorafit, flat, slow]
    assert peers.vs_best_peer(lorafit, variants) == pytest.approx(1.5)
    assert lorafit.result["tokens_per_s"] == 120.0 and lorafit.result["round"] == 2
    assert lorafit.result["peak_rss_kib"] == 30  # the highest of any round
    assert peers.vs_best_peer(flat, variants) == pytest.approx(1.0)
    table = peers.table(variants, peers.parse_args(["--rounds", "3"]))
    assert "| lorafit-packed | 120.0 (75.0-150.0) | 1.50x |" in table


def test_the_flop_count_follows_the_layers_checkpointing_recomputes() -> None:
    """The GPU table's share of the card counts 2 N more FLOPs a token for the recomputed share
    of the layers: every layer, every other one with the `ckpt-every-2` lever, none without
    checkpointing. A wrong share would overstate or understate how much of the card is used."""
    spec = importlib.util.spec_from_file_location("peer_worker", ROOT / "bench" / "peer_worker.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    preset = ["experiment=mistral7b_random_qlora"]  # 32 layers, checkpointing on

    def share(overrides: list[str], kind: str = "lorafit-packed") -> float:
        cfg = compose_config([*preset, *overrides])
        return worker.recomputed_share(cfg, worker.model_config(cfg), kind)

    assert share([]) == 1.0
    assert share(_harness().LEVERS["ckpt-every-2"]) == 0.5
    assert share(["model.checkpoint_every=3"]) == 11 / 32  # layers 0, 3, ..., 30
    assert share(_harness().LEVERS["no-ckpt"]) == 0.0
    assert share(["model.checkpoint_every=2"], kind="hf-flat") == 1.0  # peers: every layer

    peers = _harness()
    rows = []
    for key, recomputed in (("every", 1.0), ("half", 0.5), ("none", 0.0)):
        v = peers.Variant(key, "lorafit-packed", key, 2048, [], True, status="ok")
        v.result = {
            "tokens_per_s": 1000.0,
            "n_params": 10**9,
            "recomputed_share": recomputed,
            "cuda_allocated": 2**30,
            "cuda_reserved": 2**30,
            "cuda_allocated_with_load": 2**30,
            "mean_loss": 1.0,
            "steps": 6,
            "tokens_per_step": 2048.0,
        }
        rows.append(v)
    args = peers.parse_args(["--device", "cuda", "--peak-tflops", "100"])
    table = _table_rows(peers.table(rows, args))
    # 1000 tokens/s x 10^9 parameters x 8, 7 and 6 FLOPs, against 100 TFLOP/s.
    assert [table[k][-1] for k in ("every", "half", "none")] == ["8.0%", "7.0%", "6.0%"]


def test_a_spent_budget_starts_no_further_variant(monkeypatch, tmp_path: Path) -> None:
    """--budget: the variant running when it is spent finishes, later ones are reported skipped
    and the table and the raw results still come out (a leased machine's run ends cleanly)."""
    peers = _harness()
    clock = [0.0]
    monkeypatch.setattr(peers.time, "perf_counter", lambda: clock[0])
    ran = []

    def fake_run(variant, args, folder):
        ran.append(variant.key)
        clock[0] += 60.0  # each variant takes a minute
        variant.result = {"tokens_per_s": 100.0, "peak_rss_kib": 10, "mean_loss": 1.0}
        variant.result |= {"steps": 2, "tokens_per_step": 256.0, "examples_per_step": 2}
        variant.rounds.append(variant.result)
        variant.status = "ok"
        return variant

    monkeypatch.setattr(peers, "run_variant", fake_run)
    out = tmp_path / "raw.json"
    wanted = "lorafit-packed,hf-flat,hf-padded"
    peers.main(["--tiny", "--variants", wanted, "--budget", "90", "--out", str(out)])
    assert ran == ["lorafit-packed", "hf-flat"]  # started at 0 s and 60 s; not at 120 s
    status = {v["key"]: (v["status"], v["note"]) for v in json.loads(out.read_text())["variants"]}
    assert status["hf-padded"] == ("skipped", "not started: 90 s spent")
    assert status["lorafit-packed"][0] == status["hf-flat"][0] == "ok"


def test_a_gpu_worker_builds_the_random_model_before_its_peaks_count(monkeypatch, tmp_path):
    """On an H200 the first variant read 13.5 GiB "with the load" at 2048 tokens where the
    others read their training peak: building the random 7B (bf16, on the GPU) into the cache.
    The worker fills the cache first and starts the peak after it."""
    import torch

    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("peer_worker", ROOT / "bench" / "peer_worker.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    resets = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: resets.append(1))
    cfg = compose_config(["model=tiny_mistral", "model.source.seed=7"])
    worker._fill_model_cache(cfg)
    built = list((tmp_path / "cache" / "models").iterdir())
    assert len(built) == 1 and (built[0] / "config.json").is_file()
    assert resets == [1]
    from hydra.utils import instantiate

    written = (built[0] / "config.json").stat().st_mtime_ns
    assert instantiate(cfg.model.source).prepare() == built[0]
    assert (built[0] / "config.json").stat().st_mtime_ns == written  # found, not built again


def test_the_gpu_busy_share_is_the_union_of_the_kernels_over_the_window() -> None:
    """Overlapping kernels (two streams) count once; the window runs from the first event of
    any kind to the last."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    sys.path.insert(0, str(ROOT / "bench"))
    from peer_worker import gpu_busy_share

    def event(device, start, end):
        return SimpleNamespace(device_type=device, time_range=SimpleNamespace(start=start, end=end))

    cpu, cuda = DeviceType.CPU, DeviceType.CUDA
    events = [event(cpu, 0, 100), event(cuda, 10, 30), event(cuda, 20, 40), event(cuda, 60, 70)]
    assert gpu_busy_share(events) == pytest.approx(0.4)  # 10-40 and 60-70 of 0-100
    # A record_function's range mirrored on the GPU's timeline spans the gaps: not a kernel.
    annotation = event(cuda, 0, 100)
    annotation.is_user_annotation = True
    assert gpu_busy_share([*events, annotation]) == pytest.approx(0.4)
    assert gpu_busy_share([event(cpu, 0, 100)]) is None


@pytest.mark.parametrize(
    ("kernel", "op", "shapes", "kind"),
    [
        (
            "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNN",
            "aten::mm",
            [[2048, 4096], [4096, 14336]],
            "products, base",
        ),
        (
            "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n",
            "aten::mm",
            [[2048, 4096], [4096, 32]],
            "products, LoRA (a side of 64 or less)",
        ),
        (
            "ampere_bf16_s16816gemm_bf16_128x64",
            "aten::addmm",
            [[32], [4096, 2048], [2048, 32]],
            "products, LoRA (a side of 64 or less)",
        ),
        ("triton_tem_fused_mm_0", "triton_tem_fused_mm_0", [], "products, base"),
        (
            "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>",
            "aten::_flash_attention_forward",
            [],
            "attention",
        ),
        (
            "cudnn_generated_fort_native_sdpa_sm90_knob_7",
            "aten::_cudnn_attention_forward",
            [],
            "attention",
        ),
        (
            "void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>",
            "aten::empty",
            [],
            "4-bit dequantization",
        ),
        (
            "triton_poi_fused___rshift____to_copy_arange_bitwise_and_index_mul_view_0",
            "triton_poi_fused___rshift____to_copy_arange_bitwise_and_index_mul_view_0",
            [],
            "4-bit dequantization",
        ),
        ("void kOptimizer32bit2State<float, 0>", "optimizer", [], "optimizer and clipping"),
        (
            "void at::native::multi_tensor_apply_kernel<TensorListMetadata<1>>",
            "aten::_foreach_norm",
            [],
            "optimizer and clipping",
        ),
        (
            "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0",
            "triton_red_fused_0",
            [],
            "compiled elementwise and reductions",
        ),
        (
            "void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>",
            "aten::add_",
            [],
            "eager elementwise and reductions",
        ),
        ("Memcpy HtoD (Pinned -> Device)", "aten::copy_", [], "copies and fills"),
        (
            "triton_poi_fused__scaled_dot_product_flash_attention_transpose_0",
            "triton_poi_fused__scaled_dot_product_flash_attention_transpose_0",
            [],
            "compiled elementwise and reductions",
        ),
    ],
)
def test_a_kernel_s_kind_comes_from_its_name_and_the_op_that_launched_it(
    kernel: str, op: str, shapes: list, kind: str
) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from peer_worker import KINDS, kernel_kind

    assert kernel_kind(kernel, op, shapes) == kind
    assert kind in KINDS


def test_the_kinds_add_up_to_the_kernel_time_with_what_no_op_claims() -> None:
    from types import SimpleNamespace

    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import Kernel

    sys.path.insert(0, str(ROOT / "bench"))
    from peer_worker import gpu_time_by_kind, kinds_table

    def kernel_event(start, end):
        return SimpleNamespace(
            device_type=DeviceType.CUDA, time_range=SimpleNamespace(start=start, end=end)
        )

    def op(name, shapes, *kernels):
        return SimpleNamespace(
            device_type=DeviceType.CPU,
            name=name,
            input_shapes=shapes,
            kernels=[Kernel(k, 0, us) for k, us in kernels],
            time_range=SimpleNamespace(start=0, end=1),
        )

    events = [
        op("aten::mm", [[2048, 4096], [4096, 4096]], ("nvjet_a", 600.0)),
        op("aten::mm", [[2048, 4096], [4096, 32]], ("nvjet_b", 100.0), ("nvjet_c", 100.0)),
        op("aten::add_", [], ("vectorized_elementwise_kernel", 100.0)),
        # Kernel events, each 1,000 us in all: 100 us that no op claims.
        *[kernel_event(0, us) for us in (600.0, 100.0, 100.0, 100.0, 100.0)],
    ]
    annotation = kernel_event(0, 5000.0)  # a record_function's range on the GPU's timeline
    annotation.is_user_annotation = True
    kinds = gpu_time_by_kind([*events, annotation], steps=2)
    # FLOPs of each product over its kernels' time: 2 M K N in 600 us; in the two of 100 us.
    base, lora = 2 * 2048 * 4096 * 4096 / 600e-6 / 1e12, 2 * 2048 * 4096 * 32 / 200e-6 / 1e12
    assert kinds == {
        "products, base": {"ms": 0.3, "share": 0.6, "kernels": 0.5, "tflops": pytest.approx(base)},
        "products, LoRA (a side of 64 or less)": {
            "ms": 0.1,
            "share": 0.2,
            "kernels": 1.0,
            "tflops": pytest.approx(lora),
        },
        "eager elementwise and reductions": {"ms": 0.05, "share": 0.1, "kernels": 0.5},
        "not claimed by an op": {"ms": 0.05, "share": 0.1, "kernels": 0.0},
    }
    table = kinds_table(kinds).splitlines()
    assert table[2] == "| products, base | 0.3 | 60.0% | 0 | 115 |"  # the largest first
    assert table[4] == "| eager elementwise and reductions | 0.1 | 10.0% | 0 | - |"
    assert table[-1] == "| all | 0.5 | 100% | 2 | - |"
    assert gpu_time_by_kind(events[:3], steps=2) is None  # no kernel ran: a CPU profile


def test_a_product_s_flops_come_from_its_operands_shapes() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from peer_worker import product_flops

    assert product_flops([[2048, 4096], [4096, 32]]) == 2 * 2048 * 4096 * 32  # mm
    assert product_flops([[32], [2048, 4096], [4096, 32]]) == 2 * 2048 * 4096 * 32  # addmm
    assert product_flops([[8, 64, 128], [8, 128, 16]]) == 2 * 8 * 64 * 128 * 16  # bmm
    assert product_flops([[2048, 4096], [32, 4096]]) is None  # not a product's shapes
    assert product_flops([]) is None  # shapes not recorded


@pytest.mark.gpu
def test_on_a_gpu_the_profiled_kernels_are_told_apart_by_kind() -> None:
    """The kinds rest on each CUDA kernel being claimed by the aten op that launched it, with
    that op's input shapes: a wide and a thin product and an add, profiled by the bench's own
    meter, come out as three kinds that hold nearly all the kernel time."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    sys.path.insert(0, str(ROOT / "bench"))
    from peer_worker import StepMeter

    meter = StepMeter(warmup=1, cuda=True, profile=True)
    x = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)
    wide = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    thin = torch.randn(4096, 32, device="cuda", dtype=torch.bfloat16)
    for _ in range(4):
        (x @ wide).add_(1.0)
        x @ thin
        meter.step_end()
    kinds = meter.gpu_time_by_kind
    assert {"products, base", "products, LoRA (a side of 64 or less)"} <= set(kinds), kinds
    assert kinds["products, base"]["kernels"] >= 1 and kinds["products, base"]["share"] > 0.5
    assert 50 < kinds["products, base"]["tflops"] < 2000  # an H100's or H200's bf16 range
    assert kinds.get("not claimed by an op", {"share": 0})["share"] < 0.05, kinds
    assert sum(k["share"] for k in kinds.values()) == pytest.approx(1.0)
    assert "GPU kernel time a step, by kind" in meter.profile_table


@pytest.mark.slow
def test_a_profiled_variant_writes_its_trace_beside_the_results(tmp_path: Path) -> None:
    import gzip

    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(HARNESS), "--tiny", "--sequence-len", "256", "--warmup", "1"]
        + ["--steps", "3", "--profile", "lorafit-packed", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    written = tmp_path / "bench-trace-lorafit-packed.json.gz"
    trace = json.loads(gzip.decompress(written.read_bytes()))
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any("aten::" in name for name in names)
    assert "top 25 by self CPU time" in done.stdout


def test_a_compiled_function_past_torch_s_recompile_limit_is_reported() -> None:
    """Past the limit torch runs a function's further variants eager and says so once in a
    warning; the worker keeps what the warning names and the report lists it under the run, so
    a compiled variant's figures are not read as wholly compiled."""
    import logging

    import torch

    spec = importlib.util.spec_from_file_location("peer_worker", ROOT / "bench" / "peer_worker.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    limits = worker.RecompileLimits()
    logger = logging.getLogger(worker.RecompileLimits.LOGGER)
    logger.addHandler(limits)

    def doubled(x):
        return x * 2

    compiled = torch.compile(doubled, backend="eager")
    # torch's own patch: pytest's monkeypatch, undone, deletes the setting from torch's config.
    before = torch._dynamo.config.recompile_limit
    try:
        torch._dynamo.reset()
        with torch._dynamo.config.patch(recompile_limit=1):
            for dtype in (torch.float32, torch.float64):  # a second variant: past a limit of 1
                compiled(torch.ones(2, dtype=dtype))
    finally:
        logger.removeHandler(limits)
        torch._dynamo.reset()
    assert torch._dynamo.config.recompile_limit == before
    assert len(limits.functions) == 1 and "'doubled'" in limits.functions[0]

    peers = _harness()
    v = peers.Variant("compiled", "lorafit-packed", "lorafit packed, compile", 512, [], False)
    v.status = "ok"
    v.result = {"tokens_per_s": 1.0, "mean_loss": 1.0, "steps": 2, "tokens_per_step": 512.0}
    v.result |= {"peak_rss_kib": 1, "examples_per_step": 1}
    v.result["recompile_limit_hit"] = limits.functions
    args = peers.parse_args([])
    args.revision, args.wall_s = "test", 1.0
    report = peers.report([v], args, "data")
    assert "reached torch's recompile limit" in report
    assert f"- lorafit packed, compile: {limits.functions[0]}" in report
