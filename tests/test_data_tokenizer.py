"""Tokenizers: train a tiny SentencePiece model, export it as a Hugging Face folder, reload, compare."""
import time

import pytest

from megatron_simko.data import PromptExample, render_prompt
from megatron_simko.data.tokenizer import (CHATML_SYMBOLS, HFTokenizer, SentencePieceTokenizer, export_hf_tokenizer,
                                           load_tokenizer, rg_corpus, train_sentencepiece)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    texts = rg_corpus(["chain_sum", "basic_arithmetic", "knights_knaves"], per_task=100)
    t0 = time.perf_counter()
    sp_file = train_sentencepiece(texts, str(d / "sp"), vocab_size=1024)
    train_s = time.perf_counter() - t0
    hf_dir = export_hf_tokenizer(sp_file, str(d / "hf"))
    return texts, sp_file, hf_dir, train_s


def test_train_is_fast_and_small(trained):
    texts, sp_file, _, train_s = trained
    sp = load_tokenizer(sp_file)
    assert isinstance(sp, SentencePieceTokenizer)
    assert train_s < 10 and 300 < sp.vocab_size <= 1024
    assert [sp.token_to_id(s) for s in CHATML_SYMBOLS] == [4, 5, 6]  # user-defined symbols after unk/bos/eos/pad
    assert (sp.eos_id, sp.pad_id) == (sp.token_to_id("<|im_end|>"), sp.token_to_id("<|endoftext|>"))
    assert all(len(sp.encode(d)) == 1 for d in "0123456789")  # split_digits: one piece per digit


def test_hf_export_matches_sentencepiece(trained):
    from transformers import AutoTokenizer

    texts, sp_file, hf_dir, _ = trained
    auto = AutoTokenizer.from_pretrained(hf_dir)  # what vLLM does
    sp, hf = SentencePieceTokenizer(sp_file), load_tokenizer(hf_dir)
    assert isinstance(hf, HFTokenizer)
    assert (hf.vocab_size, hf.eos_id, hf.pad_id) == (sp.vocab_size, sp.eos_id, sp.pad_id) == \
        (len(auto), auto.eos_token_id, sp.pad_id)
    prompt = render_prompt(PromptExample("Calculate  12 + 345.\n\nThen\tstop.", "357", "math"))
    assert hf.apply_chat([{"role": "system", "content": "You are a helpful assistant."},
                          {"role": "user", "content": "Calculate  12 + 345.\n\nThen\tstop.\nPlease reason step by "
                           "step, and put your final answer within \\boxed{}."}]) == prompt  # template == ChatML
    samples = texts[:300] + [prompt + "So \\boxed{357}<|im_end|>", "héllo 🙂 ünïcode  two  spaces ", " lead"]
    for text in samples:
        ids = sp.encode(text)
        assert hf.encode(text) == ids == auto.encode(text, add_special_tokens=False), text
        assert sp.decode(ids) == hf.decode(ids) == text
    ids = hf.encode(prompt)
    assert ids.count(hf.token_to_id("<|im_start|>")) == 3 and ids.count(hf.eos_id) == 2
    assert "<|im_end|>" not in hf.decode(ids, skip_special_tokens=True)
    assert "<|im_end|>" not in sp.decode(ids, skip_special_tokens=True)


def test_load_tokenizer_rejects_hub_ids():
    with pytest.raises(FileNotFoundError, match="Hugging Face tokenizer folder"):
        load_tokenizer("Qwen/Qwen2.5-Math-7B")


def test_byte_level_bpe_survives_a_qwen2_model_folder(tmp_path):
    """Inside a folder whose config.json says qwen2, AutoTokenizer (the trainer's and vLLM's path) rebuilds
    Qwen2's pipeline; a byte-level BPE trained with that pipeline must reload with identical ids and text."""
    import json

    from transformers import PreTrainedTokenizerFast

    from megatron_simko.data.tokenizer import CHATML_TEMPLATE, train_byte_level_bpe

    texts = rg_corpus(["chain_sum"], per_task=100)
    core = train_byte_level_bpe(texts, 512, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            additional_special_tokens=["<|im_start|>"], chat_template=CHATML_TEMPLATE,
                            clean_up_tokenization_spaces=False).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    tok = load_tokenizer(str(tmp_path))
    for text in texts[:50] + ["a  b\n\n\tc ", "héllo 🙂", "<|im_start|>user\n1 + 2<|im_end|>"]:
        ids = tok.encode(text)
        assert ids == core.encode(text, add_special_tokens=False).ids and tok.decode(ids) == text
    assert tok.eos_id == tok.token_to_id("<|im_end|>") == 2


def test_over_long_prompts_are_dropped_when_the_dataset_loads(trained):
    """drop_long_prompts keeps exactly the prompts whose chat rendering fits the budget (lengths recomputed
    here), and says so when none fits."""
    from megatron_simko.data import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM, drop_long_prompts, prompt_token_ids

    tok = load_tokenizer(trained[2])
    examples = [PromptExample("1 + 2" + " + 3" * k, "x", "math") for k in range(0, 60, 3)]
    lengths = [len(tok.encode(render_prompt(ex, tok, system=DEFAULT_SYSTEM, instruction=DEFAULT_INSTRUCTION)))
               for ex in examples]
    limit = sorted(lengths)[len(lengths) // 2]
    kept, dropped = drop_long_prompts(examples, tok, limit, DEFAULT_SYSTEM, DEFAULT_INSTRUCTION, "data.train")
    assert kept == [ex for ex, n in zip(examples, lengths) if n <= limit] and dropped == len(examples) - len(kept) > 0
    assert all(len(prompt_token_ids(ex, tok, DEFAULT_SYSTEM, DEFAULT_INSTRUCTION)) <= limit for ex in kept)
    with pytest.raises(ValueError, match=r"data.train: all 20 prompts are longer than rollout.max_prompt_length=5"):
        drop_long_prompts(examples, tok, 5, DEFAULT_SYSTEM, DEFAULT_INSTRUCTION, "data.train")
