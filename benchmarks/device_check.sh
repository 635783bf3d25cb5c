#!/usr/bin/env bash
# The one GPU check, fitted to a device window of 15 minutes: one run of about 8, time to rerun.
#   1. versions; fastpeft installed without its extension (seconds), the extension's sm_90 build
#      started in the background;
#   2. meanwhile every op's Triton face against the reference (benchmarks/smoke.py), one process
#      per op, in parallel, each with its own timeout: a crash or a wrong result shows in minutes;
#   3. once the extension is built, its CUDA faces the same way;
#   4. `fastpeft bench` per op, NF4 and LoRA first, each with its own timeout, merged into one
#      results file named by date and GPU;
#   5. `pytest -m gpu` with the time left.
# Everything lands under $OUT even when a step times out, in at most 8 files (what comes back):
# device_check.log, build.log, smoke.jsonl, bench.txt, <date>-<gpu>.json, tests.txt, pytest.xml.
#   device tool:  run  command="bash benchmarks/device_check.sh"  timeout_s=540  carry=[".whl"]
#   (.whl: bitsandbytes' wheel, which the device lacks; see the device README)
# CPU stand-in, to test this script's plumbing anywhere (Triton interpreted, small shapes):
#   FASTPEFT_DEVICE_CHECK_CPU=1 OUT=/tmp/check bash benchmarks/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/local}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
BUDGET=${FASTPEFT_DEVICE_CHECK_SECONDS:-480}  # the whole script; steps get what is left
LOG="$OUT/device_check.log"
log() { echo "=== $* ($SECONDS s)" | tee -a "$LOG"; }
left() { echo $((BUDGET - SECONDS)); }
# timeout for a step: its own limit, or what is left of the budget if less (at least 5 s)
limit() { local l; l=$(left); [ "$l" -lt "$1" ] && echo $((l > 5 ? l : 5)) || echo "$1"; }

if [ "${FASTPEFT_DEVICE_CHECK_CPU:-0}" != "0" ]; then
  DEVICE=cpu; SMOKE=(--device cpu --quick); BENCH=(--device cpu --quick)
  export TRITON_INTERPRET=1 FASTPEFT_NO_CUDA=1
  GPU=cpu
else
  DEVICE=cuda; SMOKE=(--device cuda); BENCH=(--device cuda)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$LOG"
fi

if ls .whl/*.whl >/dev/null 2>&1; then  # wheels carried for packages the machine lacks
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

log "install without the extension; build it (sm_90) in the background"
FASTPEFT_NO_EXTENSION=1 $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$LOG" 2>&1
$PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tee -a "$LOG"
[ "$DEVICE" = cuda ] && GPU=$($PY -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())")
(FASTPEFT_CUDA_ARCH=${FASTPEFT_CUDA_ARCH:-9.0} MAX_JOBS=${MAX_JOBS:-10} timeout "$(limit 300)" \
   $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; echo "build exit $?" >>"$OUT/build.log") &
BUILD=$!

log "Triton faces against the reference, an op per process"
OPS="nf4_matmul lora_linear multi_lora phm_linear adapter_block dora_linear"
for op in $OPS; do
  timeout "$(limit 150)" $PY benchmarks/smoke.py "${SMOKE[@]}" --face triton --op "$op" \
    --jsonl "$OUT/smoke-$op.part" >>"$LOG" 2>&1 &
done
wait $(jobs -p | grep -v "^$BUILD$") 2>/dev/null
cat "$OUT"/smoke-*.part >>"$OUT/smoke.jsonl" 2>/dev/null; rm -f "$OUT"/smoke-*.part

log "waiting for the extension"
wait "$BUILD"
tail -3 "$OUT/build.log" | tee -a "$LOG"
$PY -m fastpeft.cli info >>"$LOG" 2>&1

log "C++ faces against the reference"
for op in nf4_matmul lora_linear multi_lora; do
  timeout "$(limit 90)" $PY benchmarks/smoke.py "${SMOKE[@]}" --face cuda --face cpu --op "$op" \
    --jsonl "$OUT/smoke.jsonl" >>"$LOG" 2>&1
done
$PY - "$OUT/smoke.jsonl" <<'PY' 2>&1 | tee -a "$LOG"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])] if __import__("os").path.exists(sys.argv[1]) else []
bad = [r for r in rows if r.get("ok") is False]
print(f"smoke: {len(rows)} records, {sum(r.get('ok') is True for r in rows)} ok, {len(bad)} failed")
for r in bad:
    print("  FAILED", r["op"], r["case"], r["dtype"], r["face"], r.get("error", ""))
PY

log "bench, an op at a time"
for op in nf4_matmul lora_linear multi_lora phm_linear adapter_block dora_linear; do
  [ "$(left)" -le 20 ] && { log "bench: no time left for $op"; continue; }
  timeout "$(limit 100)" $PY -m fastpeft.cli bench "${BENCH[@]}" --op "$op" --no-progress \
    --json "$OUT/bench-$op.part" >>"$OUT/bench.txt" 2>&1 || log "bench $op: exit $?"
done
$PY - "$OUT" "$(date -u +%F)-$GPU.json" <<'PY' 2>&1 | tee -a "$LOG"
import glob, json, os, sys
out, name = sys.argv[1], sys.argv[2]
parts = sorted(glob.glob(os.path.join(out, "bench-*.part")))
merged = {"environment": None, "results": []}
for path in parts:
    with open(path) as f:
        d = json.load(f)
    merged["environment"] = merged["environment"] or d["environment"]
    merged["results"] += d["results"]
    os.remove(path)
with open(os.path.join(out, name), "w") as f:
    json.dump(merged, f, indent=2)
print(f"bench: {len(merged['results'])} rows from {len(parts)} ops -> {name}")
PY

log "pytest -m gpu with what is left ($(left) s)"
if [ "$(left)" -gt 20 ]; then
  FASTPEFT_REQUIRE_EXTENSION=1 timeout "$(limit 600)" $PY -m pytest -q -m gpu -p no:cacheprovider \
    --junitxml="$OUT/pytest.xml" >"$OUT/tests.txt" 2>&1
  echo "pytest exit $?" >>"$OUT/tests.txt"
  tail -5 "$OUT/tests.txt" | tee -a "$LOG"
fi
log "done"
