#!/usr/bin/env bash
# GPU check: build the CUDA extension in place, run the cuda- and triton-marked tests and the GPU
# nearest-code benchmarks, and print a short table last. Installs nothing from the network.
#
#   bash benchmarks/gpu_check.sh            # from anywhere; works in the repository root
#
# Needs a CUDA PyTorch at $PYTHON (default python3), nvcc, triton. Finishes in under 8 minutes on
# one H100: every step runs under `timeout`, limited by what is left of GPU_CHECK_DEADLINE_S
# (default 450 s) with time kept back for the benchmarks. A failing step is reported and the
# script goes on; the exit status is non-zero if any step failed. Results (CSV, markdown, PNG)
# go to benchmarks/results/; with $OUT set they and the step logs are copied there too.
#
# Environment: PYTHON, GPU_CHECK_DEADLINE_S, GPU_CHECK_SKIP_BUILD=1 (reuse an existing build),
# GPU_CHECK_SHAPES (default "gpu": see benchmarks/nearest_code.py), LGVQ_CUDA_ARCHS (default:
# this GPU's compute capability), MAX_JOBS (default: number of CPUs).
set -u
# Correctness tests sweep many shapes: one heuristic Triton config each instead of autotuning
# dozens (the report re-enables tuning for its timed runs).
export LGVQ_TRITON_AUTOTUNE=${LGVQ_TRITON_AUTOTUNE:-0}
cd "$(dirname "$0")/.." || exit 2

PY=${PYTHON:-python3}
START=$(date +%s)
DEADLINE=${GPU_CHECK_DEADLINE_S:-450}
BENCH_RESERVE=130   # seconds kept for the benchmark step while earlier steps run
RESULTS=benchmarks/results
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/lgvq_gpu_check.XXXXXX")
touch "$LOGS/.start"
mkdir -p "$RESULTS"
FAILED=0
SUMMARY=()

elapsed() { echo $(( $(date +%s) - START )); }

# step NAME LIMIT_S RESERVE_S TAIL_LINES command... : run under timeout, log, record the status
step() {
  local name=$1 limit=$2 reserve=$3 tail_lines=$4
  shift 4
  local left=$(( DEADLINE - $(elapsed) - reserve - 10 ))
  if (( left < 15 )); then
    SUMMARY+=("$(printf '%-14s %-28s %5ss' "$name" "SKIPPED (out of time)" 0)")
    FAILED=1
    echo "=== $name: skipped, out of time"
    return
  fi
  (( limit > left )) && limit=$left
  echo "=== $name (limit ${limit}s, at $(elapsed)s)"
  local t0
  t0=$(date +%s)
  if declare -F "$1" >/dev/null; then  # a function of this script: run it in a child bash
    timeout --kill-after=10 "$limit" bash -c "$1" >"$LOGS/$name.log" 2>&1
  else
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  fi
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  tail -n "$tail_lines" "$LOGS/$name.log"
  local status="OK"
  if (( rc == 124 || rc == 137 )); then
    status="TIMEOUT after ${limit}s"; FAILED=1
  elif [[ $name == tests-* ]] && (( rc == 5 )); then
    status="OK (no tests collected)"
  elif (( rc != 0 )); then
    status="FAILED (exit $rc)"; FAILED=1
  fi
  SUMMARY+=("$(printf '%-14s %-28s %5ss' "$name" "$status" "$took")")
}

environment() {
  nvidia-smi -L || echo "nvidia-smi failed"
  "$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda,
      "available", torch.cuda.is_available())
try:
    import triton
    print("triton", triton.__version__)
except Exception as error:
    print("triton not importable:", error)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"sm_{p.major}{p.minor}")
else:
    raise SystemExit("torch.cuda is not available")
EOF
}

