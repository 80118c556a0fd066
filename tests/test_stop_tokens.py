"""Where responses end (rollout/stop_tokens.py): the tokenizer's EOS, the model's EOS ids and the chat
template's end-of-turn token — the Qwen2.5-Math case: ChatML prompts on a base model whose EOS is
<|endoftext|> must stop at <|im_end|> too — plus rollout.stop_token_ids."""
import json

import pytest

from megatron_simko.config import load_config
from megatron_simko.data.tokenizer import CHATML_TEMPLATE, load_tokenizer
from megatron_simko.rollout import model_eos_token_ids, stop_token_ids

LLAMA3_TEMPLATE = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}")
PLAIN_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def make_tokenizer(path, eos: str, template: str):
    """A word-level HF tokenizer folder with ChatML / Llama-3 specials, EOS ``eos`` and ``template``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>"]
    vocab = {t: i for i, t in enumerate(specials + ["[UNK]", "user", "assistant", "?", "\n", ":", "x"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")
    hf = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos, pad_token="<|endoftext|>", unk_token="[UNK]",
                                 additional_special_tokens=[s for s in specials if s != eos and s != "<|endoftext|>"],
                                 chat_template=template)
    hf.save_pretrained(path)
    return load_tokenizer(str(path))


def write_model_files(path, config_eos, generation_eos=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"eos_token_id": config_eos}))
    if generation_eos is not None:
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))


def test_chatml_prompts_on_a_base_model_stop_at_im_end(tmp_path):
    tok = make_tokenizer(tmp_path / "tok", eos="<|endoftext|>", template=CHATML_TEMPLATE)
    endoftext, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    assert tok.eos_id == endoftext and tok.end_of_turn_id() == im_end
    write_model_files(tmp_path / "model", config_eos=endoftext, generation_eos=[endoftext, 12])
    assert model_eos_token_ids(str(tmp_path / "model")) == (endoftext, 12)
    assert stop_token_ids(tok, str(tmp_path / "model")) == tuple(sorted({endoftext, im_end, 12}))
    assert stop_token_ids(tok, str(tmp_path / "model"), extra=[40]) == tuple(sorted({endoftext, im_end, 12, 40}))


def test_other_templates(tmp_path):
    llama = make_tokenizer(tmp_path / "llama", eos="<|endoftext|>", template=LLAMA3_TEMPLATE)
    assert llama.end_of_turn_id() == llama.token_to_id("<|eot_id|>")
    plain = make_tokenizer(tmp_path / "plain", eos="<|endoftext|>", template=PLAIN_TEMPLATE)
    assert plain.end_of_turn_id() is None  # a turn that ends in plain text has no stop token
    write_model_files(tmp_path / "model", config_eos=3)  # no generation_config.json
    assert stop_token_ids(plain, str(tmp_path / "model")) == (0, 3)


def test_quickstart_style_tokenizer_without_template_uses_chatml(tmp_path):
    """No chat template: the built-in ChatML rendering's <|im_end|> is the end of turn."""
    tok = make_tokenizer(tmp_path / "tok", eos="<|im_end|>", template=CHATML_TEMPLATE)
    tok.hf.chat_template = None
    assert tok.end_of_turn_id() == tok.token_to_id("<|im_end|>") == tok.eos_id


def test_config_key():
    cfg = load_config(None, ["rollout.stop_token_ids=[5, 9]"])
    assert cfg.rollout.stop_token_ids == [5, 9]
    with pytest.raises(ValueError, match="rollout.stop_token_ids"):
        load_config(None, ["rollout.stop_token_ids=[-1]"])
