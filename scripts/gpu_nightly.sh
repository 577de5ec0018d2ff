#!/usr/bin/env bash
# Nightly GPU check: the layout matrix on every visible GPU, a fresh-process replay of every case
# it wrote, then the GPU test suite (tests/gpu and the regression corpus).
#
#   OUT=/path/to/out scripts/gpu_nightly.sh
#
# Writes $OUT/env.json, $OUT/matrix/ (report.md, report.html, summary.json, cases/),
# $OUT/matrix.log, $OUT/replay.json, $OUT/pytest-gpu.xml and $OUT/pytest-gpu.log.
# Exit status: 0 when every step passed, else the first failing step's code
# (matrix: 1 new failure with --fail-on-new / 3 not completed; replay: 1 a case changed verdict;
# pytest: its own).  Knobs: MATRIX_DEVICE (default cuda; "cpu" smoke-tests the script itself in CI),
# MATRIX_BUDGET (seconds, default: the matrix's own default),
# MATRIX_ARGS (extra matrix arguments, e.g. "--fail-on-new"), PYTEST_ARGS (e.g. "-k runner"),
# STEP_TIMEOUT (seconds per step, default 900), HARNESS_PROFILE (Hypothesis profile, default ci),
# PYTHON (the interpreter, default the python3 on PATH: the active virtual environment's).
# $OUT/matrix must not hold an earlier run: the matrix refuses a non-empty --out (use a new OUT per night).
set -uo pipefail
cd "$(dirname "$0")/.."
# The interpreter: $PYTHON, else the python3 on PATH (the active virtual environment's).
PY="${PYTHON:-python3}"

OUT="${OUT:-out}"
mkdir -p "$OUT"
STEP_TIMEOUT="${STEP_TIMEOUT:-900}"
rc=0
note() { echo "gpu_nightly: $*" >&2; }
keep() { [ "$rc" -eq 0 ] && rc="$1"; return 0; }

"$PY" -m harness env --json >"$OUT/env.json" || note "harness env failed (see above)"

budget=()
[ -n "${MATRIX_BUDGET:-}" ] && budget=(--time-budget "$MATRIX_BUDGET")
# shellcheck disable=SC2086  # MATRIX_ARGS is a list of words on purpose
timeout "$STEP_TIMEOUT" "$PY" -m harness matrix --device "${MATRIX_DEVICE:-cuda}" "${budget[@]}" ${MATRIX_ARGS:-} \
    --out "$OUT/matrix" 2>"$OUT/matrix.log"
m=$?
note "matrix exit $m"; keep "$m"

if [ -d "$OUT/matrix/cases" ]; then
    timeout "$STEP_TIMEOUT" "$PY" scripts/replay_all.py "$OUT/matrix/cases" --out "$OUT/replay.json"
    r=$?
    note "replay exit $r"; keep "$r"
fi

# shellcheck disable=SC2086
timeout "$STEP_TIMEOUT" "$PY" -m pytest tests/gpu tests/property -m gpu -q -rs -p no:cacheprovider \
    --junitxml="$OUT/pytest-gpu.xml" ${PYTEST_ARGS:-} >"$OUT/pytest-gpu.log" 2>&1
p=$?
tail -n 30 "$OUT/pytest-gpu.log"
note "pytest exit $p"; keep "$p"
exit "$rc"
