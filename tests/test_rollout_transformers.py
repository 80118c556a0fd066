"""The transformers rollout backend in one process, against independent references: a plain transformers
float32 forward of the same weights (log-probs), closed-form sampling probabilities, and checksums of the
tensors it was given. Its agreement with the Megatron trainer (log-probs, weight sync at TP=2, training) is
tested by the colocated launch in tests/test_rollout_colocated.py, the same harness as vLLM's.

Model: the tiny Qwen2 of tests/rollout_models.py (head_dim 64, vocab 512), token-id prompts.
"""
import os
import sys

import pytest
import torch

from megatron_simko.experience import pack_rollouts
from megatron_simko.rollout import (
    SamplingConfig,
    TransformersEngineConfig,
    TransformersRolloutEngine,
    logprob_mismatch,
)
from megatron_simko.rollout.transformers_engine import sample_from_logits
from megatron_simko.rollout.weight_sync import compare_checksums, slice_piece, tensor_checksum

sys.path.insert(0, os.path.dirname(__file__))
from rollout_models import make_tiny_qwen2  # noqa: E402

PROMPTS = [[11, 42, 7, 300, 5], [99, 1, 250], [3, 14, 15, 92, 65, 35]]
TOL = 1e-4  # the vLLM tests' bound on mean |Δ log-prob| against the reference


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_qwen2(str(tmp_path_factory.mktemp("tiny_qwen2")), tie=False, hidden_size=128,
                           num_attention_heads=2, num_key_value_heads=1, intermediate_size=256, vocab_size=512,
                           eos_token_id=7)


@pytest.fixture(scope="module")
def engine(model_dir):
    return TransformersRolloutEngine(TransformersEngineConfig(model_dir=model_dir, device="cpu", max_model_len=256))


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()


