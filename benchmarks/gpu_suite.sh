#!/usr/bin/env bash
# GPU suite: the GPU-only tests, then the headline GPU benchmark cases; JSON, Markdown and plots
# go into the folder given; a short table is printed last. Budget: 8 minutes on one H100/H200.
#
#   benchmarks/gpu_suite.sh OUT_DIR
#
# UNTESTED ON HARDWARE: written and checked by reading only (no GPU was available when it was
# written). Run it once on a GPU and fix what breaks before trusting its numbers.
#
# Never needs the network. Optional peers are installed only from wheels placed beside this
# script (benchmarks/liger_kernel-*.whl, benchmarks/cut_cross_entropy-*.whl), with --no-index
# --no-deps; without them those implementations are recorded as "not installed".
# Environment: PYTHON (default: python3) must have CUDA torch and triton; GPU_TESTS overrides the
# test files run (default: tests/test_triton_*.py); TEST_BUDGET_S / BENCH_BUDGET_S split the time.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
OUT="${1:?usage: benchmarks/gpu_suite.sh OUT_DIR}"
PYTHON="${PYTHON:-python3}"
TEST_BUDGET_S="${TEST_BUDGET_S:-120}"
BENCH_BUDGET_S="${BENCH_BUDGET_S:-210}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"
SUITE_START=$(date +%s)
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset TRITON_INTERPRET

log() { echo "[gpu_suite $(( $(date +%s) - SUITE_START ))s] $*"; }

# 0. the machine
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite: $PYTHON has no CUDA torch (torch.cuda.is_available() is False)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || true
log "GPU: $(head -n 1 "$OUT/gpu.txt")"

# 1. the package (editable, no dependencies, no network) and optional peers from local wheels
if ! "$PYTHON" -c "import fused_concept.kernels" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e "$ROOT" \
        > "$OUT/pip.log" 2>&1 || log "pip install -e . failed (see pip.log); trying PYTHONPATH"
    "$PYTHON" -c "import fused_concept" 2>/dev/null || export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
shopt -s nullglob
for wheel in "$HERE"/liger_kernel-*.whl "$HERE"/cut_cross_entropy-*.whl; do
    log "installing $(basename "$wheel")"
    "$PYTHON" -m pip install -q --no-index --no-deps "$wheel" >> "$OUT/pip.log" 2>&1 \
        || log "could not install $(basename "$wheel") (see pip.log); it will be recorded as not installed"
done
shopt -u nullglob

# 2. GPU-only tests (the Triton kernels on the real device)
read -r -a TESTS <<< "${GPU_TESTS:-$(ls tests/test_triton_*.py 2>/dev/null | tr '\n' ' ')}"
TEST_STATUS="not run"
if [ "${#TESTS[@]}" -gt 0 ]; then
    log "tests: ${TESTS[*]} (limit ${TEST_BUDGET_S}s)"
    timeout --signal=TERM --kill-after=10 "$TEST_BUDGET_S" \
        "$PYTHON" -m pytest -q -p no:cacheprovider "${TESTS[@]}" > "$OUT/tests.log" 2>&1
    rc=$?
    case $rc in
        0) TEST_STATUS="passed" ;;
        124|137) TEST_STATUS="TIMED OUT after ${TEST_BUDGET_S}s" ;;
        *) TEST_STATUS="FAILED (pytest exit $rc)" ;;
    esac
    log "tests: $TEST_STATUS; $(tail -n 1 "$OUT/tests.log")"
fi

# 3. headline GPU cases first, then sweeps, until the budget is spent; the runner rewrites
#    results.json after every case, so a run cut short still leaves its measurements
log "benchmarks (no new case after ${BENCH_BUDGET_S}s)"
timeout --signal=TERM --kill-after=10 $(( BENCH_BUDGET_S + 90 )) \
    "$PYTHON" -m benchmarks.run --device cuda --quick --out "$OUT" --time-budget "$BENCH_BUDGET_S" \
    > "$OUT/bench.log" 2>&1
BENCH_RC=$?
log "benchmarks exit $BENCH_RC (log: $OUT/bench.log)"

# 4. short table last
echo
echo "== GPU suite summary ($(( $(date +%s) - SUITE_START ))s) =="
echo "tests: $TEST_STATUS"
if [ -f "$OUT/results.json" ]; then
    "$PYTHON" -m benchmarks.summary "$OUT/results.json"
else
    echo "no results.json (benchmark exit $BENCH_RC); last lines of bench.log:"
    tail -n 20 "$OUT/bench.log"
fi
[ "$TEST_STATUS" = "passed" ] && [ "$BENCH_RC" -eq 0 ]
