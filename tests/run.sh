#!/usr/bin/env bash
# The test command (README, .ci/run): sets up .venv if needed, then runs the fast suite and the slow
# end-to-end group. Extra arguments go to both pytest runs (e.g. `bash tests/run.sh -x -k loss`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh"
cd "$ROOT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PY="$ROOT/.venv/bin/python"

run_group() {  # pytest exit 5 = "no tests collected": fine for an empty group, anything else fails.
  local name="$1"; shift
  echo "=== tests: $name ==="
  set +e; "$PY" -m pytest "$@"; local rc=$?; set -e
  if [[ $rc -ne 0 && $rc -ne 5 ]]; then echo "=== tests: $name FAILED (exit $rc) ==="; exit $rc; fi
}
run_group "fast" -m "not slow" "$@"
run_group "slow (end to end)" -m "slow" "$@"
