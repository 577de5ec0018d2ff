#!/usr/bin/env bash
# Nightly GPU benchmarks: run tests/bench on the CUDA device, save the run for the dashboard,
# rebuild the dashboard and print a summary table of this run.
#
#   OUT=/path/to/out scripts/gpu_bench.sh [extra pytest args, e.g. -k linear]
#
# Writes $OUT/bench/<machine-id>/NNNN_*.json (pytest-benchmark storage; runs accumulate when
# $OUT/bench is kept between nights) and $OUT/bench/dashboard.html.  Exit status: pytest's
# (1 when a GPU check such as the issue-4 speed target fails), or 2 when no run could be saved.
# Knobs: HARNESS_BENCH_ROUNDS (timed rounds per benchmark, default 10), HARNESS_BENCH_WARMUP (3),
# THRESHOLD (dashboard regression threshold, default 0.10), WINDOW (baseline runs, default 5),
# PYTHON (the interpreter, default the python3 on PATH: the active virtual environment's).
# Budget: about 3-5 minutes on one H100/H200 with the defaults.
set -uo pipefail
cd "$(dirname "$0")/.."
# The interpreter: $PYTHON, else the python3 on PATH (the active virtual environment's).
PY="${PYTHON:-python3}"

OUT="${OUT:-out}"
STORAGE="$OUT/bench"
mkdir -p "$STORAGE"

# SageAttention 1.0.6 is optional; install it from the repo's wheel when present (no network needed).
if ! "$PY" -c "import sageattention" 2>/dev/null; then
    for whl in .whl/sageattention-*.whl; do
        [ -e "$whl" ] && "$PY" -m pip install -q --no-deps "$whl" \
            || echo "gpu_bench: sageattention not installed; its benchmarks will skip"
    done
fi

"$PY" -m harness env || true

"$PY" -m pytest tests/bench -m gpu -p no:cacheprovider -q -rs --durations=10 \
    --benchmark-enable --benchmark-autosave --benchmark-storage="$STORAGE" \
    --benchmark-columns=min,median,max,rounds --benchmark-sort=fullname "$@"
rc=$?

"$PY" -m harness dashboard --storage "$STORAGE" --out "$STORAGE/dashboard.html" \
    --threshold "${THRESHOLD:-0.10}" --window "${WINDOW:-5}" --print-latest
drc=$?
if [ "$drc" -eq 2 ]; then
    exit 2
fi
exit "$rc"
