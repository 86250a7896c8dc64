#!/usr/bin/env bash
# Everything the GPU path needs proven, in one command, on a bare GPU machine
# (torch + CUDA toolkit + Python already there, no network), about 8 minutes:
#
#   1. build leet_compile with the CUDA kernels for sm_90 (editable, --no-build-isolation,
#      the machine's torch); if that fails, build without them so that the rest still runs
#   2. GPU tests: tests/test_gpu.py (every backend, the Triton kernels compiled for the GPU),
#      tests/test_cuda_kernels.py
#   3. torch.compile(backend="leet") and an AOTInductor package hold our Triton kernels,
#      the package runs without leet_compile (benchmarks/gpu_compile_check.py)
#   4. the side-by-side benchmark: benchmarks/run.py gpu-decode gpu (our Triton and CUDA
#      paths, fla chunk_simple_gla with g_gamma and g, fused_recurrent_simple_gla, the naive
#      form eager and compiled; B=8 H=16 K=V=128 bf16, T=1024..32768, fwd and fwd+bwd; the
#      decode step), saved as <device>.json/.md and <device>_decode.json/.md; it stops
#      starting measurements at a deadline so that the script ends within its budget
#   5. tests/test_triton.py (the kernels interpreted, as in CI), with what is left
#
# Each part runs under its own time limit, and a failing part does not stop the others.
# Writes under $OUT (default ./gpu_check_out): summary.md (statuses, versions, tables),
# gpu_check.log (every part's output), build.log, and the benchmark's json/md files
# (at most 8 files: what the device tool brings back).
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run    # on a CPU: the same parts at tiny sizes, Triton
#                                             # interpreted (TRITON_INTERPRET=1), no CUDA build
#
# Wheels the GPU image lacks travel in .whl/ (ignored by git; name it in the device tool's
# carry): e.g. fla-core for the side-by-side, and setuptools>=77 if the image's is older:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl fla-core==0.6.0 setuptools==84.2.1
# They are installed with --target into a private folder on PYTHONPATH (nothing else changes).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_check_out}
BUDGET=${GPU_CHECK_BUDGET:-480}   # seconds for the whole script
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/summary.md
: > "$LOG"
T0=$(date +%s)
declare -a STATUS
export PYTHONUNBUFFERED=1

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# part NAME LIMIT_SECONDS CMD...: runs CMD with a limit (capped by what is left of the
# budget), appends its output to the log, records PASS / FAIL rc / TIMEOUT.
part() {
  local name=$1 limit=$2; shift 2
  local l; l=$(left); [ "$limit" -gt "$l" ] && limit=$l
  if [ "$limit" -lt 10 ]; then STATUS+=("| $name | NOT RUN (budget spent) | |"); echo "== $name: not run, budget spent" | tee -a "$LOG"; return 1; fi
  echo "== $name (limit ${limit}s, $(( $(date +%s) - T0 ))s elapsed): $*" | tee -a "$LOG"
  local s=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$? d=$(( $(date +%s) - s ))
  local st="PASS"; [ $rc -ne 0 ] && st="FAIL (rc $rc)"; [ $rc -eq 124 ] || [ $rc -eq 137 ] && st="TIMEOUT after ${limit}s"
  [ $rc -eq 5 ] && [ "${3:-}" = "pytest" ] && { st="SKIPPED (pytest ran no test: see the skip reasons)"; rc=0; }
  STATUS+=("| $name | $st | ${d}s |")
  tail -n 3 "$LOG" | sed 's/^/      /'
  echo "   -> $st in ${d}s" | tee -a "$LOG"
  return $rc
}

# ---- 0. environment and carried wheels
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  SITE=/tmp/leet-gpu-check-site
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl >> "$LOG" 2>&1 \
    && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} && echo "carried wheels: $(ls .whl | tr '\n' ' ')" >> "$LOG"
fi
{
  echo "== environment"; date -u; uname -a; nproc
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  command -v nvcc >/dev/null && nvcc --version | tail -2
  $PY - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for m in ("triton", "fla", "setuptools", "pytest", "einops"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "unavailable:", type(e).__name__)
EOF
} >> "$LOG" 2>&1
cat "$LOG"
ENV_LINES=$(grep -E "^python |^triton |^fla |^NVIDIA|^name, |^Cuda compilation|carried wheels" "$LOG" | head -8)