def hf_logprobs(model, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, S] log softmax(z / T)[token t] predicted from position t − 1 (0 at t = 0), one sequence at a time."""
    rows = []
    with torch.no_grad():
        for row in tokens:
            logits = model(row[None]).logits[0].float()
            lp = torch.log_softmax(logits[:-1] / temperature, dim=-1).gather(-1, row[1:, None])[:, 0]
            rows.append(torch.cat([torch.zeros(1), lp]))
    return torch.stack(rows)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_a_plain_forward(engine, hf_model, temperature):
    params = SamplingConfig(temperature=temperature, max_tokens=16, seed=3, ignore_eos=True)
    results = engine.generate(PROMPTS, 4, params)
    assert [r.prompt_index for r in results] == [0, 1, 2]
    for r in results:
        assert len(r.samples) == 4 and len({tuple(s.token_ids) for s in r.samples}) > 1  # distinct draws
        for s in r.samples:
            assert s.length == len(s.logprobs) == 16 and s.finish_reason == "length"
    pk = pack_rollouts(results)  # right-padded rows: the reference scores each unpadded
    m = logprob_mismatch(hf_logprobs(hf_model, pk.tokens, temperature), pk.rollout_logprob, pk.loss_mask)
    assert m["mismatch/tokens"] == 3 * 4 * 16
    assert m["mismatch/mean_abs"] < TOL and m["mismatch/max_abs"] < 10 * TOL, m


def test_seeds_do_not_depend_on_the_batch(model_dir, engine):
    params = SamplingConfig(temperature=1.0, max_tokens=10, seed=11, ignore_eos=True)
    full = engine.generate(PROMPTS, 3, params, step=4)
    alone = engine.generate(PROMPTS[2:], 3, params, step=4, prompt_offset=2)  # same global index, other batch
    assert [s.token_ids for s in alone[0].samples] == [s.token_ids for s in full[2].samples]
    assert [s.seed for s in alone[0].samples] == [s.seed for s in full[2].samples]
    for a, b in zip(alone[0].samples, full[2].samples):  # padding changes round-off only
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    one_prompt_per_batch = TransformersRolloutEngine(TransformersEngineConfig(model_dir=model_dir, device="cpu",
                                                                              max_batch_rows=3))
    chunked = one_prompt_per_batch.generate(PROMPTS, 3, params, step=4)
    assert [[s.token_ids for s in r.samples] for r in chunked] == [[s.token_ids for s in r.samples] for r in full]
    again = engine.generate(PROMPTS, 3, params, step=4)
    assert [[s.token_ids for s in r.samples] for r in again] == [[s.token_ids for s in r.samples] for r in full]
    other_step = engine.generate(PROMPTS, 3, params, step=5)
    assert [[s.token_ids for s in r.samples] for r in other_step] != [[s.token_ids for s in r.samples] for r in full]


def test_kv_budget_decodes_whole_groups_and_refuses_what_it_cannot_hold(model_dir, engine):
    """rollout.kv_budget_gib: chunks of whole prompt groups sized by the KV cache at full length (the samples do
    not change), and a budget below one group of n rows is refused with one line. The per-token KV size the
    budget uses is the size of a real prefill cache."""
    params = SamplingConfig(temperature=1.0, max_tokens=10, seed=11, ignore_eos=True)
    with torch.no_grad():
        cache = engine.model(input_ids=torch.tensor([PROMPTS[2]]), use_cache=True).past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == engine.kv_bytes_per_token * len(PROMPTS[2])
    per_row = engine.kv_bytes_per_token * (max(len(p) for p in PROMPTS) + params.max_tokens)
    full = engine.generate(PROMPTS, 3, params, step=4)
    one_group = TransformersRolloutEngine(TransformersEngineConfig(
        model_dir=model_dir, device="cpu", kv_budget_gib=(3 * per_row + per_row // 2) / 2**30))  # 3 rows fit
    assert [[s.token_ids for s in r.samples] for r in one_group.generate(PROMPTS, 3, params, step=4)] == \
        [[s.token_ids for s in r.samples] for r in full]
    too_small = TransformersRolloutEngine(TransformersEngineConfig(
        model_dir=model_dir, device="cpu", kv_budget_gib=2 * per_row / 2**30))
    with pytest.raises(ValueError, match="cannot hold one prompt group: n_samples=3") as info:
        too_small.generate(PROMPTS, 3, params, step=4)
    assert "\n" not in str(info.value)


def test_stop_tokens_end_the_response_and_are_kept(engine):
    params = SamplingConfig(temperature=1.0, max_tokens=12, seed=5, ignore_eos=True)
    first = engine.generate(PROMPTS[:1], 1, params)[0].samples[0]
    stop = first.token_ids[4]
    cut = first.token_ids.index(stop)
    again = engine.generate(PROMPTS[:1], 1, SamplingConfig(temperature=1.0, max_tokens=12, seed=5, ignore_eos=True,
                                                           stop_token_ids=(stop,)))[0].samples[0]
    assert again.finish_reason == "stop"
    assert again.token_ids == first.token_ids[:cut + 1]  # the stop token is part of the response
    assert again.logprobs == pytest.approx(first.logprobs[:cut + 1], abs=1e-6)
    # The model's own EOS (config.json: 7) ends responses unless ignore_eos; a stop in one row leaves the others.
    assert engine.eos_token_ids == (7,)
    rows = engine.generate(PROMPTS, 8, SamplingConfig(temperature=1.0, max_tokens=12, seed=5,
                                                      stop_token_ids=(stop,)))
    samples = [s for r in rows for s in r.samples]
    for s in samples:
        ended = [t for t in s.token_ids if t in (7, stop)]
        assert (s.finish_reason == "stop") == bool(ended)
        assert not ended or (s.token_ids.index(ended[0]) == s.length - 1)  # nothing after the first stop
        assert s.finish_reason == "stop" or s.length == 12
    assert {s.finish_reason for s in samples} == {"stop", "length"}


def test_max_model_len_ends_with_length(model_dir):
    eng = TransformersRolloutEngine(TransformersEngineConfig(model_dir=model_dir, device="cpu", max_model_len=8))
    out = eng.generate([[1, 2, 3, 4, 5]], 2, SamplingConfig(max_tokens=10, ignore_eos=True))[0]
    assert [s.length for s in out.samples] == [3, 3] and {s.finish_reason for s in out.samples} == {"length"}
    with pytest.raises(ValueError, match="prompt 0 has 8 tokens"):
        eng.generate([[1] * 8], 1, SamplingConfig(max_tokens=2))


def test_sampling_probabilities_and_processed_logprobs():
    """Inverse-CDF sampling on a uniform grid hits each token with exactly its (processed) probability."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0, -3.0]])
    grid = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000  # [N] uniforms
    for params, kept in [(SamplingConfig(temperature=0.7), [0, 1, 2, 3, 4, 5]),
                         (SamplingConfig(temperature=1.0, top_p=0.8), [0, 1, 2]),
                         (SamplingConfig(temperature=1.0, top_k=2), [0, 1])]:
        z = logits[0] / params.temperature
        ref = torch.full_like(z, -float("inf"))
        ref[kept] = torch.log_softmax(z[kept], dim=-1)  # renormalised over the kept set
        tokens, lp = sample_from_logits(logits.expand(len(grid), -1), grid, params)
        assert set(tokens.tolist()) == set(kept)
        assert torch.allclose(lp, ref[tokens], atol=1e-6)
        freq = torch.bincount(tokens, minlength=6).double() / len(grid)
        assert torch.allclose(freq, ref.double().exp(), atol=1e-4)


