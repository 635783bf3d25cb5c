#!/usr/bin/env bash
# The one GPU check, fitted to a device window of 15 minutes: one run of about 8, time to rerun.
#   1. versions; fastpeft installed without its extension (seconds), the extension's sm_90 build
#      started in the background;
#   2. meanwhile every op's Triton face against the reference (benchmarks/smoke.py), one process
#      per op, in parallel, each with its own timeout: a crash or a wrong result shows in minutes;
#   3. once the extension is built, its CUDA faces the same way;
#   4. `fastpeft bench` per op, NF4 and LoRA first, each with its own timeout, merged into one
#      results file named by date and GPU;
#   5. the face sweep (benchmarks/face_sweep.py): NF4 and LoRA decode over M, each face forced,
#      wall and kernel time: where the dispatch rules' crossovers lie;
#   6. `pytest -m gpu -n 8 --timeout 60` with the time left (8 processes, 60 s a test; in one
#      process, with no per-test limit, where pytest-xdist or pytest-timeout is missing).
# Everything lands under $OUT even when a step times out, in at most 8 files (what comes back):
# device_check.log, build.log, smoke.jsonl, bench.txt, <date>-<gpu>.json, <date>-<gpu>-face-sweep.json,
# tests.txt, pytest.xml.
# Each step writes as it goes: smoke.jsonl a line per face checked, the bench its results file
# after every case (a timed-out op keeps the cases it finished), pytest a line per test (-v) and,
# stopped by SIGINT at its limit, the junit XML of the tests that ended. A bench file that cannot
# be read is left in place (bench-<op>.part) and named in the log.
#   device tool:  run  command="bash benchmarks/device_check.sh"  timeout_s=540  carry=[".whl"]
#   (.whl: bitsandbytes' wheel, which the device lacks; see the device README)
# CPU stand-in, to test this script's plumbing anywhere (Triton interpreted, small shapes; the
# tree's fastpeft and extension as they are: nothing installed, nothing built):
#   FASTPEFT_DEVICE_CHECK_CPU=1 OUT=/tmp/check bash benchmarks/device_check.sh
# Knobs: PYTHON (default python3); FASTPEFT_DEVICE_CHECK_SECONDS, the whole script's budget;
# FASTPEFT_DEVICE_CHECK_OPS, the ops checked and benched, in order; FASTPEFT_DEVICE_CHECK_LIMITS,
# seconds for named steps in place of their own limits ("bench-lora_linear=30 tests=120"; the steps:
# build, smoke-<op>, cpp-smoke-<op>, bench-<op>, sweep, tests); FASTPEFT_DEVICE_CHECK_TESTS, what
# pytest is given besides -m gpu (test files or node ids: a rerun of what failed; default: all).
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
# timeout for step $1: FASTPEFT_DEVICE_CHECK_LIMITS' seconds for it, else its own limit $2; what is
# left of the budget if less (at least 5 s)
limit() {
  local own=$2 item l
  for item in ${FASTPEFT_DEVICE_CHECK_LIMITS:-}; do [ "${item%%=*}" = "$1" ] && own=${item#*=}; done
  l=$(left)
  if [ "$l" -lt "$own" ]; then echo $((l > 5 ? l : 5)); else echo "$own"; fi
}
OPS=${FASTPEFT_DEVICE_CHECK_OPS:-nf4_matmul lora_linear multi_lora phm_linear adapter_block dora_linear dense_linear}

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

if [ "$DEVICE" = cuda ]; then
  log "install without the extension; build it (sm_90) in the background"
  FASTPEFT_NO_EXTENSION=1 $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$LOG" 2>&1
else  # the tree's fastpeft, not whatever an environment shared with other checkouts installed
  log "CPU stand-in: the tree's fastpeft as it is, nothing installed or built"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import sys, torch, triton, pytest; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__, 'pytest', pytest.__version__)" 2>&1 | tee -a "$LOG"
[ "$DEVICE" = cuda ] && GPU=$($PY -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())")
if [ "$DEVICE" = cuda ]; then
  (FASTPEFT_CUDA_ARCH=${FASTPEFT_CUDA_ARCH:-9.0} MAX_JOBS=${MAX_JOBS:-10} timeout "$(limit build 300)" \
     $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; echo "build exit $?" >>"$OUT/build.log") &
else  # an in-place build would replace the tree's own extension (CI's is built with CUDA): say what is there
  (timeout "$(limit build 300)" $PY -c "import fastpeft; e = fastpeft.backends.extension(); \
print('CPU stand-in, not built; in the tree:', e.__file__ if e else fastpeft.backends.extension_error())" \
     >"$OUT/build.log" 2>&1; echo "build exit $?" >>"$OUT/build.log") &
fi
BUILD=$!

log "Triton faces against the reference, an op per process"
for op in $OPS; do
  (timeout "$(limit "smoke-$op" 150)" $PY benchmarks/smoke.py "${SMOKE[@]}" --face triton --op "$op" \
     --jsonl "$OUT/smoke-$op.part" >>"$LOG" 2>&1
   rc=$?; [ $rc -ne 0 ] && log "smoke $op: exit $rc (1: a face failed, 124: timed out)") &
done
wait $(jobs -p | grep -v "^$BUILD$") 2>/dev/null
for part in "$OUT"/smoke-*.part; do  # a line cut by a timeout ends there, not in the next op's first
  [ -f "$part" ] || continue
  cat "$part" >>"$OUT/smoke.jsonl"; [ -n "$(tail -c1 "$part")" ] && echo >>"$OUT/smoke.jsonl"
  rm -f "$part"
done

