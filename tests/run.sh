#!/usr/bin/env bash
# The test command (README, .ci/run): sets up .venv if needed, then runs the tests in two lanes, one per core:
#   lane 1: the fast suite, then the end-to-end tests marked dev_shm (vLLM at TP > 1: shared memory in /dev/shm,
#           and the tests that check what is left there);
#   lane 2, beside it: the other end-to-end tests (-m "slow and not dev_shm": none of them touches /dev/shm, so
#           lane 1's checks see only lane 1's segments); its output is printed when it ends.
# Both lanes share one tiny model (tests/conftest.py, built at the head of lane 2).
# /dev/shm is checked once for the whole run at the end (each pytest session also checks its own unless it runs
# beside another). Extra arguments go to every pytest run (e.g. `bash tests/run.sh -x -k loss`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh"
cd "$ROOT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PY="$ROOT/.venv/bin/python"
shm() { "$PY" -c 'import sys; sys.path.insert(0, "tests"); import conftest; print(*sorted(conftest.shm_segments()), sep="\n")'; }
SHM_BEFORE="$(shm)"
LANE2_LOG="$(mktemp)"
stop_lane2() { [[ -n "${LANE2:-}" ]] && { pkill -TERM -P "$LANE2" 2>/dev/null; kill "$LANE2" 2>/dev/null; } || true; }
trap 'stop_lane2; rm -rf "$LANE2_LOG" "${TINY_DIR:-}"' EXIT

run_group() {  # pytest exit 5 = "no tests collected": fine for an empty group, anything else fails.
  local name="$1"; shift
  echo "=== tests: $name ==="
  set +e; "$PY" -m pytest "$@"; local rc=$?; set -e
  if [[ $rc -ne 0 && $rc -ne 5 ]]; then echo "=== tests: $name FAILED (exit $rc) ==="; return $rc; fi
}

# The session-shared tiny model (tests/conftest.py), built once for all sessions at the head of lane 2 (the fixture
# waits while <dir>.building exists; lane 1 needs it minutes later) — unless MEGATRON_SIMKO_TINY_MODEL names one.
if [[ -z "${MEGATRON_SIMKO_TINY_MODEL:-}" ]]; then
  TINY_DIR="$(mktemp -d)"
  export MEGATRON_SIMKO_TINY_MODEL="$TINY_DIR/model"
  touch "$MEGATRON_SIMKO_TINY_MODEL.building"
fi
T0=$SECONDS
( if [[ -e "$MEGATRON_SIMKO_TINY_MODEL.building" ]]; then
    "$PY" tests/conftest.py "$MEGATRON_SIMKO_TINY_MODEL" || echo "=== building the tests' tiny model FAILED ==="
    rm -f "$MEGATRON_SIMKO_TINY_MODEL.building"
  fi
  MEGATRON_SIMKO_SHM_CHECK=runner run_group "slow (end to end), lane 2" -m "slow and not dev_shm" -p no:cacheprovider "$@"
) > "$LANE2_LOG" 2>&1 &
LANE2=$!
rc=0
run_group "fast" -m "not slow" "$@" || rc=$?
[[ $rc -eq 0 ]] && { run_group "slow (end to end, dev_shm), lane 1" -m "slow and dev_shm" "$@" || rc=$?; }
echo "=== lane 1 done after $((SECONDS - T0)) s; waiting for lane 2 ==="
rc2=0; wait "$LANE2" || rc2=$?; LANE2=""
cat "$LANE2_LOG"
echo "=== both lanes done after $((SECONDS - T0)) s ==="
LEFT="$(comm -13 <(echo "$SHM_BEFORE") <(shm))"
if [[ -n "$LEFT" ]]; then echo "=== the tests left shared-memory segments in /dev/shm: $LEFT ==="; exit 1; fi
if [[ $rc -ne 0 ]]; then exit $rc; fi
exit $rc2
