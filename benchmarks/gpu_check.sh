#!/usr/bin/env bash
# GPU check: build the CUDA extension in place, run the cuda- and triton-marked tests and the GPU
# benchmarks, and print a short table last. Installs nothing from the network.
#
#   bash benchmarks/gpu_check.sh             # from anywhere; works in the repository root
#   bash benchmarks/gpu_check.sh --dry-run   # print the step plan and its time budget, run nothing
#
# Made for one borrowed H200 (one call of at most 10 minutes, no network, at most 8 files back):
# the whole script, build included, stays inside GPU_CHECK_DEADLINE_S (default 465 s) plus
# packing (seconds), under 8 minutes. Every step runs under `timeout` with its own limit, cut to what is left of the
# deadline less the time kept for the steps after it; a failing or timed-out step is reported
# and the script goes on; the exit status is non-zero if any step failed.
#
# Needs a CUDA PyTorch at $PYTHON (default python3), nvcc, triton. Packages the image lacks
# (vector-quantize-pytorch and its small dependencies) are installed from benchmarks/wheels/
# when that folder is there (bash benchmarks/gpu_wheels.sh fills it on a machine with network);
# the tests that need them, or the MiniLM weights, skip otherwise.
#
# With $OUT set, two files come back there: gpu_check_summary.md (steps, environment, the short
# tables) and gpu_check.tar.gz (result CSV/markdown/PNG and every step log).
#
# Environment: PYTHON, GPU_CHECK_DEADLINE_S, GPU_CHECK_SKIP_BUILD=1 (reuse an existing build),
# LGVQ_CUDA_ARCHS (default: this GPU's compute capability), MAX_JOBS (default: number of CPUs).
set -u
cd "$(dirname "$0")/.." || exit 2

DRY_RUN=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (expected --dry-run)"; exit 2 ;;
  esac
done

# Correctness tests sweep many shapes: one heuristic Triton config each instead of autotuning
# (the timed benchmark steps re-enable tuning, capped at 3 configs per shape key).
export LGVQ_TRITON_AUTOTUNE=${LGVQ_TRITON_AUTOTUNE:-0}
export PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1
START=$(date +%s)
DEADLINE=${GPU_CHECK_DEADLINE_S:-465}
export RESULTS=benchmarks/results
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/lgvq_gpu_check.XXXXXX")
export LOGS
touch "$LOGS/.start"
FAILED=0
SUMMARY=()

# The plan: step name, limit (s), log lines shown. A step may use at most its limit and never
# the time kept for the limits of the steps after it. The limits sum to the default deadline.
PLAN=(
  "environment     15 12"
  "wheels          20  6"
  "build          170 15"
  "tests-cuda      55 15"
  "tests-triton    85 15"
  "bench-nearest   50 25"
  "bench-ieee      20 10"
  "bench-quantizer 20 10"
  "bench-relation  15 10"
  "bench-step      15 10"
)

elapsed() { echo $(( $(date +%s) - START )); }

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
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"sm_{p.major}{p.minor}",
          f"{p.multi_processor_count} SMs")
else:
    raise SystemExit("torch.cuda is not available")
EOF
}

