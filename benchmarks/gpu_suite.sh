#!/usr/bin/env bash
# GPU suite: the Triton tests on the device, the device's bf16 matrix-product rate, then the suite's
# benchmark cases (benchmarks/_plans.py suite_cases: Triton's strategy "rows" (triton_rows), its default
# strategy (triton), the torch path and impl="auto" at the Llama-3-8B and Gemma-2-2B heads, K=11 and K=0,
# trainable and frozen head, the naive loss, Liger-Kernel and cut-cross-entropy at K=0; the Llama-3-8B head
# again on "peaked" inputs (calibrated on a real model: benchmarks/peaked.py); Llama-3.2-1B and SmolLM2
# heads), peak and transient memory and FLOPs executed per case, the per-chunk pieces of strategy "rows"
# (benchmarks/chunk_micro.py: the three cuBLAS products at 512 / 1024 / 2048 rows, the row kernel in GB/s
# against a copy), errors against float64 for every implementation. Budget: 8 minutes on one H200
# (tests <= TEST_BUDGET_S, cases started until BENCH_BUDGET_S, then the micro-benchmark and the accuracy
# checks, all cut at BENCH_BUDGET_S + 100 s).
#
#   benchmarks/gpu_suite.sh OUT_DIR              on the GPU machine
#   benchmarks/gpu_suite.sh --dry-run OUT_DIR    the same plumbing on a CPU: Triton's interpreter, tiny
#                                                shapes, one repeat; same files and JSON schema
#
# Writes into OUT_DIR (7 files, so that all of them come back from the device tool): results.json,
# results.md, time_memory_vs_N.png / _V.png (when the plan has sweeps), suite.log (machine, installs),
# tests.log, bench.log; prints a short table last.
#
# Never needs the network. Liger-Kernel and cut-cross-entropy are installed, if their wheels are in
# WHEELS (default: the repository's .whl/ folder, ignored by git), with pip --no-index --no-deps into a
# temporary folder put on PYTHONPATH; without them those cases are recorded as "not installed".
# The package itself is imported from this checkout (no pip install).
# Environment: PYTHON (default python3) must have torch and triton (CUDA torch unless --dry-run);
# TEST_BUDGET_S / BENCH_BUDGET_S split the time (the runner starts no case after BENCH_BUDGET_S).
set -uo pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
OUT="${1:?usage: benchmarks/gpu_suite.sh [--dry-run] OUT_DIR}"
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-$ROOT/.whl}"
TEST_BUDGET_S="${TEST_BUDGET_S:-90}"
BENCH_BUDGET_S="${BENCH_BUDGET_S:-240}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
cd "$ROOT"
SUITE_START=$(date +%s)
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
LOG="$OUT/suite.log"
: > "$LOG"

log() { echo "[gpu_suite $(( $(date +%s) - SUITE_START ))s] $*" | tee -a "$LOG"; }

# 0. the machine
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1
    DEVICE=cpu
    log "dry run: CPU, Triton's interpreter, tiny shapes"
else
    unset TRITON_INTERPRET
    DEVICE=cuda
    if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_suite: $PYTHON has no CUDA torch (torch.cuda.is_available() is False)" >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader >> "$LOG" 2>&1 || true
fi
"$PYTHON" -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, 'numpy', numpy.__version__)" >> "$LOG" 2>&1

# 1. this checkout's package on the path, as installed: fused_concept.kernels lives in kernels/ (setup.py's
#    package_dir), so a folder of links stands in for the installed layout. PYTHONSAFEPATH keeps Python
#    from putting the working directory (whose fused_concept/ has no kernels/) ahead of it; the dry run
#    takes the same route even where the package is installed.
mkdir -p "$SCRATCH/path/fused_concept"
ln -s "$ROOT"/fused_concept/* "$SCRATCH/path/fused_concept/"
ln -s "$ROOT/kernels" "$SCRATCH/path/fused_concept/kernels"
export PYTHONSAFEPATH=1 PYTHONPATH="$SCRATCH/path:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import fused_concept.kernels, benchmarks.run; print('fused_concept from', fused_concept.__file__)" >> "$LOG" 2>&1 \
    || { log "cannot import fused_concept.kernels from the linked checkout (see suite.log)"; exit 2; }
shopt -s nullglob
wheels=("$WHEELS"/liger_kernel-*.whl "$WHEELS"/cut_cross_entropy-*.whl)
shopt -u nullglob
if [ "${#wheels[@]}" -gt 0 ]; then
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SCRATCH/site" \
            "${wheels[@]}" >> "$LOG" 2>&1; then
        export PYTHONPATH="$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}"
        log "installed: $(cd "$WHEELS" && ls liger_kernel-*.whl cut_cross_entropy-*.whl 2>/dev/null | tr '\n' ' ')"
    else
        log "could not install the wheels in $WHEELS (see suite.log); those cases are recorded as not installed"
    fi
else
    log "no liger-kernel / cut-cross-entropy wheels in $WHEELS: those cases are recorded as not installed"
fi

# 2. the Triton kernels against their float64 oracles, on the device (dry run: one case, interpreter)
if [ "$DRY" = 1 ]; then
    TESTS=(tests/backends/test_triton_interpret.py -k "small-fp32-marginal")
elif "$PYTHON" -c "import xdist" 2>/dev/null; then
    TESTS=(tests/backends/test_triton_interpret.py -n 8)  # compiles dominate: 8 processes share the cache
else
    TESTS=(tests/backends/test_triton_interpret.py)
fi
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

# 3. the benchmark cases, most important first; the runner rewrites results.json after every case, so a
#    run cut short still leaves its measurements
if [ "$DRY" = 1 ]; then
    RUN=(--device cpu --plan dry)
else
    RUN=(--device cuda --quick)
fi
log "benchmarks: ${RUN[*]} (no new case after ${BENCH_BUDGET_S}s)"
timeout --signal=TERM --kill-after=10 $(( BENCH_BUDGET_S + 100 )) \
    "$PYTHON" -m benchmarks.run "${RUN[@]}" --out "$OUT" --time-budget "$BENCH_BUDGET_S" > "$OUT/bench.log" 2>&1
BENCH_RC=$?
log "benchmarks exit $BENCH_RC (log: bench.log)"

# 4. short table last
echo
echo "== GPU suite summary$([ "$DRY" = 1 ] && echo ' (DRY RUN: CPU, interpreter, tiny shapes)') ($(( $(date +%s) - SUITE_START ))s) =="
echo "tests: $TEST_STATUS"
if [ -f "$OUT/results.json" ]; then
    "$PYTHON" -m benchmarks.summary "$OUT/results.json"
else
    echo "no results.json (benchmark exit $BENCH_RC); last lines of bench.log:"
    tail -n 20 "$OUT/bench.log"
fi
[ "$TEST_STATUS" = "passed" ] && [ "$BENCH_RC" -eq 0 ]
