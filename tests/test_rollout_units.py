"""Rollout pieces that need neither vLLM nor process groups: seeding, sharding, packing, metrics, checksums,
and the engine's construction checks that run before vLLM is imported."""
import json
import math

import pytest
import torch

from megatron_simko.experience import pack_rollouts
from megatron_simko.rollout import (
    EngineBuildError,
    RolloutResult,
    RolloutSample,
    SamplingConfig,
    VLLMEngineConfig,
    VLLMRolloutEngine,
    logprob_mismatch,
    request_seed,
    shard_bounds,
    truncated_importance_weights,
)
from megatron_simko.rollout.weight_sync import checksums_match, compare_checksums, tensor_checksum


def test_request_seed_depends_on_every_coordinate_only():
    base = request_seed(1, 2, 3, 4)
    assert base == request_seed(1, 2, 3, 4)
    others = {request_seed(*c) for c in [(0, 2, 3, 4), (1, 0, 3, 4), (1, 2, 0, 4), (1, 2, 3, 0), (1, 2, 4, 3)]}
    assert base not in others and len(others) == 5
    assert 0 <= base < 2**63


@pytest.mark.parametrize("num,world", [(10, 3), (3, 4), (0, 2), (8, 8), (7, 1)])
def test_shard_bounds_partition_contiguously(num, world):
    bounds = [shard_bounds(num, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == num
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_sampling_config_validation():
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    assert SamplingConfig().logprobs_match_trainer
    assert not SamplingConfig(top_p=0.9).logprobs_match_trainer
    assert SamplingConfig(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)


def _results():
    return [
        RolloutResult(0, [5, 6, 7], [RolloutSample([1, 2], [-0.5, -1.0], "length"),
                                     RolloutSample([3], [-0.25], "stop")]),
        RolloutResult(1, [8], [RolloutSample([9, 9, 9], [-1.0, -2.0, -3.0], "length")]),
    ]


def test_pack_rollouts_aligns_like_rlbatch():
    pk = pack_rollouts(_results(), pad_id=0)
    assert pk.tokens.tolist() == [[5, 6, 7, 1, 2], [5, 6, 7, 3, 0], [8, 9, 9, 9, 0]]
    assert pk.loss_mask.tolist() == [[False, False, False, True, True], [False, False, False, True, False],
                                     [False, True, True, True, False]]
    assert pk.rollout_logprob[0, 3:].tolist() == [-0.5, -1.0]
    assert pk.rollout_logprob[2, 1:4].tolist() == [-1.0, -2.0, -3.0]
    assert pk.lengths.tolist() == [5, 4, 4] and pk.prompt_index.tolist() == [0, 0, 1]


def test_logprob_mismatch_and_tis():
    mask = torch.tensor([[False, True, True], [False, True, False]])
    rollout = torch.tensor([[0.0, -1.0, -2.0], [0.0, -3.0, 99.0]])
    trainer = rollout + torch.tensor([[5.0, 0.1, -0.2], [5.0, 0.3, 5.0]])  # off-mask differences ignored
    m = logprob_mismatch(trainer, rollout, mask)
    assert m["mismatch/mean_abs"] == pytest.approx(0.2)
    assert m["mismatch/max_abs"] == pytest.approx(0.3)
    assert m["mismatch/token_mult_prob_error"] == pytest.approx(math.exp(0.2))
    assert m["mismatch/mean_signed"] == pytest.approx(0.2 / 3)
    assert m["mismatch/tokens"] == 3
    assert truncated_importance_weights(trainer, rollout, None) is None
    w = truncated_importance_weights(trainer, rollout, cap=1.2, mask=mask)
    assert w[0].tolist() == pytest.approx([0.0, math.exp(0.1), math.exp(-0.2)])
    assert w[1].tolist() == pytest.approx([0.0, 1.2, 0.0])


def test_checksums_detect_small_changes_and_permutations():
    torch.manual_seed(0)
    t = torch.randn(64, 32)
    c = tensor_checksum(t)
    assert checksums_match(c, tensor_checksum(t.clone()), 1e-9)
    bumped = t.clone()
    bumped[7, 3] += 1e-4
    assert not checksums_match(c, tensor_checksum(bumped), 1e-9)
    swapped = t[[1, 0] + list(range(2, 64))]  # same values, two rows swapped (a layout bug)
    assert not checksums_match(c, tensor_checksum(swapped), 1e-9)
    expected = {"a": [((0, 0, 64), c)], "b": [((0, 0, 2), tensor_checksum(t[:2]))]}
    engine = {"a": [(0, 0, 64, tensor_checksum(bumped))], "c": [(0, 0, 1, c)]}
    problems = compare_checksums(expected, engine, 1e-9)
    assert any(p.startswith("a[0, 0, 64]: checksum mismatch") for p in problems)
    assert any(p.startswith("b: sent by the trainer but unknown") for p in problems)
    assert any(p.startswith("c: held by the engine but not sent") for p in problems)


# ------------------------------------------------------------------ construction errors (before vLLM is touched)

def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(EngineBuildError, match="does not exist"):
        VLLMRolloutEngine(VLLMEngineConfig(model_dir=str(tmp_path / "nope")))


def test_dir_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(EngineBuildError, match="no config.json"):
        VLLMRolloutEngine(VLLMEngineConfig(model_dir=str(tmp_path)))


def test_dir_without_weights_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 128, "num_attention_heads": 2}))
    with pytest.raises(EngineBuildError, match="no weight files"):
        VLLMRolloutEngine(VLLMEngineConfig(model_dir=str(tmp_path)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the head-size limit is vLLM's CPU attention backend")
def test_unsupported_cpu_head_size_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(EngineBuildError, match=r"head_dim=16 .* not supported by vLLM's CPU attention"):
        VLLMRolloutEngine(VLLMEngineConfig(model_dir=str(tmp_path)))


def test_engine_config_validation():
    with pytest.raises(ValueError, match="logprobs_mode"):
        VLLMEngineConfig(model_dir="x", logprobs_mode="raw_logits")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VLLMEngineConfig(model_dir="x", gpu_memory_utilization=1.5)