log "waiting for the extension"
wait "$BUILD"
tail -3 "$OUT/build.log" | tee -a "$LOG"
$PY -m fastpeft.cli info >>"$LOG" 2>&1

log "C++ faces against the reference"
for op in $OPS; do
  case $op in nf4_matmul|lora_linear|multi_lora) ;; *) continue ;; esac  # the ops with C++ faces
  timeout "$(limit "cpp-smoke-$op" 90)" $PY benchmarks/smoke.py "${SMOKE[@]}" --face cuda --face cpu --op "$op" \
    --jsonl "$OUT/smoke.jsonl" >>"$LOG" 2>&1 || log "C++ smoke $op: exit $?"
  [ -n "$(tail -c1 "$OUT/smoke.jsonl" 2>/dev/null)" ] && echo >>"$OUT/smoke.jsonl"
done
$PY - "$OUT/smoke.jsonl" <<'PY' 2>&1 | tee -a "$LOG"
import json, os, sys
rows, cut = [], 0
for line in open(sys.argv[1]) if os.path.exists(sys.argv[1]) else []:
    try:
        rows.append(json.loads(line))
    except ValueError:  # a line a timeout cut short
        cut += 1
bad = [r for r in rows if r.get("ok") is False]
print(f"smoke: {len(rows)} records, {sum(r.get('ok') is True for r in rows)} ok, {len(bad)} failed"
      + (f", {cut} lines cut short" if cut else ""))
for r in bad:
    print("  FAILED", r["op"], r["case"], r["dtype"], r["face"], r.get("error", ""))
PY

log "bench, an op at a time"
for op in $OPS; do
  [ "$(left)" -le 20 ] && { log "bench: no time left for $op"; continue; }
  timeout "$(limit "bench-$op" 100)" $PY -m fastpeft.cli bench "${BENCH[@]}" --op "$op" --no-progress \
    --json "$OUT/bench-$op.part" >>"$OUT/bench.txt" 2>&1 || log "bench $op: exit $?"
done
rm -f "$OUT"/bench-*.part.tmp  # a rewrite a timeout cut short: the .part beside it holds the rows before it
# one results file of every readable part, in the order the ops ran; a part that cannot be read stays
$PY - "$OUT" "$(date -u +%F)-$GPU.json" $OPS <<'PY' 2>&1 | tee -a "$LOG"
import glob, json, os, sys
out, name, ops = sys.argv[1], sys.argv[2], sys.argv[3:]
order = {op: i for i, op in enumerate(ops)}
parts = sorted(glob.glob(os.path.join(out, "bench-*.part")),
               key=lambda p: (order.get(os.path.basename(p)[6:-5], len(order)), p))
merged, partial, unreadable = {"environment": None, "results": []}, [], []
for path in parts:
    try:
        with open(path) as f:
            d = json.load(f)
        rows = d["results"]
        assert isinstance(rows, list), "results is not a list"
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        unreadable.append(f"{os.path.basename(path)} ({type(e).__name__}: {e})")
        continue
    merged["environment"] = merged["environment"] or d.get("environment")
    merged["results"] += rows
    if d.get("partial"):
        partial.append(os.path.basename(path)[6:-5])
    os.remove(path)
if partial:  # as `fastpeft bench` marks a file written before its run ended
    merged["partial"] = True
with open(os.path.join(out, name), "w") as f:
    json.dump(merged, f, indent=2)
print(f"bench: {len(merged['results'])} rows from {len(parts) - len(unreadable)} ops -> {name}"
      + (f"; cut short by a timeout (the cases that finished): {', '.join(partial)}" if partial else ""))
missing = [op for op in ops if not os.path.exists(os.path.join(out, f"bench-{op}.part"))
           and not any(r.get("op") == op for r in merged["results"])]
if missing:
    print(f"bench: no rows from {', '.join(missing)}")
for line in unreadable:
    print(f"bench: left unread in {out}: {line}")
PY

if [ "$DEVICE" = cuda ] && [ "$(left)" -gt 60 ]; then
  log "face sweep: NF4 and LoRA decode over M, every face"
  timeout "$(limit sweep 90)" $PY benchmarks/face_sweep.py --op nf4_matmul --op lora_linear \
    --json "$OUT/$(date -u +%F)-$GPU-face-sweep.json" >>"$OUT/bench.txt" 2>&1 || log "face sweep: exit $?"
fi

log "pytest -m gpu with what is left ($(left) s)"
if [ "$(left)" -gt 20 ]; then
  if $PY -c "import xdist, pytest_timeout" 2>/dev/null; then
    SPREAD=(-n 8 --timeout 60)  # the ~395 variants' JIT compiles spread over 8 processes; a hung test ends
    log "pytest: 8 processes (pytest-xdist), 60 s a test (pytest-timeout)"
  else
    SPREAD=()
    log "pytest-xdist or pytest-timeout missing: the tests run in one process, with no per-test timeout"
  fi
  # -v: a line per test as it ends, so a timeout leaves every result so far in tests.txt. SIGINT at
  # the limit: pytest then prints its summary and writes the junit XML of the tests that ended;
  # KILL 15 s later if it has not stopped (a hung kernel).
  FASTPEFT_REQUIRE_EXTENSION=1 timeout -s INT -k 15 "$(limit tests 600)" $PY -m pytest -v -m gpu "${SPREAD[@]}" \
    -p no:cacheprovider --junitxml="$OUT/pytest.xml" ${FASTPEFT_DEVICE_CHECK_TESTS:-} >"$OUT/tests.txt" 2>&1
  echo "pytest exit $?" >>"$OUT/tests.txt"
  tail -5 "$OUT/tests.txt" | tee -a "$LOG"
fi
log "done"
