"""Checkpoint conversion on disk: bitwise round trips at TP/PP ∈ {1,2}², the native format, the CLI's errors.

Tiny random models made with transformers' ``save_pretrained`` (no hub). Logits parity (torchrun) lives in
test_convert_logits.py.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_simko.checkpoint import convert, native
from megatron_simko.checkpoint.safetensors_io import INDEX_NAME, CheckpointError, SafetensorsDir, write_safetensors
from megatron_simko.checkpoint.verify import compare_hf_dirs
from megatron_simko.models import hf_mapping as hm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(REPO, "tools", "convert_checkpoint.py")


def make_hf_model(kind: str, out_dir: str, dtype=torch.float32, seed: int = 0) -> str:
    """Tiny random HF checkpoints: 'qwen2_tied', 'qwen2_untied' (rope_theta 1e6), 'llama' (llama3 RoPE scaling).

    Head dims 32/64 also suit vLLM's CPU attention; vocab 300 exercises padding (384 at TP 1, 512 at TP 2).
    """
    import transformers

    torch.manual_seed(seed)
    common = dict(num_hidden_layers=4, vocab_size=300, max_position_embeddings=16384, rms_norm_eps=1e-6,
                  bos_token_id=1, eos_token_id=2)
    if kind == "qwen2_tied":
        cfg = transformers.Qwen2Config(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                       intermediate_size=256, tie_word_embeddings=True, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "qwen2_untied":
        cfg = transformers.Qwen2Config(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                       intermediate_size=192, tie_word_embeddings=False, rope_theta=1e6, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(
            hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=320,
            tie_word_embeddings=False, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}, **common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # non-trivial norms and biases, so a swapped tensor cannot go unnoticed
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0))
    model.to(dtype).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {k: make_hf_model(k, str(root / k)) for k in ("qwen2_tied", "qwen2_untied", "llama")}
    out["qwen2_bf16"] = make_hf_model("qwen2_untied", str(root / "qwen2_bf16"), dtype=torch.bfloat16, seed=1)
    return out


def run_cli(*args):
    return subprocess.run([sys.executable, CLI, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("kind", ["qwen2_tied", "qwen2_untied", "llama"])
def test_round_trip_bitwise_all_layouts(models, kind, tmp_path):
    hf = models[kind]
    for tp, pp in [(1, 1), (2, 1), (1, 2), (2, 2)]:
        meg, back = tmp_path / f"meg{tp}{pp}", tmp_path / f"hf{tp}{pp}"
        meta = convert.hf_to_megatron(hf, str(meg), tp, pp, progress=False, max_shard_bytes=400_000)
        vp = meta.padded_vocab_size
        assert vp == (384 if tp == 1 else 512)  # a multiple of 128·TP
        # the native layout: one directory per rank, global layer names, this rank's shards only
        dirs = sorted(d for d in os.listdir(meg) if d.startswith("mp_rank_"))
        assert dirs == sorted(native.rank_dir_name(t, p) for t in range(tp) for p in range(pp))
        ck = native.NativeCheckpoint(str(meg))
        arch = ck.arch
        for p in range(pp):
            names = set(SafetensorsDir(str(meg / native.rank_dir_name(0, p))).names())
            assert names == set(native.stage_param_names(arch, pp)[p])
        last = SafetensorsDir(str(meg / native.rank_dir_name(tp - 1, pp - 1)))
        assert ("output_layer.weight" in last) == (not arch.tie_word_embeddings or pp > 1)
        emb = ck.shard("embedding.word_embeddings.weight", tp - 1)
        assert emb.shape == (vp // tp, arch.hidden_size) and not emb[300 - vp // tp * (tp - 1):].any()
        convert.megatron_to_hf(str(meg), str(back), progress=False, max_shard_bytes=400_000)
        ok, detail = compare_hf_dirs(hf, str(back))
        assert ok, (tp, pp, detail)
        index = json.load(open(back / INDEX_NAME))
        assert len(set(index["weight_map"].values())) > 1  # several shards, listed in the index
        for f in ("config.json", "generation_config.json"):
            assert os.path.isfile(back / f)


def test_output_loads_in_transformers_and_safetensors(models, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    hf = models["qwen2_tied"]
    convert.hf_to_megatron(hf, str(tmp_path / "meg"), 2, 2, progress=False)
    convert.megatron_to_hf(str(tmp_path / "meg"), str(tmp_path / "back"), hf_config_from=hf, progress=False)
    tokens = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(hf).eval()(tokens).logits
        b = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()(tokens).logits
    assert torch.equal(a, b)
    rank_dir = tmp_path / "meg" / "mp_rank_01_001"
    ours = SafetensorsDir(str(rank_dir))
    for fn in (f for f in os.listdir(rank_dir) if f.endswith(".safetensors")):  # our writer's files are standard
        with safe_open(str(rank_dir / fn), framework="pt") as f:
            for k in f.keys():
                assert torch.equal(f.get_tensor(k), ours.read(k))


def test_tied_checkpoint_with_explicit_lm_head_keeps_it(models, tmp_path):
    src = models["qwen2_tied"]
    hf = tmp_path / "with_head"
    hf.mkdir()
    for fn in os.listdir(src):
        if not fn.endswith(".safetensors"):
            (hf / fn).write_bytes(open(os.path.join(src, fn), "rb").read())
    tensors = SafetensorsDir(src)
    entries = [(n, tensors.read(n)) for n in tensors.names()]
    entries.append(("lm_head.weight", tensors.read("model.embed_tokens.weight").clone()))
    write_safetensors(str(hf / "model.safetensors"), entries)
    convert.hf_to_megatron(str(hf), str(tmp_path / "meg"), 2, 1, progress=False)
    convert.megatron_to_hf(str(tmp_path / "meg"), str(tmp_path / "back"), progress=False)
    ok, detail = compare_hf_dirs(str(hf), str(tmp_path / "back"))
    assert ok, detail


def test_bf16_kept_and_dtype_policy(models, tmp_path):
    hf = models["qwen2_bf16"]
    meta = convert.hf_to_megatron(hf, str(tmp_path / "m"), 2, 1, progress=False)
    assert meta.dtype == "bfloat16"
    convert.megatron_to_hf(str(tmp_path / "m"), str(tmp_path / "h"), progress=False)
    assert compare_hf_dirs(hf, str(tmp_path / "h"))[0]
    up = convert.hf_to_megatron(hf, str(tmp_path / "m32"), 1, 1, dtype="fp32", progress=False)  # lossless
    assert up.dtype == "float32"
    convert.megatron_to_hf(str(tmp_path / "m32"), str(tmp_path / "h16"), dtype="bf16", progress=False, force=True)
    assert compare_hf_dirs(hf, str(tmp_path / "h16"))[0]  # fp32 -> bf16 is exact for values that were bf16
    with pytest.raises(ValueError, match="allow-lossy"):  # random fp32 weights do not fit bf16
        convert.hf_to_megatron(models["llama"], str(tmp_path / "lossy"), 1, 1, dtype="bf16", progress=False)
    assert not os.path.exists(tmp_path / "lossy")
    convert.hf_to_megatron(models["llama"], str(tmp_path / "lossy"), 1, 1, dtype="bf16", allow_lossy=True,
                           progress=False)
    assert native.read_meta(str(tmp_path / "lossy")).dtype == "bfloat16"


def test_errors(models, tmp_path):
    hf = models["qwen2_untied"]
    # unknown architecture
    bad = tmp_path / "bad_arch"
    bad.mkdir()
    cfg = json.load(open(os.path.join(hf, "config.json")))
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    json.dump(cfg, open(bad / "config.json", "w"))
    with pytest.raises(ValueError, match="unsupported architecture"):
        convert.hf_to_megatron(str(bad), str(tmp_path / "o1"), progress=False)
    # parallelism that does not divide heads / KV groups / layers
    with pytest.raises(ValueError, match="num_key_value_heads"):
        convert.hf_to_megatron(hf, str(tmp_path / "o2"), tp=4, progress=False)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        convert.hf_to_megatron(hf, str(tmp_path / "o3"), pp=3, progress=False)
    # an index naming a missing shard; a truncated shard
    meg = tmp_path / "meg"
    convert.hf_to_megatron(hf, str(meg), 1, 2, progress=False, max_shard_bytes=200_000)
    rank = meg / "mp_rank_00_001"
    shard = sorted(f for f in os.listdir(rank) if f.endswith(".safetensors"))[-1]
    data = (rank / shard).read_bytes()
    (rank / shard).write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        convert.megatron_to_hf(str(meg), str(tmp_path / "o4"), progress=False)
    os.remove(rank / shard)
    with pytest.raises(CheckpointError, match="do not exist"):
        convert.megatron_to_hf(str(meg), str(tmp_path / "o4"), progress=False)
    assert not os.path.exists(tmp_path / "o4")
    # a tensor missing from the HF checkpoint; a tensor the mapping does not know
    t = SafetensorsDir(hf)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_bytes(open(os.path.join(hf, "config.json"), "rb").read())
    write_safetensors(str(partial / "model.safetensors"),
                      [(n, t.read(n)) for n in t.names() if n != "model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(CheckpointError, match="missing"):
        convert.hf_to_megatron(str(partial), str(tmp_path / "o5"), progress=False)
    write_safetensors(str(partial / "model.safetensors"),
                      [(n, t.read(n)) for n in t.names()] + [("model.layers.0.self_attn.o_proj.bias",
                                                               torch.zeros(128))])
    with pytest.raises(CheckpointError, match="does not know"):
        convert.hf_to_megatron(str(partial), str(tmp_path / "o5"), progress=False)


def test_output_dir_is_atomic_and_protected(models, tmp_path, monkeypatch):
    hf = models["llama"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--force"):
        convert.hf_to_megatron(hf, str(out), progress=False)
    with pytest.raises(ValueError, match="overwrite the input"):
        convert.hf_to_megatron(hf, hf, progress=False, force=True)
    # an interrupted conversion leaves neither OUT nor OUT.tmp-*
    real = hm.hf_to_megatron
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(hm, "hf_to_megatron", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert.hf_to_megatron(hf, str(tmp_path / "fresh"), 2, 1, progress=False)
    monkeypatch.setattr(hm, "hf_to_megatron", real)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    convert.hf_to_megatron(hf, str(out), 2, 1, progress=False, force=True)
    assert not os.path.exists(out / "keep.txt") and os.path.isfile(out / native.META_NAME)


def test_cli(models, tmp_path):
    hf = models["qwen2_tied"]
    r = run_cli("hf-to-megatron", "--hf-dir", hf, "--out-dir", str(tmp_path / "m"), "--tp", "2", "--pp", "2",
                "--no-progress")
    assert r.returncode == 0, r.stderr
    r = run_cli("megatron-to-hf", "--megatron-dir", str(tmp_path / "m"), "--out-dir", str(tmp_path / "h"),
                "--hf-config-from", hf, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert compare_hf_dirs(hf, str(tmp_path / "h"))[0]
    r = run_cli("hf-to-megatron", "--hf-dir", hf, "--out-dir", str(tmp_path / "m"), "--tp", "3", "--no-progress")
    assert r.returncode == 2 and "tensor_parallel=3" in r.stderr  # bad input: a message, exit 2, no traceback
    assert "Traceback" not in r.stderr
