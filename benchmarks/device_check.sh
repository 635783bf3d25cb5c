#!/usr/bin/env bash
# The one GPU check: build fastpeft on the GPU machine, run the `gpu` tests there (every face on
# cuda, the CUDA C++ faces included: nf4_matmul's GEMV has not run on a GPU before), run
# `fastpeft bench`, and leave everything under $OUT. Budget: under 8 minutes.
#   device tool:  run  command="bash benchmarks/device_check.sh"  timeout_s=540  (carry .whl for bitsandbytes)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/local}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
t0=$SECONDS
log() { echo "=== $* ($((SECONDS - t0)) s)" | tee -a "$OUT/device_check.log"; }

if ls .whl/*.whl >/dev/null 2>&1; then  # wheels carried for packages the machine lacks
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

log "build (sm_90 only: this machine)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/device_check.log"
FASTPEFT_CUDA_ARCH=${FASTPEFT_CUDA_ARCH:-9.0} MAX_JOBS=16 \
  $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -20 | tee -a "$OUT/device_check.log"
$PY -m fastpeft.cli info 2>&1 | tee "$OUT/info.txt"

log "tests (the gpu-marked ones: every face on cuda; the CPU suite runs in CI)"
FASTPEFT_REQUIRE_EXTENSION=1 FASTPEFT_REQUIRE_CUDA_BUILD=1 timeout 240 $PY -m pytest -q -m gpu -p no:cacheprovider \
  --junitxml="$OUT/pytest.xml" 2>&1 | tail -40 | tee "$OUT/tests.txt"

log "bench"
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())")
timeout 180 $PY -m fastpeft.cli bench --no-progress --json "$OUT/$(date -u +%F)-$gpu.json" --plot "$OUT/bench-$gpu.png" \
  2>&1 | tee "$OUT/bench.txt"
log "done"
