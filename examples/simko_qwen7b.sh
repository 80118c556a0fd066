#!/usr/bin/env bash
# SimKO on Qwen2.5-Math-7B, multi-node (8×H100 per node), paper settings (examples/configs/simko_qwen7b.yaml).
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 GPUS_PER_NODE=8 \
#   HF_DIR=/ckpt/Qwen2.5-Math-7B bash examples/simko_qwen7b.sh [key=value overrides ...]
#   bash examples/simko_qwen7b.sh --dry-run --skip-data  # validate + layout + per-GPU memory; no GPU, no data needed
#   bash examples/simko_qwen7b.sh --dry-run              # the same, and read every row of data.train (on the
#                                                        # machine that holds it; data.train=PATH to point at it)
#
# Before (once, on one node; CPU is enough): convert the HF checkpoint for the trainer's TP/PP —
#   python tools/convert_checkpoint.py hf-to-megatron --hf-dir $HF_DIR --out-dir $MEG_DIR --tp 2 --pp 1
#   python tools/convert_checkpoint.py verify --hf-dir $HF_DIR --tp 2        # optional, exactness check
# (or leave MEG_DIR unset: every rank then reads its own slices straight from the HF safetensors).
# After: the run ends by writing runs/simko_qwen7b/hf_final (Hugging Face format); any intermediate training
# checkpoint (dist_checkpointing, any TP/PP) converts with
#   python -m megatron_simko.export --checkpoint runs/simko_qwen7b/checkpoints --step 100 --hf-dir $HF_DIR --out-dir OUT
# and pass@k evaluation samples it with vLLM:
#   python tools/eval_passk.py --model base=$HF_DIR --model simko=runs/simko_qwen7b/hf_final \
#       --data math500=data/math500.jsonl --protocol paper --n 256 --max-tokens 3072 --out-dir runs/passk_7b
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="${CONFIG:-$ROOT/examples/configs/simko_qwen7b.yaml}"
PY="${PYTHON:-python}"
[[ -z "${PYTHON:-}" && -x "$ROOT/.venv/bin/python" ]] && PY="$ROOT/.venv/bin/python"   # tools/setup_env.sh's venv

if [[ "${1:-}" == "--dry-run" ]]; then
  shift
  HF_DIR="${HF_DIR:-$ROOT/examples/model_configs/Qwen2.5-Math-7B}"   # config.json is all a dry run reads
  exec "$PY" -m megatron_simko.train --config "$CONFIG" --dry-run \
    --nodes "${NNODES:-4}" --gpus-per-node "${GPUS_PER_NODE:-8}" model.hf_dir="$HF_DIR" "$@"
fi

: "${HF_DIR:?set HF_DIR to the Hugging Face Qwen2.5-Math-7B directory}"
NNODES="${NNODES:-1}"; NODE_RANK="${NODE_RANK:-0}"; GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"; MASTER_PORT="${MASTER_PORT:-29500}"
EXTRA=(model.hf_dir="$HF_DIR")
[[ -n "${MEG_DIR:-}" ]] && EXTRA+=(model.megatron_dir="$MEG_DIR")

export CUDA_DEVICE_MAX_CONNECTIONS=1          # megatron-core: ordered TP/PP communication kernels
export TORCH_NCCL_AVOID_RECORD_STREAMS=1
export VLLM_ALLOW_INSECURE_SERIALIZATION=1

exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m megatron_simko.train --config "$CONFIG" "${EXTRA[@]}" "$@"
