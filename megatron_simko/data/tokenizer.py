"""Tokenizers: one small interface over a Hugging Face tokenizer folder and a SentencePiece `.model` file.

    tok = load_tokenizer(path)        # a folder -> HFTokenizer, a *.model file -> SentencePieceTokenizer
    ids = tok.encode(tok.apply_chat(messages))

`apply_chat` uses the tokenizer's chat template when it has one, else Qwen-style ChatML (`render_chatml`).
Generation ends at `eos_id`: for a SentencePiece model that defines the ChatML symbols it is `<|im_end|>`
(the end of the assistant turn), else the model's `</s>`.

The quickstart trains a tiny SentencePiece unigram model locally (`train_sentencepiece`, < 1 s) and exports it
as a Hugging Face tokenizer folder (`export_hf_tokenizer`) that vLLM and `AutoTokenizer` load: the same pieces,
ids and scores in a `tokenizers` Unigram model, the ChatML symbols as special tokens and a ChatML chat template.
"""
from __future__ import annotations

import io
import json
import os
from typing import Iterable, Sequence

from .prompts import Messages, render_chatml

CHATML_SYMBOLS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
# Jinja rendering identical to `render_chatml` (no implicit system message).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class Tokenizer:
    """What the trainer, the rollout engine and the data code need from a tokenizer."""

    path: str  # the folder or file it was loaded from
    eos_id: int
    pad_id: int
    vocab_size: int  # number of ids (model embedding rows needed), including added special tokens

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without adding BOS/EOS (chat renderings carry their own special tokens)."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        raise NotImplementedError

    def apply_chat(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        """The prompt text for chat messages."""
        return render_chatml(messages, add_generation_prompt)

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def end_of_turn_id(self) -> int | None:
        """The special token the chat rendering puts right after an assistant message (ChatML: <|im_end|>,
        Llama 3: <|eot_id|>): where a chat model's response ends. None if that is not one special token."""
        mark = "\u2063END-OF-TURN-PROBE\u2063"
        try:
            text = self.apply_chat([{"role": "user", "content": "?"}, {"role": "assistant", "content": mark}],
                                   add_generation_prompt=False)
        except Exception:  # a template that refuses this conversation: no end-of-turn token known
            return None
        if mark not in text:
            return None
        after = text.split(mark, 1)[1]
        ids = self.encode(after)[:1] if after else []
        if not ids or self.decode(ids, skip_special_tokens=True) != "":
            return None  # ends in plain text (or nothing): no single special token to stop at
        return int(ids[0])


class HFTokenizer(Tokenizer):
    """A local Hugging Face tokenizer folder (never a hub id)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer folder {path!r} does not exist (hub ids are not supported)")
        self.path = path
        self.hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        eos = self.hf.eos_token_id
        if eos is None:
            raise ValueError(f"{path}: tokenizer defines no eos_token")
        self.eos_id = int(eos)
        self.pad_id = int(self.hf.pad_token_id) if self.hf.pad_token_id is not None else self.eos_id
        self.vocab_size = len(self.hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        if getattr(self.hf, "chat_template", None):
            return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return render_chatml(messages, add_generation_prompt)

    def token_to_id(self, token: str) -> int | None:
        i = self.hf.convert_tokens_to_ids(token)
        return None if i is None or i == self.hf.unk_token_id and token != self.hf.unk_token else int(i)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` file (Llama-style), rendered with built-in ChatML."""

    def __init__(self, model_file: str):
        import sentencepiece as spm

        self.path = model_file
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self.sp.get_piece_size()
        im_end, eot = self.token_to_id("<|im_end|>"), self.token_to_id("<|endoftext|>")
        self.eos_id = im_end if im_end is not None else self.sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"{model_file}: no eos piece (neither <|im_end|> nor </s>)")
        pad = eot if eot is not None else self.sp.pad_id()
        self.pad_id = pad if pad >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if not skip_special_tokens:  # sentencepiece drops control symbols; user-defined ones decode as text
            return self.sp.decode(ids)
        specials = {self.token_to_id(s) for s in CHATML_SYMBOLS} - {None}
        return self.sp.decode([i for i in ids if i not in specials])

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else int(i)


def load_tokenizer(path: str) -> Tokenizer:
    """A folder -> HFTokenizer; a `.model` file -> SentencePieceTokenizer."""
    if os.path.isdir(path):
        return HFTokenizer(path)
    if path.endswith(".model") and os.path.isfile(path):
        return SentencePieceTokenizer(path)
    raise FileNotFoundError(f"tokenizer {path!r}: expected a Hugging Face tokenizer folder or a SentencePiece "
                            f".model file")


# ----------------------------------------------------------------------------------------------- training
def rg_corpus(task_names: Iterable[str], per_task: int = 500, seed: int = 0) -> list[str]:
    """Questions and answers of reasoning-gym tasks, plus the default system message and instruction."""
    from .procedural import ReasoningGymPrompts
    from .prompts import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM

    texts = [DEFAULT_SYSTEM, DEFAULT_INSTRUCTION, "The answer is \\boxed{42}.", "<answer>42</answer>"]
    for name in task_names:
        for ex in ReasoningGymPrompts(name, per_task, seed):
            texts.extend([ex.prompt, ex.answer, f"\\boxed{{{ex.answer}}}"])
    return texts


