"""Fused linear SimKO statistics (losses/fused_linear.py) == the logits path at TP = 1, 2, 4 (gloo, CPU).

One launch per TP size runs every case of tests/fused_linear_worker.py (loss, ∂h, ∂W, metrics, statistics; at
TP > 1 also against one device; sequence parallelism through megatron-core's gather/reduce-scatter mapping;
tied weights; bf16); the tests below report its per-case verdicts.
"""
import os
import sys

import pytest
import torch

import fused_linear_worker as worker
from loss_dist_worker import launch
from megatron_simko.losses import SimKOConfig, simko_loss
from megatron_simko.losses import triton_kernels as tk
from megatron_simko.losses.fused_linear import linear_token_statistics

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from tensor_memory import TensorPeak  # noqa: E402  (benchmarks/: the loss memory benchmark's exact tensor peak)

TP_SIZES = (1, 2, 4)


@pytest.fixture(scope="module", params=TP_SIZES, ids=lambda tp: f"tp{tp}")
def tp_results(request, tmp_path_factory):
    tp = request.param
    return tp, launch(tp, str(tmp_path_factory.mktemp(f"fused_tp{tp}")), script=worker.__file__)


@pytest.mark.parametrize("case", list(worker.CASES))
def test_fused_matches_logits_path(tp_results, case):
    tp, results = tp_results
    failures = results.get(case)
    assert failures is not None, f"TP={tp}: case {case} did not run"
    assert not failures, f"TP={tp} case {case}:\n" + "\n".join(failures)


TRITON_CASES = ("simko", "padded_two_shards", "entropy_bonus", "bf16_entropy_bonus_padded")


@pytest.mark.skipif(tk.triton is None, reason="triton is not installed (requirements/cpu.lock.txt)")
@pytest.mark.parametrize("tp", (1, 2))
def test_fused_with_triton_kernels_matches_logits_path(tmp_path, tp):
    """The fused path with backend="triton" (the per-chunk passes as the Triton kernels, in the CPU interpreter)
    against the torch logits path."""
    results = launch(tp, str(tmp_path), timeout=900.0, script=worker.__file__,
                     env={"TRITON_INTERPRET": "1", "FUSED_BACKEND": "triton", "FUSED_CASES": ",".join(TRITON_CASES)})
    for case in TRITON_CASES:
        assert results.get(case) == [], f"TP={tp} case {case}: {results.get(case)}"


def test_inputs_unchanged_and_no_grad_path_builds_no_graph():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 5, 8, generator=g), torch.randn(11, 8, generator=g)
    t = torch.randint(0, 11, (2, 5), generator=g)
    h0, w0 = h.clone(), w.clone()
    with torch.no_grad():
        st = linear_token_statistics(h.requires_grad_(), w.requires_grad_(), t, 3, chunk_tokens=3)
    assert st.target_logprob.grad_fn is None
    assert torch.equal(h.detach(), h0) and torch.equal(w.detach(), w0)


@pytest.mark.parametrize("bad, match", [
    (dict(hidden=torch.zeros(2, 3)), "hidden must be"),
    (dict(weight=torch.zeros(11, 7)), "weight must be"),
    (dict(chunk_tokens=0), "chunk_tokens"),
    (dict(targets=torch.full((2, 5), 11)), "target id out of range"),
])
def test_bad_input_one_line_errors(bad, match):
    args = dict(hidden=torch.zeros(2, 5, 8), weight=torch.zeros(11, 8), targets=torch.zeros(2, 5, dtype=torch.long))
    chunk = bad.pop("chunk_tokens", 4)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        linear_token_statistics(args["hidden"], args["weight"], args["targets"], 3, chunk_tokens=chunk)


def test_memory_estimate_counts_the_fused_chunk_not_the_logits():
    """--dry-run's term for the output layer + loss: T·V/TP·(bytes + 4) with logits, chunk·V/TP·(bytes + 8) fused."""
    from megatron_simko.memory_estimate import estimate_memory, loss_output_bytes
    from megatron_simko.models.gpt import ModelArch

    assert loss_output_bytes(16384, 76032, 2) == 16384 * 76032 * 6
    assert loss_output_bytes(16384, 76032, 2, fused_chunk_tokens=512) == 512 * 76032 * 10
    assert loss_output_bytes(100, 76032, 4, fused_chunk_tokens=512) == 100 * 76032 * 12  # chunk ≤ T
    arch = ModelArch(family="qwen2", hf_architecture="Qwen2ForCausalLM", hidden_size=3584, num_layers=28,
                     num_attention_heads=28, num_query_groups=4, head_dim=128, ffn_hidden_size=18944,
                     vocab_size=152064, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1e6,
                     tie_word_embeddings=False, qkv_bias=True)
    plain = estimate_memory(arch, 2, 1, 16, 16384)
    fused = estimate_memory(arch, 2, 1, 16, 16384, fused_chunk_tokens=512)
    assert fused.logits < plain.logits / 10 and "fused loss chunk buffers" in fused.table(80.0)
    assert fused.train_phase == plain.train_phase - plain.logits + fused.logits


@pytest.mark.parametrize("entropy_coef", [0.0, 0.01], ids=["beta_only", "entropy_bonus"])
def test_peak_tensor_memory_is_grads_plus_one_chunk(entropy_coef):
    """Forward + backward of the fused path allocate no [N, V] tensor: the exact peak of live tensor bytes
    (benchmarks/tensor_memory.TensorPeak, which sees the backward too — the logits path below is the control) is
    ∂W + ∂h + one [chunk, V] buffer (two with an entropy gradient, fp32) + O(N) per-token state."""
    B, L, H, V, K, chunk = 4, 64, 32, 1024, 3, 32
    N = B * L
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(B, L, H, generator=g), torch.randn(V, H, generator=g) / H ** 0.5
    targets = torch.randint(0, V, (B, L), generator=g)
    old, adv, mask = -torch.rand(B, L, generator=g), torch.randn(B, generator=g), torch.ones(B, L, dtype=torch.bool)
    cfg = SimKOConfig(top_k=K, entropy_coef=entropy_coef, backend="torch")
    peaks = {}
    for path in ("fused", "logits"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with TensorPeak() as probe:
            if path == "fused":
                st = linear_token_statistics(h, w, targets, K, mask=mask, chunk_tokens=chunk, backend="torch")
                loss, _ = simko_loss(None, targets, old, adv, mask, cfg, stats=st)
            else:
                loss, _ = simko_loss(h @ w.t(), targets, old, adv, mask, cfg)
            loss.backward()
        assert w.grad is not None and h.grad is not None
        peaks[path] = probe
    buffers = 1 if entropy_coef == 0 else 2
    fused, logits = peaks["fused"], peaks["logits"]
    assert fused.largest_bytes <= max(V * H, N * H, chunk * V) * 4, fused.largest
    assert fused.peak_bytes <= (V * H + N * H + buffers * chunk * V) * 4 + 256 * N, fused.at_peak
    assert logits.largest_bytes >= N * V * 4 and logits.peak_bytes >= 2 * N * V * 4  # logits and their gradient
