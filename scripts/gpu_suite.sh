#!/usr/bin/env bash
# The GPU suite on a CUDA machine with no network: install what it lacks from wheels carried
# beside the checkout, then run `pytest -m gpu` (the canonical job on Mistral-7B's shape, eval,
# generate, export, LoRA and 8-bit LoRA, flash-attention isolation where flash-attn exists).
#
#   scripts/gpu_suite.sh fetch              # on a machine with PyPI: fill wheels/ (~45 MB)
#   scripts/gpu_suite.sh run [pytest args]  # on the GPU machine, from the repository root
#   LORAFIT_GPU_DRY_RUN=1 scripts/gpu_suite.sh run   # the same on a CPU, shrunk: a rehearsal
#   scripts/gpu_suite.sh bench [peers args] # bench/peers.py --device cuda: lorafit vs its peers
#   scripts/gpu_suite.sh dequantize [args]  # bench/dequantize.py --device cuda: 4-bit weights
#
# The GPU machine needs Python 3.12 (PYTHON_VERSION to fetch for another) with a CUDA torch,
# transformers>=5, peft, lightning, torchmetrics, safetensors, sentencepiece, protobuf,
# huggingface_hub, pandas, pyarrow, xxhash, rich, matplotlib, tensorboard and pytest, as CUDA
# images ship them. `fetch` adds what those images lack, pinned to what the suite was run with:
#   bitsandbytes==0.50.2              4-bit and 8-bit quantization, paged AdamW (43 MB)
#   hydra-core==1.3.8, omegaconf==2.3.1, antlr4-python3-runtime==4.9.3 (an sdist: built here)
#   datasets==5.2.0, dill==0.4.1, multiprocess==0.70.19
#   liger-kernel==0.8.5               Triton kernels of `model.liger_kernels` (pure Python; the
#                                     images' CUDA torch brings Triton)
#   mistral-common==1.13.1: only its data/tokenizer.model.v1 (0.5 MB), the Mistral tokenizer
# `run` installs them into a private folder (no index, nothing else touched), puts it and src/
# on PYTHONPATH (no pip install of lorafit), prints the card and the stack, runs the suite, and
# leaves its figures as JSON in $LORAFIT_GPU_RESULTS (default outputs/gpu-results).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS="${LORAFIT_WHEELS:-wheels}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
BINARY_WHEELS=(
    bitsandbytes==0.50.2
    hydra-core==1.3.8
    omegaconf==2.3.1
    datasets==5.2.0
    dill==0.4.1
    multiprocess==0.70.19
    liger-kernel==0.8.5
)
TOKENIZER_PACKAGE=mistral-common==1.13.1
TOKENIZER_FILE=mistral_common/data/tokenizer.model.v1

fetch() {
    mkdir -p "$WHEELS"
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version "$PYTHON_VERSION" --implementation cp \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any \
        --dest "$WHEELS" "${BINARY_WHEELS[@]}"
    # antlr4 4.9.3 (what omegaconf 2.3 needs) exists only as an sdist; its wheel is pure Python.
    python3 -m pip wheel --quiet --no-deps --wheel-dir "$WHEELS" antlr4-python3-runtime==4.9.3
    local tmp
    tmp="$(mktemp -d)"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" \
        "$TOKENIZER_PACKAGE"
    python3 -m zipfile -e "$tmp"/mistral_common-*.whl "$tmp/unpacked"
    mkdir -p "$WHEELS/$(dirname "$TOKENIZER_FILE")"
    cp "$tmp/unpacked/$TOKENIZER_FILE" "$WHEELS/$TOKENIZER_FILE"
    rm -rf "$tmp"
    du -sh "$WHEELS"
}

setup() {
    if [[ ! -f "$WHEELS/$TOKENIZER_FILE" ]]; then
        echo "no $WHEELS/: run 'scripts/gpu_suite.sh fetch' where PyPI is reachable" >&2
        exit 2
    fi
    local site="${LORAFIT_GPU_SITE:-/tmp/lorafit-gpu-site}"
    # Installed once a machine: later calls (bench, then run) find the same wheels in place.
    local stamp="$site/.lorafit-wheels" wanted
    wanted="$(cd "$WHEELS" && ls -l ./*.whl)"
    if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$wanted" ]]; then
        python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$site" "$WHEELS"/*.whl
        printf '%s\n' "$wanted" >"$stamp"
    fi
    # Only the tokenizer file: lorafit finds it by the package's location, never imports it.
    mkdir -p "$site/$(dirname "$TOKENIZER_FILE")"
    cp "$WHEELS/$TOKENIZER_FILE" "$site/$TOKENIZER_FILE"
    export PYTHONPATH="$PWD/src:$site${PYTHONPATH:+:$PYTHONPATH}"
    export LORAFIT_GPU_RESULTS="${LORAFIT_GPU_RESULTS:-$PWD/outputs/gpu-results}"
    export PYTHONUNBUFFERED=1
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
        --format=csv,noheader
    python3 - <<'EOF'
from importlib.metadata import version

import torch

import bitsandbytes, datasets, hydra, lightning, lorafit, peft, transformers  # noqa: F401

card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print("card:", card)
for name in ("torch", "transformers", "peft", "lightning", "bitsandbytes", "hydra-core",
             "datasets", "liger-kernel"):
    print(f"{name} {version(name)}")
EOF
}

run() {
    setup
    python3 -m pytest -m gpu -p no:cacheprovider -v -rs --durations=0 "$@"
    echo "figures: $LORAFIT_GPU_RESULTS"
}

bench() {
    setup
    python3 bench/peers.py --device cuda "$@"
}

dequantize() {
    setup
    python3 bench/dequantize.py --device cuda "$@"
}

case "${1:-}" in
    fetch) fetch ;;
    run) shift; run "$@" ;;
    bench) shift; bench "$@" ;;
    dequantize) shift; dequantize "$@" ;;
    *) sed -n '2,10p' "$0" >&2; exit 2 ;;
esac