def train_sentencepiece(texts: Iterable[str], model_prefix: str, vocab_size: int = 1024,
                        user_defined_symbols: Sequence[str] = tuple(CHATML_SYMBOLS)) -> str:
    """Trains a small SentencePiece unigram model on texts; writes `{model_prefix}.model`, returns its path.

    Byte fallback (any text is encodable), digits split one per piece, identity normalization (newlines and
    spaces survive a round trip), no dummy prefix (so the HF export is exact). vocab_size is an upper bound:
    a small corpus yields fewer pieces.
    """
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([t for t in texts if t]), model_writer=buf, vocab_size=vocab_size,
        model_type="unigram", user_defined_symbols=list(user_defined_symbols), split_digits=True,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, split_by_whitespace=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, hard_vocab_limit=False, num_threads=1, minloglevel=2,
        max_sentence_length=1 << 16)
    path = model_prefix + ".model"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str]):
    """A byte-level BPE tokenizer (`tokenizers` core) with Qwen2's exact pipeline: NFC, Qwen2's split regex (one
    digit per token), byte-level alphabet, `special_tokens` first (ids 0, 1, ...). Unlike a SentencePiece export,
    it loads identically through `AutoTokenizer` inside a Qwen2 model folder (vLLM's path). Returns the core
    tokenizer; wrap it in `transformers.PreTrainedTokenizerFast` to save a folder."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFCoreTokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    core = HFCoreTokenizer(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    return core


BPE_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 of `build_chatml_bpe`


def build_chatml_bpe(out_dir: str, texts: Iterable[str], vocab_size: int, eos_token: str,
                     model_max_length: int | None = None):
    """A byte-level BPE (`train_byte_level_bpe`) on ``texts`` plus the ChatML role markers (×50, so they get
    merges), with `BPE_SPECIAL_TOKENS` as ids 0, 1, 2, saved in ``out_dir`` as a Hugging Face tokenizer folder:
    pad <|endoftext|>, eos ``eos_token`` (<|im_end|>: a chat model; <|endoftext|>: as Qwen2.5 base models), the
    other ChatML symbols additional special tokens, the ChatML chat template. Returns the core tokenizer (the
    reference a reload of the folder is checked against). Used by the tiny model (models/tiny.py) and the GPU
    smoke run (smoke/build.py)."""
    from transformers import PreTrainedTokenizerFast

    texts = list(texts) + [render_chatml([{"role": r, "content": "."}]) for r in ("system", "user", "assistant")] * 50
    core = train_byte_level_bpe(texts, vocab_size, BPE_SPECIAL_TOKENS)
    kwargs = dict(tokenizer_object=core, eos_token=eos_token, pad_token="<|endoftext|>", unk_token=None,
                  additional_special_tokens=[s for s in ("<|im_start|>", "<|im_end|>") if s != eos_token],
                  chat_template=CHATML_TEMPLATE)
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    PreTrainedTokenizerFast(**kwargs, clean_up_tokenization_spaces=False).save_pretrained(out_dir)
    return core


def export_hf_tokenizer(sp_model_file: str, out_dir: str, chat_template: str = CHATML_TEMPLATE) -> str:
    """Writes a Hugging Face tokenizer folder equivalent to a SentencePiece unigram model trained by
    `train_sentencepiece` (same ids; eos <|im_end|>, pad <|endoftext|>); returns out_dir.

    Known limitation (transformers 5.x): placed in a model folder whose config.json says model_type "qwen2",
    `AutoTokenizer` (and so vLLM) loads it as `Qwen2Tokenizer`, which rebuilds a byte-level pre-tokenizer around
    this Unigram vocabulary and drops spaces and newlines. Use it standalone or beside a Llama-style model; for a
    Qwen2 model folder use `train_byte_level_bpe` instead (tools/make_tiny_model.py does, and checks the reload)."""
    import sentencepiece as spm
    from tokenizers import Tokenizer as HFCoreTokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=sp_model_file)
    vocab = []
    for i in range(sp.get_piece_size()):
        # Control pieces (<s>, </s>, <pad>) must never match text: give them a prohibitive score.
        score = -1e9 if sp.is_control(i) else sp.get_score(i)
        vocab.append((sp.id_to_piece(i), float(score)))
    core = HFCoreTokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=True))
    core.normalizer = normalizers.Replace(" ", "\u2581")
    # Split on whitespace like sentencepiece's split_by_whitespace: "▁" starts a new piece, nothing is prepended.
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    core.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    present = [s for s in CHATML_SYMBOLS if sp.piece_to_id(s) != sp.unk_id()]
    hf = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token=sp.id_to_piece(sp.unk_id()),
        eos_token="<|im_end|>" if "<|im_end|>" in present else sp.id_to_piece(sp.eos_id()),
        pad_token="<|endoftext|>" if "<|endoftext|>" in present else sp.id_to_piece(sp.pad_id()),
        additional_special_tokens=[s for s in present if s not in ("<|im_end|>", "<|endoftext|>")],
        chat_template=chat_template, model_max_length=1 << 20, clean_up_tokenization_spaces=False)
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "sentencepiece_source.json"), "w") as f:
        json.dump({"sp_model_file": os.path.abspath(sp_model_file)}, f)
    return out_dir