build() {
  if [[ ${GPU_CHECK_SKIP_BUILD:-0} == 1 ]]; then
    echo "GPU_CHECK_SKIP_BUILD=1: using the existing build"
  else
    local arch
    arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || arch=""
    export LGVQ_CUDA_ARCHS=${LGVQ_CUDA_ARCHS:-$arch}
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    echo "building for arch ${LGVQ_CUDA_ARCHS:-default} with MAX_JOBS=$MAX_JOBS"
    # --no-index: never the network; --no-build-isolation: this torch, not a fetched one
    "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . \
      || { echo "pip failed; trying setup.py build_ext --inplace"; \
           "$PY" setup.py build_ext --inplace; }
  fi
  # setup.py only warns on a failed compile: check that the CUDA kernels really are there
  "$PY" - <<'EOF'
import torch, lgvq_kernels
missing = []
for op in lgvq_kernels.OPS:
    info = lgvq_kernels.available_backends(op, "cuda")
    for name, backend in info.items():
        state = "available" if backend.available else "UNAVAILABLE: " + backend.reason
        print(f"{op}: backend {name}: {state}")
    if not info["native"].available:
        missing.append(op)
raise SystemExit(f"the native CUDA backend is unavailable for {missing}" if missing else 0)
EOF
}

bench() {
  LGVQ_TRITON_AUTOTUNE=1 "$PY" -m benchmarks.report --device cuda --ops nearest_code \
    --shapes ${GPU_CHECK_SHAPES:-gpu} --dtypes float32 tf32 bfloat16 \
    --providers lgvq-native lgvq-triton torch-addmm-argmin gemm \
    --repeats 10 --max-case-seconds 2 --out "$RESULTS" --summary "$LOGS/short_table.md"
  "$PY" -m benchmarks.report --device cuda --ops quantizer --shapes gpu --dtypes float32 \
    --providers lgvq-native lgvq-triton vqp --repeats 5 --max-case-seconds 2 --no-memory \
    --out "$RESULTS" --summary "$LOGS/short_table_quantizer.md"
  "$PY" -m benchmarks.report --device cuda --ops relation --shapes gpu --dtypes float32 \
    --repeats 5 --max-case-seconds 2 --no-memory --out "$RESULTS" \
    --summary "$LOGS/short_table_relation.md"
  "$PY" -m benchmarks.report --device cuda --ops lgvq_step --shapes gpu --dtypes float32 \
    --providers vq lgvq --repeats 5 --max-case-seconds 4 --no-memory --out "$RESULTS" \
    --summary "$LOGS/short_table_lgvq_step.md"
}

export -f environment build bench
export PY RESULTS LOGS

step environment 60 "$BENCH_RESERVE" 12 environment
step build 270 "$BENCH_RESERVE" 15 build
step tests-cuda 90 "$BENCH_RESERVE" 15 "$PY" -m pytest tests -m cuda -q -p no:cacheprovider
step tests-triton 90 "$BENCH_RESERVE" 15 \
  env -u TRITON_INTERPRET "$PY" -m pytest tests -m triton -q -p no:cacheprovider
step bench 300 0 40 bench

if [[ -n ${OUT:-} ]]; then
  mkdir -p "$OUT/results" "$OUT/logs"
  find "$RESULTS" -maxdepth 1 -type f -newer "$LOGS/.start" -exec cp {} "$OUT/results/" \;
  cp "$LOGS"/*.log "$OUT/logs/" 2>/dev/null
  [[ -f $LOGS/short_table.md ]] && cp "$LOGS/short_table.md" "$OUT/"
  [[ -f $LOGS/short_table_quantizer.md ]] && cp "$LOGS/short_table_quantizer.md" "$OUT/"
  echo "copied results and logs to $OUT"
fi

echo
echo "=== gpu_check summary ($(elapsed)s in all; logs in $LOGS)"
printf '%s\n' "${SUMMARY[@]}"
echo
if [[ -f $LOGS/short_table.md ]]; then
  cat "$LOGS/short_table.md"
  [[ -f $LOGS/short_table_quantizer.md ]] && cat "$LOGS/short_table_quantizer.md"
else
  echo "(no benchmark table: the bench step did not get far enough)"
fi
if (( FAILED )); then
  echo "gpu_check: FAILED (see the summary above)"
  exit 1
fi
echo "gpu_check: all steps passed"
