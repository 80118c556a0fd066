"""tools/make_tiny_model.py: the quickstart's model folder loads everywhere it is used (transformers, our
architecture reader, TP=2), its tokenizer survives AutoTokenizer's Qwen2 class selection, and the tool writes
atomically and refuses to overwrite without --force."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "make_tiny_model.py")
sys.path.insert(0, os.path.join(ROOT, "tools"))

import make_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    assert make_tiny_model.main(["--out-dir", str(out), "--sft-steps", "0", "--seed", "3"]) == 0
    return out


def test_folder_loads_and_matches_tokenizer(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_simko.data import PromptExample, render_prompt
    from megatron_simko.data.tokenizer import load_tokenizer

    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["model"]  # no tmp / old folders left
    hf_tok = AutoTokenizer.from_pretrained(model_dir)  # what vLLM does, next to a qwen2 config.json
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = model.config
    assert cfg.model_type == "qwen2" and not cfg.tie_word_embeddings and cfg.dtype == torch.float32
    assert cfg.vocab_size == len(hf_tok) == model.get_input_embeddings().weight.shape[0]
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (256, 4, 2, 64)
    assert cfg.max_position_embeddings >= 512 and 2 <= cfg.num_hidden_layers <= 4

    im_start, im_end = (hf_tok.convert_tokens_to_ids(s) for s in ("<|im_start|>", "<|im_end|>"))
    assert hf_tok.encode("<|im_start|>", add_special_tokens=False) == [im_start]
    assert hf_tok.encode("<|im_end|>", add_special_tokens=False) == [im_end]
    assert hf_tok.eos_token_id == im_end == cfg.eos_token_id
    assert hf_tok.pad_token_id == cfg.pad_token_id != im_end
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == im_end and "temperature" not in gen and "top_k" not in gen

    # The trainer's tokenizer and AutoTokenizer agree, and text (spaces, newlines, any byte) round-trips.
    tok = load_tokenizer(str(model_dir))
    prompt = render_prompt(PromptExample("Calculate  12 - 345.\n\tThen stop. héllo 🙂", "x", "t"), tok)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    text = prompt + "The answer is \\boxed{-333}.<|im_end|>"
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False) and tok.decode(ids) == text
    assert ids.count(im_start) == 3 and ids.count(im_end) == 3 and max(ids) < cfg.vocab_size
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits  # (1, T, V)
    assert logits.shape == (1, len(ids), cfg.vocab_size) and torch.isfinite(logits).all()


def test_arch_and_tensor_parallel(model_dir):
    from megatron_simko.models import arch_from_hf_config, validate_parallelism

    arch = arch_from_hf_config(str(model_dir))
    validate_parallelism(arch, 2, 1)
    assert (arch.num_attention_heads, arch.num_query_groups, arch.ffn_hidden_size) == (4, 2, 512)
    record = json.loads((model_dir / "tiny_model.json").read_text())
    assert record["reasoning_gym_config"] == make_tiny_model.DEFAULT_TASK_CONFIGS["chain_sum"]
    assert (record["task"], record["seed"], record["sft_steps"], record["eval"]) == ("chain_sum", 3, 0, None)
    assert record["vocab_size"] == arch.vocab_size


def test_refuses_existing_dir_without_force(model_dir):
    before = sorted(os.listdir(model_dir))
    res = subprocess.run([sys.executable, TOOL, "--out-dir", str(model_dir), "--sft-steps", "0"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "exists and is not empty" in res.stderr and "--force" in res.stderr
    assert sorted(os.listdir(model_dir)) == before


def test_short_sft_with_force_records_accuracy(model_dir, capsys):
    """--force replaces the folder; a few SFT steps lower the loss; the accuracy check runs and is recorded."""
    argv = ["--out-dir", str(model_dir), "--sft-steps", "6", "--sft-batch-size", "4", "--eval-prompts", "2",
            "--eval-samples", "2", "--seed", "3", "--force"]
    assert make_tiny_model.main(argv) == 0
    out = capsys.readouterr().out
    assert "accuracy at temperature 1.0" in out
    record = json.loads((model_dir / "tiny_model.json").read_text())
    assert record["sft_steps"] == 6 and record["sft"]["final_loss"] < record["sft"]["first_loss"]
    assert 0.0 <= record["eval"]["accuracy"] <= 1.0 and record["eval"]["samples_per_prompt"] == 2
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["model"]


def test_countdown_target_prompt_style_and_spec_defaults():
    """The study's task: the SFT response is the numbers in the given order with the signs that reach the target,
    which the task's own checker accepts; the compact prompt keeps the problem; countdown stops SFT on sampled
    accuracy (many valid answers)."""
    from megatron_simko.models.tiny import TinyModelSpec, response_text, signed_sum, task_examples
    from megatron_simko.rewards.reasoning_gym_reward import reasoning_gym_reward

    cfg = make_tiny_model.DEFAULT_TASK_CONFIGS["countdown"]
    plain = task_examples("countdown", cfg, "train", 20, 0)
    compact = task_examples("countdown", cfg, "train", 20, 0, style="compact")
    for ex, short in zip(plain, compact):
        meta = ex.metadata["rg_entry"]["metadata"]
        nums = ", ".join(map(str, meta["numbers"]))
        assert nums in ex.prompt and str(meta['target']) in ex.prompt  # phrasing varies
        assert short.prompt == f"Make {meta['target']} from {nums}." and short.metadata == ex.metadata
        text = response_text(short, "countdown")
        expr = text[len("\\boxed{"):-len("}.")]
        assert [int(t) for t in expr.replace("-", " ").replace("+", " ").split()] == meta["numbers"]  # in order
        assert eval(expr) == meta["target"]
        assert reasoning_gym_reward(text, short) == 1.0 == reasoning_gym_reward(f"\\boxed{{{ex.answer}}}", short)
    assert signed_sum([7, 5, 1], 1) == "7 - 5 - 1" and signed_sum([4, 7, 8], 11) == "-4 + 7 + 8"
    assert signed_sum([1, 1], 5) is None
    spec = TinyModelSpec(task="countdown", prompt_style="compact").resolved()
    assert spec.stop_metric == "sampled" and spec.task_config == cfg
    assert TinyModelSpec().resolved().stop_metric == "expected"
    for bad in (dict(stop_metric="nope"), dict(prompt_style="compact"), dict(task="countdown", prompt_style="x")):
        with pytest.raises(ValueError):
            TinyModelSpec(**bad).resolved()