def test_update_weights_checksums_and_corruption(model_dir, engine, hf_model):
    original = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    layout = engine.weight_layout()
    assert set(layout) == set(original) and layout["model.embed_tokens.weight"] == [(0, 0, 512)]
    torch.manual_seed(1)
    new = {k: v + 0.02 * torch.randn_like(v) for k, v in original.items()}
    params = SamplingConfig(temperature=0.7, max_tokens=8, seed=9, ignore_eos=True)
    try:
        stats = engine.update_weights(iter(new.items()))
        assert stats["tensors"] == len(new)
        expected = {n: [(p, tensor_checksum(slice_piece(new[n], p))) for p in pieces] for n, pieces in layout.items()}
        assert compare_checksums(expected, engine.weight_checksums(), 1e-9) == []
        hf_model.load_state_dict(new)
        pk = pack_rollouts(engine.generate(PROMPTS, 2, params))
        m = logprob_mismatch(hf_logprobs(hf_model, pk.tokens, 0.7), pk.rollout_logprob, pk.loss_mask)
        assert m["mismatch/mean_abs"] < TOL, m  # generation follows the new weights

        bad = dict(new)
        bad["model.layers.0.self_attn.v_proj.weight"] = new["model.layers.0.self_attn.v_proj.weight"].clone()
        bad["model.layers.0.self_attn.v_proj.weight"][5, 7] += 1e-3
        engine.update_weights(iter(bad.items()))
        problems = compare_checksums(expected, engine.weight_checksums(), 1e-9)
        assert len(problems) == 1 and problems[0].startswith("model.layers.0.self_attn.v_proj.weight")

        seen = []
        stream = ((k, v) for k, v in list(new.items())[:-1] + [("model.no_such.weight", torch.zeros(2))]
                  if not seen.append(k))
        with pytest.raises(RuntimeError, match=r"no_such.weight: not a parameter[\s\S]*lm_head.weight: not sent"):
            engine.update_weights(stream)
        assert len(seen) == len(new)  # the whole stream was consumed before the error (collective-safe)
    finally:
        engine.update_weights(iter(original.items()))
        hf_model.load_state_dict(original)


def test_bf16_engine_holds_and_checksums_bf16(model_dir, hf_model):
    eng = TransformersRolloutEngine(TransformersEngineConfig(model_dir=model_dir, device="cpu", dtype="bfloat16"))
    assert eng.model_dtype == torch.bfloat16
    state = {k: v.to(torch.bfloat16) for k, v in hf_model.state_dict().items()}
    eng.update_weights(iter(state.items()))
    got = eng.weight_checksums()
    assert all(got[n][0][3] == tensor_checksum(t) for n, t in state.items())
    pk = pack_rollouts(eng.generate(PROMPTS, 2, SamplingConfig(max_tokens=6, seed=1, ignore_eos=True)))
    m = logprob_mismatch(hf_logprobs(hf_model, pk.tokens, 1.0), pk.rollout_logprob, pk.loss_mask)
    assert m["mismatch/mean_abs"] < 0.1, m  # bf16 weights against the fp32 reference: round-off, not a bug


def test_construction_errors_are_clear(tmp_path):
    with pytest.raises(Exception, match="does not exist"):
        TransformersRolloutEngine(TransformersEngineConfig(model_dir=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="dtype must be one of"):
        TransformersEngineConfig(model_dir="x", dtype="int8")