wheels() {
  if [[ ! -d benchmarks/wheels ]] || ! ls benchmarks/wheels/*.whl >/dev/null 2>&1; then
    echo "no benchmarks/wheels/*.whl: vector-quantize-pytorch tests and columns will skip"
    return 0
  fi
  # into a folder of this run, never the image's site-packages
  "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
    --find-links benchmarks/wheels --target "$LOGS/site" benchmarks/wheels/*.whl
  PYTHONPATH="$LOGS/site${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
    "import vector_quantize_pytorch, einx; print('vector-quantize-pytorch importable')"
}

build() {
  if [[ ${GPU_CHECK_SKIP_BUILD:-0} == 1 ]]; then
    echo "GPU_CHECK_SKIP_BUILD=1: using the existing build"
  else
    local arch
    arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || arch=""
    export LGVQ_CUDA_ARCHS=${LGVQ_CUDA_ARCHS:-$arch}
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    # torch takes CUDA_HOME from `which nvcc` when unset; an nvcc outside the toolkit (a copy
    # in /usr/local/bin) gives an include path without cuda_runtime.h
    if [[ -z ${CUDA_HOME:-} ]]; then
      local home
      for home in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"; do
        [[ -f $home/include/cuda_runtime.h ]] && { export CUDA_HOME=$home; break; }
      done
    fi
    echo "CUDA_HOME=${CUDA_HOME:-unset}; nvcc: $(command -v nvcc)"
    echo "building for arch ${LGVQ_CUDA_ARCHS:-default} with MAX_JOBS=$MAX_JOBS"
    # in place, no pip: nothing fetched, nothing installed into the image
    "$PY" setup.py build_ext --inplace
  fi
  # setup.py only warns on a failed compile: check that the CUDA kernels really are there
  "$PY" - <<'EOF'
import lgvq_kernels
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

tests_cuda() {
  "$PY" -m pytest tests -m cuda -q -p no:cacheprovider
}

# The Triton tests compile into a cache of their own, so that the number of kernel
# specialisations they build is counted (one cubin each) and no cached build is reused.
tests_triton() {
  local cache="$LOGS/triton_cache" rc
  rm -rf "$cache" && mkdir -p "$cache"
  TRITON_CACHE_DIR=$cache env -u TRITON_INTERPRET "$PY" -m pytest tests/kernels -m triton -q \
    -p no:cacheprovider
  rc=$?
  echo "Triton kernel specialisations compiled by these tests: $(find "$cache" -name '*.cubin' | wc -l)"
  rm -rf "$cache"  # not packed: the count is what comes back
  return $rc
}

# Benchmarks: shapes that finish in seconds on an H100/H200; tf32 and bf16 are the headline
# dtypes, fp32 "ieee" (FMA, no tensor cores) only at one small shape; autotuning capped at 3
# configs per shape key, its first (tuning) call inside the step's limit.
report() {
  "$PY" -m benchmarks.report --device cuda --out "$RESULTS" --no-plot "$@"
}

bench_nearest() {
  LGVQ_TRITON_AUTOTUNE=1 LGVQ_TRITON_AUTOTUNE_CONFIGS=3 report --ops nearest_code \
    --shapes 16384x1024x256 16384x16384x256 65536x16384x8 8192x16384x8:cosine 64x262144x256 \
    --dtypes tf32 bfloat16 --providers lgvq-native lgvq-triton torch-addmm-argmin gemm \
    --repeats 10 --max-case-seconds 1 --no-memory --summary "$LOGS/short_table.md"
}

bench_ieee() {
  LGVQ_TRITON_AUTOTUNE=0 report --ops nearest_code --shapes 4096x1024x64 --dtypes float32 \
    --providers lgvq-native lgvq-triton torch-addmm-argmin --repeats 5 --max-case-seconds 1 \
    --no-memory --tag ieee --summary "$LOGS/short_table_ieee.md"
}

bench_quantizer() {
  report --ops quantizer --shapes gpu --dtypes float32 --providers lgvq-native lgvq-triton vqp \
    --repeats 5 --max-case-seconds 1 --no-memory --summary "$LOGS/short_table_quantizer.md"
}

bench_relation() {
  report --ops relation --shapes gpu --dtypes float32 --repeats 5 --max-case-seconds 1 \
    --no-memory --summary "$LOGS/short_table_relation.md"
}

bench_step() {
  report --ops lgvq_step --shapes gpu --dtypes float32 --providers vq lgvq --repeats 5 \
    --max-case-seconds 2 --no-memory --summary "$LOGS/short_table_lgvq_step.md"
}

export -f environment wheels build tests_cuda tests_triton report bench_nearest bench_ieee \
  bench_quantizer bench_relation bench_step

# step NAME LIMIT_S RESERVE_S TAIL_LINES: run the function named after the step under timeout
step() {
  local name=$1 limit=$2 reserve=$3 tail_lines=$4
  local left=$(( DEADLINE - $(elapsed) - reserve ))
  if (( left < 5 )); then
    SUMMARY+=("$(printf '| %-15s | %-24s | %5s |' "$name" "SKIPPED (out of time)" 0)")
    FAILED=1
    echo "=== $name: skipped, out of time"
    return
  fi
  (( limit > left )) && limit=$left
  echo "=== $name (limit ${limit}s, at $(elapsed)s)"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" bash -c "${name//-/_}" >"$LOGS/$name.log" 2>&1
  rc=$?
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
  SUMMARY+=("$(printf '| %-15s | %-24s | %5s |' "$name" "$status" "$took")")
}

# seconds kept back for the steps after each one: the sum of their limits
RESERVE=()
kept=0
for (( i = ${#PLAN[@]} - 1; i >= 0; i-- )); do
  RESERVE[i]=$kept
  read -r _ limit _ <<<"${PLAN[i]}"
  kept=$(( kept + limit ))
done
TOTAL=$kept

if (( DRY_RUN )); then
  echo "gpu_check plan: deadline ${DEADLINE}s (GPU_CHECK_DEADLINE_S), then packing; a step's"
  echo "limit is cut to what is left of the deadline less the time kept for the later steps."
  printf '  %-16s %8s %10s\n' step "limit s" "kept back"
  for i in "${!PLAN[@]}"; do
    read -r name limit _ <<<"${PLAN[i]}"
    printf '  %-16s %8s %10s\n' "$name" "$limit" "${RESERVE[i]}"
    declare -F "${name//-/_}" >/dev/null || { echo "no function for step $name"; exit 1; }
  done
  echo "  sum of limits: ${TOTAL}s; deadline: ${DEADLINE}s (under 480 s, 8 minutes)"
  echo "  outputs: \$OUT/gpu_check_summary.md, \$OUT/gpu_check.tar.gz"
  (( TOTAL <= DEADLINE && DEADLINE <= 480 )) || { echo "the plan does not fit 8 minutes"; exit 1; }
  ls benchmarks/wheels/*.whl >/dev/null 2>&1 && echo "  wheels: $(ls benchmarks/wheels/*.whl | wc -l) in benchmarks/wheels" \
    || echo "  wheels: none (bash benchmarks/gpu_wheels.sh): vector-quantize-pytorch will skip"
  rm -rf "$LOGS"
  exit 0
fi

mkdir -p "$RESULTS"
for i in "${!PLAN[@]}"; do
  read -r name limit tail_lines <<<"${PLAN[i]}"
  step "$name" "$limit" "${RESERVE[i]}" "$tail_lines"
  # the wheels step's packages are visible to every later step
  [[ $name == wheels && -d $LOGS/site ]] && export PYTHONPATH="$LOGS/site${PYTHONPATH:+:$PYTHONPATH}"
done

summary() {
  echo "# gpu_check summary"
  echo
  echo "$(elapsed) s in all; $(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo '| step            | status                   | s     |'
  echo '| --------------- | ------------------------ | ----- |'
  printf '%s\n' "${SUMMARY[@]}"
  echo
  echo '## environment'
  echo
  echo '```'
  cat "$LOGS/environment.log" 2>/dev/null
  echo '```'
  for table in short_table short_table_ieee short_table_quantizer short_table_relation \
               short_table_lgvq_step; do
    if [[ -f $LOGS/$table.md ]]; then
      echo
      cat "$LOGS/$table.md"
    fi
  done
  (( FAILED )) && { echo; echo "gpu_check: FAILED (see the steps above and their logs)"; }
}

summary >"$LOGS/gpu_check_summary.md"
if [[ -n ${OUT:-} ]]; then
  mkdir -p "$OUT" "$LOGS/pack/results" "$LOGS/pack/logs"
  find "$RESULTS" -maxdepth 1 -type f -newer "$LOGS/.start" -exec cp {} "$LOGS/pack/results/" \;
  cp "$LOGS"/*.log "$LOGS"/*.md "$LOGS/pack/logs/" 2>/dev/null
  tar -czf "$OUT/gpu_check.tar.gz" -C "$LOGS/pack" results logs
  cp "$LOGS/gpu_check_summary.md" "$OUT/"
  echo "wrote $OUT/gpu_check_summary.md and $OUT/gpu_check.tar.gz"
fi

echo
cat "$LOGS/gpu_check_summary.md"
if (( FAILED )); then
  exit 1
fi
echo "gpu_check: all steps passed"
