#!/usr/bin/env bash
# Run tests on the CPU under the GPU machine's stack (torch 2.11, transformers 5.17, peft 0.21:
# what its CUDA image ships), where a test's outcome may hang on the version rather than the
# card: torch 2.11's compiler gave wrong gradients that torch 2.13 does not (docs/gpu.md).
#
#   scripts/gpu_stack_check.sh [pytest args]   # default: tests/model/test_compiled_layers.py
#
# The venv (LORAFIT_GPU_STACK_VENV, default /tmp/lorafit-gpu-stack) takes PyPI's torch 2.11,
# a CUDA build (about 5 GB with its libraries) that runs on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${LORAFIT_GPU_STACK_VENV:-/tmp/lorafit-gpu-stack}"
STACK=(torch==2.11.0 transformers==5.17.0 peft==0.21.0)
if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet "${STACK[0]}"
    "$VENV/bin/pip" install --quiet -e ".[dev]" "${STACK[@]}"
fi
"$VENV/bin/python" -c "import torch, transformers, peft; print('torch', torch.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__)"
if [[ $# -eq 0 ]]; then
    set -- tests/model/test_compiled_layers.py
fi
exec "$VENV/bin/python" -m pytest -p no:cacheprovider -q "$@"
