"""The per-GPU memory estimate (megatron_simko/memory_estimate.py) and the dry run that prints it: the unfused
attention term without Transformer Engine, the configured rollout backend's charge, and the transformers
backend's refusal of what it cannot hold. Checked against counts made here from first principles."""
import os
import subprocess
import sys

import pytest

from megatron_simko.memory_estimate import GIB, estimate_memory, kv_bytes_per_token, parameter_counts, rollout_memory
from megatron_simko.models.gpt import arch_from_hf_config
from megatron_simko.rollout.transformers_engine import decode_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN7B = os.path.join(ROOT, "examples", "model_configs", "Qwen2.5-Math-7B")


@pytest.fixture(scope="module")
def arch():
    return arch_from_hf_config(QWEN7B)


def test_unfused_attention_counts_scores_and_probs_per_layer(arch):
    T, s, tp = 8192, 4096, 2
    fused = estimate_memory(arch, tp, 1, 16, T, "bf16", fused_attention=True, sequence_length=s)
    local = estimate_memory(arch, tp, 1, 16, T, "bf16", fused_attention=False, sequence_length=s)
    # b = T / s rows of [heads/TP, s, s] scores and probabilities, bf16, every layer kept for backward.
    b = T // s
    expected = 2 * b * (arch.num_attention_heads // tp) * s * s * 2 * arch.num_layers
    assert fused.attention == 0 and local.attention == expected
    assert local.train_phase - fused.train_phase == expected
    assert expected / GIB > 40  # Qwen2.5-7B at s = 4096: the term that made "fits" wrong
    assert fused.fits(80.0) and not local.fits(80.0)


def test_rollout_backend_charges(arch):
    vllm = rollout_memory(arch, "vllm", "bf16", 80.0, gpu_memory_utilization=0.5)
    assert (vllm.resident, vllm.generating) == (0.0, 40 * GIB)
    hf = rollout_memory(arch, "transformers", "bf16", 80.0, n_samples=8, sequence_length=4096, max_batch_rows=64)
    counts = parameter_counts(arch, 1)
    assert hf.resident == 2 * sum(counts[k] for k in ("embedding", "output", "layers", "final_norm"))
    per_token = 2 * arch.num_layers * arch.num_query_groups * arch.head_dim * 2  # K and V, bf16
    assert kv_bytes_per_token(arch, "bf16") == per_token
    assert hf.rows == 64 and hf.generating == 64 * 4096 * per_token + 28 * 64 * arch.vocab_size
    est = estimate_memory(arch, 2, 1, 16, 8192, "bf16", rollout=hf)
    base = estimate_memory(arch, 2, 1, 16, 8192, "bf16", rollout=rollout_memory(arch, "vllm", "bf16", 80.0, gpu_memory_utilization=1e-9))
    assert est.train_phase - base.train_phase == pytest.approx(hf.resident)  # the HF copy stays through training


def test_decode_rows_takes_whole_groups_within_the_budget():
    assert decode_rows(256, 8, 100) == (256, "")
    assert decode_rows(250, 8, 100) == (248, "")
    assert decode_rows(256, 8, 100, kv_budget_bytes=1000) == (8, "")
    assert decode_rows(256, 8, 100, kv_budget_bytes=2399) == (16, "")
    rows, problem = decode_rows(256, 8, 100, kv_budget_bytes=799)
    assert rows == 8 and "cannot hold one prompt group" in problem and "rollout.kv_budget_gib" in problem
    rows, problem = decode_rows(4, 8, 100)
    assert "rollout.max_batch_rows=4" in problem


def run_dry(*overrides):
    cmd = [sys.executable, "-m", "megatron_simko.train", "--config", "examples/configs/simko_qwen7b.yaml",
           "--dry-run", "--skip-data", "--nodes", "4", "--gpus-per-node", "8", f"model.hf_dir={QWEN7B}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))


def test_dry_run_prints_both_backends_with_and_without_te():
    out = run_dry("--te", "yes")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    table = [ln for ln in lines if ln.strip().startswith(("vllm ", "transformers "))]
    assert len(table) == 4, out.stdout
    assert any("vllm" in ln and "with TE" in ln and "fits" in ln and "<- this run" in ln for ln in table)
    assert any("vllm" in ln and "without TE" in ln and "does NOT fit" in ln for ln in table)
    assert all("does NOT fit" in ln for ln in table if ln.strip().startswith("transformers"))
    assert lines[-1] == "fits"
    no_te = run_dry("--te", "no")
    assert no_te.returncode == 0 and "WARNING: the estimate exceeds" in no_te.stdout
    assert "install Transformer Engine" in no_te.stdout


def test_transformers_backend_config_it_cannot_serve_is_refused():
    out = run_dry("--te", "yes", "rollout.backend=transformers", "rollout.tensor_parallel=null",
                  "rollout.kv_budget_gib=1")
    assert out.returncode == 2
    assert "cannot hold one prompt group" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    big = run_dry("--te", "yes", "rollout.backend=transformers", "rollout.tensor_parallel=null")
    assert big.returncode == 0 and "WARNING: the estimate exceeds" in big.stdout
    assert "use rollout.backend=vllm" in big.stdout
