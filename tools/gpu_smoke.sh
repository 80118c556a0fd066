#!/usr/bin/env bash
# GPU smoke check of the whole RL loop, for a lent GPU machine without network, vLLM or megatron-core
# (docs/gpu_smoke.md): a Qwen2-architecture model with the real Qwen2.5 vocabulary (151,936 rows, ≈ 255 M
# parameters), SFT warm start, 3 RL steps at TP=1 in bf16 with rollout.backend=transformers, checkpoint,
# resume, HF export; prints a table (time by phase, tokens/s, peak GPU memory, loss, mismatch) and the checks;
# exits non-zero on any failure. About 2–3 minutes of GPU time once the machine is up.
#
#   bash tools/gpu_smoke.sh                 # GPU if CUDA is available, else the reduced CPU run
#   bash tools/gpu_smoke.sh --mode cpu      # reduced: tiny model, fp32 (≈ 2 min on 2 cores)
#   bash tools/gpu_smoke.sh --fetch-wheels  # on a machine WITH network: put the wheels the GPU machine lacks
#                                           # (megatron-core 0.19.2, math-verify + deps; Python 3.12) in .whl/
# On the device machine: carry .whl (gitignored) with the run; this script installs it with --no-deps into
# /tmp/simko_site when megatron-core is not importable. Other arguments go to tools/gpu_smoke.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WHEELS=(megatron-core==0.19.2 math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  mkdir -p .whl
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "${WHEELS[@]}"
  exit 0
fi

if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"
else PY=python3; fi

if ! "$PY" -c "import megatron.core, math_verify" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "error: megatron-core / math-verify are not importable and .whl/ holds no wheels;" \
         "run 'bash tools/gpu_smoke.sh --fetch-wheels' where there is network and carry .whl" >&2
    exit 2
  fi
  echo "== installing carried wheels (--no-deps) into /tmp/simko_site: $(cd .whl && ls *.whl | tr '\n' ' ')"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/simko_site .whl/*.whl
  export PYTHONPATH="/tmp/simko_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PY" tools/gpu_smoke.py "$@"
