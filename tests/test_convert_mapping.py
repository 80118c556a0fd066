"""The HF <-> Megatron mapping against independent references of megatron-core's layouts (pure tensors, fast).

References written from megatron-core's own code, not from hf_mapping:
  * fused QKV: ``get_query_key_value_tensors`` views the projection as [ng, (qpg + 2) * d] and splits each group
    into [q (qpg·d), k (d), v (d)]; ColumnParallelLinear gives rank r the r-th row chunk;
  * fc1: the SwiGLU in ``MLP.forward`` does ``torch.chunk(x, 2, -1)`` on each rank's [2f/tp] output, so rank r
    holds [gate chunk r; up chunk r];
  * VocabParallelEmbedding / output layer: rank r holds rows [r·Vpad/tp, (r+1)·Vpad/tp) of the padded table.
"""
import pytest
import torch

from megatron_simko.models import hf_mapping as hm
from megatron_simko.models.gpt import arch_from_hf_config, padded_vocab_size


def config(family="qwen2", tied=False, heads=4, kv=2, head_dim=32, hidden=128, ffn=192, vocab=300, layers=2):
    arch = "Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM"
    return {"architectures": [arch], "model_type": family, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
            "intermediate_size": ffn, "vocab_size": vocab, "tie_word_embeddings": tied}


ARCHS = {
    "qwen2_tied": arch_from_hf_config(config("qwen2", tied=True)),
    "qwen2_untied": arch_from_hf_config(config("qwen2", tied=False, kv=4)),
    "llama": arch_from_hf_config(config("llama", heads=8, kv=2, head_dim=16)),
}


def random_hf(arch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(hm.hf_shape(n, arch), generator=g) for n in hm.hf_tensor_names(arch)}


def reference_qkv(q, k, v, arch):
    """[nq·d, ...], [ng·d, ...], [ng·d, ...] -> fused [ng·(qpg+2)·d, ...] per megatron-core's view."""
    ng, d = arch.num_query_groups, arch.head_dim
    rest = q.shape[1:]
    qg = q.reshape(ng, -1, *rest)  # [ng, qpg·d, ...]
    return torch.cat([qg, k.reshape(ng, d, *rest), v.reshape(ng, d, *rest)], dim=1).reshape(-1, *rest)


def reference_shard(name, hf, arch, tp, r):
    i = name.split(".")[2] if name.startswith("decoder.layers.") else None
    p = f"model.layers.{i}."
    vpad = padded_vocab_size(arch.vocab_size, tp)
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        src = hf["lm_head.weight" if name == "output_layer.weight" else "model.embed_tokens.weight"]
        full = torch.cat([src, torch.zeros(vpad - src.shape[0], src.shape[1])])
        return full.chunk(tp, 0)[r]
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        kind = name.rsplit(".", 1)[1]
        full = reference_qkv(*(hf[f"{p}self_attn.{x}_proj.{kind}"] for x in "qkv"), arch)
        return full.chunk(tp, 0)[r]
    if name.endswith("linear_fc1.weight"):
        return torch.cat([hf[p + "mlp.gate_proj.weight"].chunk(tp, 0)[r], hf[p + "mlp.up_proj.weight"].chunk(tp, 0)[r]])
    if name.endswith("linear_proj.weight"):
        return hf[p + "self_attn.o_proj.weight"].chunk(tp, 1)[r]
    if name.endswith("linear_fc2.weight"):
        return hf[p + "mlp.down_proj.weight"].chunk(tp, 1)[r]
    if name.endswith("input_layernorm.weight"):
        return hf[p + "input_layernorm.weight"]
    if name.endswith("pre_mlp_layernorm.weight"):
        return hf[p + "post_attention_layernorm.weight"]
    assert name == "decoder.final_layernorm.weight"
    return hf["model.norm.weight"]


@pytest.mark.parametrize("key", sorted(ARCHS))
@pytest.mark.parametrize("tp", [1, 2])
def test_shards_match_reference_and_round_trip(key, tp):
    arch = ARCHS[key]
    hf = random_hf(arch)
    names = [m.megatron_name for m in hm.param_mappings(arch)]
    assert ("output_layer.weight" in names) == (not arch.tie_word_embeddings)
    assert sorted(hm.hf_tensor_names(arch)) == sorted(hf)
    for name in names:
        shards = [hm.hf_to_megatron(name, hf, arch, r, tp) for r in range(tp)]
        for r, s in enumerate(shards):
            assert torch.equal(s, reference_shard(name, hf, arch, tp, r)), (name, r)
            assert tuple(s.shape) == hm.megatron_shape(name, arch, tp)
        back = hm.megatron_to_hf(name, shards, arch)
        assert [n for n, _ in back] == list(hm.mapping_for(name, arch).hf_names)
        for n, t in back:
            assert torch.equal(t, hf[n]) and t.is_contiguous()
            assert hm.megatron_name_for_hf(n, arch) == name
        full = hm.merge_tp_shards(name, shards, arch)
        assert all(torch.equal(a, b) for a, b in zip(hm.split_tp(name, full, arch, tp), shards))
        if tp == 1:
            continue
        # the full tensor of a TP=tp model is the TP=1 layout (with tp's vocabulary padding)
        assert torch.equal(full, hm.hf_to_megatron(name, hf, arch, 0, 1,
                                                   padded_vocab=padded_vocab_size(arch.vocab_size, tp)))


