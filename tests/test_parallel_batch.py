"""Batch format, micro-batching and configuration validation: no process groups, no torchrun."""
import os
import subprocess
import sys

import pytest
import torch

from megatron_simko.models.gpt import arch_from_hf_config, validate_parallelism
from megatron_simko.trainer.batch import RLBatch, pack_by_token_budget, split_to_count, token_budget_microbatches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "check_parallel_equivalence.py")


def batch(lengths=(9, 4, 7, 12, 5, 6), prompt=3, S=12):
    B = len(lengths)
    lengths = torch.tensor(lengths)
    pos = torch.arange(S)
    tokens = torch.where(pos < lengths[:, None], torch.arange(B * S).view(B, S) % 97 + 1, 0)
    return RLBatch(tokens=tokens, loss_mask=(pos >= prompt) & (pos < lengths[:, None]),
                   old_logprob=torch.randn(B, S), advantages=torch.arange(B, dtype=torch.float32))


def test_lengths_derived_from_loss_mask_and_split_trims():
    b = batch()
    assert b.lengths.tolist() == [9, 4, 7, 12, 5, 6]
    parts = b.split(3)
    assert [p.batch_size for p in parts] == [2, 2, 2]
    assert [p.seq_len for p in parts] == [9, 12, 6]  # each trimmed to its longest sequence
    assert torch.equal(torch.cat([p.indices for p in parts]), torch.arange(6))
    assert torch.equal(parts[1].tokens, b.tokens[2:4, :12])
    assert torch.equal(parts[0].advantages, b.advantages[:2])
    assert sum(p.num_loss_tokens for p in parts) == b.num_loss_tokens


def test_split_not_divisible_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible into 4 micro-batches"):
        batch().split(4)


@pytest.mark.parametrize("bad, match", [
    (dict(loss_mask_first=True), "loss_mask\\[:, 0\\]"),
    (dict(advantages=torch.zeros(3)), "advantages must be"),
    (dict(mask_dtype=torch.int64), "loss_mask must be bool"),
])
def test_batch_validation(bad, match):
    b = batch()
    kwargs = dict(tokens=b.tokens, loss_mask=b.loss_mask.clone(), old_logprob=b.old_logprob, advantages=b.advantages)
    if bad.get("loss_mask_first"):
        kwargs["loss_mask"][0, 0] = True
    if "advantages" in bad:
        kwargs["advantages"] = bad["advantages"]
    if "mask_dtype" in bad:
        kwargs["loss_mask"] = kwargs["loss_mask"].to(bad["mask_dtype"])
    with pytest.raises(ValueError, match=match):
        RLBatch(**kwargs)


def test_token_budget_packing_respects_budget_and_covers_every_row():
    lengths = [9, 4, 7, 12, 5, 6, 3, 11]
    groups = pack_by_token_budget(lengths, max_tokens=24)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 24
    assert pack_by_token_budget(lengths, 24) == groups  # deterministic
    with pytest.raises(ValueError, match="exceeds the micro-batch budget"):
        pack_by_token_budget(lengths, max_tokens=10)


def test_split_to_count_equalises_microbatch_counts():
    groups = [[0, 1, 2, 3], [4], [5, 6]]
    out = split_to_count(groups, 5)
    assert len(out) == 5 and sorted(i for g in out for i in g) == list(range(7))
    with pytest.raises(ValueError, match="cannot make 9 micro-batches"):
        split_to_count(groups, 9)


def test_token_budget_microbatches_without_dp():
    b = batch()
    mbs = token_budget_microbatches(b, max_tokens=24, min_microbatches=4)
    assert len(mbs) >= 4
    assert all(m.batch_size * m.seq_len <= 24 for m in mbs)
    assert sorted(torch.cat([m.indices for m in mbs]).tolist()) == list(range(6))
    for m in mbs:  # rows and their per-token tensors travel together
        assert torch.equal(m.old_logprob, b.old_logprob[m.indices][:, :m.seq_len])


TINY = dict(architectures=["Qwen2ForCausalLM"], hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
            intermediate_size=96, num_hidden_layers=3, vocab_size=300)


@pytest.mark.parametrize("tp, pp, match", [
    (4, 1, "num_attention_heads=6"),      # 6 heads
    (3, 1, "num_key_value_heads"),        # 2 KV groups
    (1, 2, "num_hidden_layers=3"),        # 3 layers
])
def test_parallelism_validation(tp, pp, match):
    with pytest.raises(ValueError, match=match):
        validate_parallelism(arch_from_hf_config(TINY), tp, pp)


def test_ffn_not_divisible():
    cfg = dict(TINY, num_attention_heads=4, num_key_value_heads=4, intermediate_size=98)
    with pytest.raises(ValueError, match="intermediate_size"):
        validate_parallelism(arch_from_hf_config(cfg), 4, 1)


@pytest.mark.parametrize("argv, message", [
    (["--tp", "1", "--pp", "3"], "pipeline_parallel=3 does not divide num_hidden_layers=4"),
    (["--tp", "3", "--pp", "1"], "tensor_parallel=3 does not divide num_attention_heads=4"),
])
def test_check_tool_rejects_bad_layout_before_any_process_group(argv, message):
    """Exit 2 with a clear message, before torchrun is launched (the default model: 4 heads, 4 layers)."""
    r = subprocess.run([sys.executable, TOOL, *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "torch.distributed.run" not in r.stderr


def test_pad_to_adds_dummy_rows_without_loss_tokens():
    b = batch().split(3)[0]  # [2, 9]
    p = b.pad_to(3, 12)
    assert p.tokens.shape == (3, 12) and p.num_loss_tokens == b.num_loss_tokens
    assert p.indices.tolist() == [0, 1, -1] and p.lengths.tolist()[2] == 1
    assert torch.equal(p.old_logprob[:2, :9], b.old_logprob) and not p.loss_mask[2].any()