# ---- 1. build
if [ $DRY = 1 ]; then
  export TRITON_INTERPRET=1
  BENCH_ARGS=(--smoke --param device=cpu --x 64 130)
  DECODE_ARGS=(--smoke --param device=cpu)
  TEST_TIMEOUT=900
  BUILD_TIMEOUT=1200   # a loaded 2-core machine
  TRITON_RESERVE=0
else
  BUILD_TIMEOUT=300
  BENCH_ARGS=(--min-time 0.2 --max-time 2 --min-samples 5)
  DECODE_ARGS=(--min-time 0.2 --max-time 1)
  TEST_TIMEOUT=200
fi
build() {  # $1: LEET_BUILD_CUDA value
  LEET_BUILD_CUDA=$1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    $PY -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
  local rc=$?
  grep -E "leet_compile build:|error" "$OUT/build.log" | head -20
  return $rc
}
export -f build
export PY OUT
if [ $DRY = 1 ]; then  # a CPU torch: LEET_BUILD_CUDA=auto leaves the CUDA kernels out
  part "build (LEET_BUILD_CUDA=auto)" $BUILD_TIMEOUT bash -c "build auto"
elif ! part "build with CUDA kernels (sm_90)" $BUILD_TIMEOUT bash -c "build 1"; then
  part "build without CUDA kernels (fallback)" 150 bash -c "build 0"
fi
part "import + CUDA kernels registered" 60 $PY -c "
import torch, leet_compile
from leet_compile.ops import gpu
print('library', leet_compile.library_path())
print('cuda kernels', gpu.has_cuda_kernels(), 'triton', gpu.triton_available(), 'cuda available', torch.cuda.is_available())
assert gpu.has_cuda_kernels() or not torch.cuda.is_available(), 'a GPU machine must have the CUDA kernels'
"

# ---- 2. GPU tests (test_gpu.py compiles the Triton kernels for the GPU and checks every
# backend against float64; test_cuda_kernels.py the C++ CUDA kernels)
part "tests/test_gpu.py tests/test_cuda_kernels.py" $TEST_TIMEOUT $PY -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py tests/test_cuda_kernels.py

# ---- 3. compile / AOTInductor hold the Triton kernels
if [ $DRY = 1 ]; then
  part "torch.compile + AOTInductor package (dry run, CPU)" 300 $PY benchmarks/gpu_compile_check.py --device cpu --T 128
else
  part "torch.compile + AOTInductor package hold the Triton kernels" 150 $PY benchmarks/gpu_compile_check.py
fi

# ---- 4. benchmarks (decode first: short; then the sequence suite, cut at the budget)
part "benchmark: decode step" 60 $PY benchmarks/run.py gpu-decode --save --out "$OUT" "${DECODE_ARGS[@]}"
DEADLINE=$(( $(left) - 70 - TRITON_RESERVE ))
[ $DEADLINE -lt 30 ] && DEADLINE=30
part "benchmark: fwd, fwd+bwd side by side" $(( DEADLINE + 60 )) $PY benchmarks/run.py gpu --save --out "$OUT" --deadline $DEADLINE "${BENCH_ARGS[@]}"

# ---- 5. tests/test_triton.py last: it runs the Triton kernels under the interpreter (on CPU,
# in a TRITON_INTERPRET=1 subprocess), as CI does, so on the GPU machine it only repeats CI
part "tests/test_triton.py (interpreted)" $TEST_TIMEOUT $PY -m pytest -q -p no:cacheprovider -rs tests/test_triton.py

# ---- summary
{
  echo "# gpu_check $( [ $DRY = 1 ] && echo '(DRY RUN on CPU: sizes tiny, timings meaningless)')"
  echo
  echo "- command: \`bash benchmarks/gpu_check.sh $*\`"
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), total $(( $(date +%s) - T0 )) s"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "$ENV_LINES" | sed 's/^/- /'
  echo
  echo "| part | status | time |"
  echo "|---|---|---|"
  printf '%s\n' "${STATUS[@]}"
  echo
  for f in "$OUT"/*.md; do
    [ "$f" = "$SUMMARY" ] && continue
    [ -f "$f" ] && { echo; cat "$f"; }
  done
} > "$SUMMARY"
echo
printf '%s\n' "${STATUS[@]}"
echo "summary: $SUMMARY; logs: $LOG, $OUT/build.log; total $(( $(date +%s) - T0 )) s"
printf '%s\n' "${STATUS[@]}" | grep -q "FAIL\|TIMEOUT\|NOT RUN" && exit 1 || exit 0