def test_reshard_between_tp_sizes_and_vocab_padding():
    arch = ARCHS["llama"]  # vocab 300: Vpad 384 at TP 1, 512 at TP 2 and 4
    hf = random_hf(arch, seed=1)
    for name in ["embedding.word_embeddings.weight", "output_layer.weight",
                 "decoder.layers.1.self_attention.linear_qkv.weight", "decoder.layers.0.mlp.linear_fc1.weight",
                 "decoder.layers.0.mlp.linear_fc2.weight"]:
        for src_tp, dst_tp in [(1, 2), (2, 1), (2, 4), (4, 2)]:
            src = [hm.hf_to_megatron(name, hf, arch, r, src_tp) for r in range(src_tp)]
            want = [hm.hf_to_megatron(name, hf, arch, r, dst_tp) for r in range(dst_tp)]
            got = hm.reshard(name, src, arch, dst_tp)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (name, src_tp, dst_tp)
            assert torch.equal(hm.reshard(name, src, arch, dst_tp, tp_rank=dst_tp - 1), want[-1])
    emb = hm.hf_to_megatron("embedding.word_embeddings.weight", hf, arch, 1, 4)  # rows 128..255 of 512
    assert emb.shape == (128, arch.hidden_size) and torch.equal(emb, hf["model.embed_tokens.weight"][128:256])
    last = hm.hf_to_megatron("embedding.word_embeddings.weight", hf, arch, 3, 4)  # rows 384..511: padding only
    assert last.shape == (128, arch.hidden_size) and not last.any()


def test_qkv_with_fewer_kv_groups_than_tp_is_a_plain_row_chunk():
    # megatron-core (>=0.13) all-gathers and re-slices when ng < tp: the stored shard is the r-th row chunk.
    arch = arch_from_hf_config(config("qwen2", heads=4, kv=1, head_dim=32))
    hf = random_hf(arch, seed=2)
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    full = reference_qkv(*(hf[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv"), arch)
    shards = [hm.hf_to_megatron(name, hf, arch, r, 2) for r in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(shards, full.chunk(2, 0)))
    assert all(torch.equal(t, hf[n]) for n, t in hm.megatron_to_hf(name, shards, arch))


def test_reader_callback_reads_only_slices():
    arch = ARCHS["qwen2_untied"]
    hf = random_hf(arch, seed=3)
    calls = []

    def read(name, dim, start, stop):
        calls.append((name, dim, start, stop))
        return hf[name].narrow(dim, start, stop - start)

    name = "decoder.layers.1.self_attention.linear_qkv.weight"
    assert torch.equal(hm.hf_to_megatron(name, read, arch, 1, 2), hm.hf_to_megatron(name, hf, arch, 1, 2))
    q = arch.num_attention_heads * arch.head_dim
    assert all(stop - start < q for _, _, start, stop in calls)  # never the whole q_proj


def test_names_te_spelling_prefixes_and_offsets():
    arch = ARCHS["qwen2_tied"]
    te = "module.decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"
    assert hm.canonical_name(te) == "decoder.layers.1.input_layernorm.weight"
    assert hm.canonical_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight") == \
        "decoder.layers.0.pre_mlp_layernorm.weight"
    assert hm.model_param_name("decoder.layers.0.pre_mlp_layernorm.weight", True) == \
        "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"
    assert hm.model_param_name("decoder.layers.0.pre_mlp_layernorm.weight", False) == \
        "decoder.layers.0.pre_mlp_layernorm.weight"
    assert hm.to_global_name("decoder.layers.1.mlp.linear_fc2.weight", 2) == "decoder.layers.3.mlp.linear_fc2.weight"
    assert hm.to_local_name("decoder.layers.3.mlp.linear_fc2.weight", 2) == "decoder.layers.1.mlp.linear_fc2.weight"
    assert hm.to_global_name("embedding.word_embeddings.weight", 2) == "embedding.word_embeddings.weight"
    assert hm.layer_offset(arch, pp_rank=1, pp=2) == 1
    assert hm.mapping_for(te, arch).hf_names == ("model.layers.1.input_layernorm.weight",)
    # tied: the last stage's output copy maps to the embedding and is not emitted again
    assert hm.mapping_for("output_layer.weight", arch).hf_names == ("model.embed_tokens.weight",)
    assert hm.megatron_to_hf("output_layer.weight", torch.zeros(384, 128), arch) == []
    assert hm.megatron_name_for_hf("lm_head.weight", arch) == "embedding.word_embeddings.weight"
    with pytest.raises(KeyError):
        hm.mapping_for("decoder.layers.0.self_attention.linear_qkv.bias", ARCHS["llama"])  # Llama: no QKV bias
    with pytest.raises(KeyError):
        hm.mapping_for("decoder.layers.9.mlp.linear_fc1.weight", arch)


def test_bad_shard_shapes_are_rejected():
    arch = ARCHS["qwen2_untied"]
    hf = random_hf(arch)
    name = "decoder.layers.0.mlp.linear_fc2.weight"
    shards = [hm.hf_to_megatron(name, hf, arch, r, 2) for r in range(2)]
    with pytest.raises(ValueError):
        hm.megatron_to_hf(name, [shards[0]], arch)  # half the columns: layout mismatch
    with pytest.raises(ValueError):
        hm.shard_segments("decoder.layers.0.mlp.linear_fc1.weight", arch, 0, 5)  # 5 does not divide ffn 192
