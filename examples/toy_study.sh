#!/usr/bin/env bash
# The pass@K study at toy scale, from a fresh clone (docs/toy_study.md): a warm-started tiny countdown model,
# GRPO and SimKO (3 seeds each) and PSR, NSR, W-REINFORCE (1 seed each) trained with identical data, budget and
# hyper-parameters except the loss, base + every final model evaluated with pass@k up to k = 256 on held-out
# problems, then the figures and the table:
#   runs/toy_study/{model, heldout.jsonl, runs/<mode>-s<seed>, passk/passk.csv, figures/*.png, table.md, study.json}
# Resumable: a re-run skips what is finished (an interrupted training run resumes from its checkpoint).
# All runs are single-process TP=1 (no vLLM-CPU shared-memory communicator involved).
#
#   bash examples/toy_study.sh                    # the study (examples/configs/toy_study.yaml)
#   bash examples/toy_study.sh --variant smoke    # the whole pipeline in minutes (2 steps, n = 8)
#   bash examples/toy_study.sh --out-dir DIR      # elsewhere
#
# The second study (graph_color, a task with real forks; docs/toy_study.md, "Second study"): the same driver with
# its own config (a later --config replaces the default one):
#   bash examples/toy_study.sh --config examples/configs/graph_study.yaml                    # the study
#   bash examples/toy_study.sh --config examples/configs/graph_study.yaml --variant lr_dev   # lr calibration (dev)
#   bash examples/toy_study.sh --config examples/configs/graph_study.yaml --variant smoke    # pipeline in minutes
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONUNBUFFERED=1 VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-ERROR}"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
exec "$ROOT/.venv/bin/python" -m megatron_simko.eval.study --config examples/configs/toy_study.yaml "$@"
