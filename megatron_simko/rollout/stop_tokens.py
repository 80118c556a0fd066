"""Which token ids end a response: where chat models stop.

    stop ids = the tokenizer's EOS ∪ the model's EOS ids (generation_config.json, then config.json)
             ∪ the chat template's end-of-turn token ∪ rollout.stop_token_ids

The end-of-turn token matters for chat-formatted prompts on a base model: Qwen2.5-Math's tokenizer and
config say EOS = ``<|endoftext|>``, while a ChatML conversation ends each turn with ``<|im_end|>``; stopping
only at EOS would let the model write the next turn itself. Both engines receive these ids through
``SamplingConfig.stop_token_ids`` (the stop token is kept as the response's last token, finish reason
"stop"), and each engine also adds its model's own EOS ids unless ``ignore_eos``.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, List, Tuple


def model_eos_token_ids(model_dir: str) -> Tuple[int, ...]:
    """EOS ids from a model folder's generation_config.json and config.json (union, sorted)."""
    ids: List[int] = []
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            value = json.load(f).get("eos_token_id")
        if value is not None:
            ids += [int(v) for v in (value if isinstance(value, list) else [value])]
    return tuple(sorted(set(ids)))


def stop_token_ids(tokenizer, model_dir: str, extra: Iterable[int] = ()) -> Tuple[int, ...]:
    """All ids that end a response (module docstring), sorted. ``tokenizer``: a ``data.tokenizer.Tokenizer``."""
    ids = {int(tokenizer.eos_id), *model_eos_token_ids(model_dir), *(int(t) for t in extra)}
    end_of_turn = tokenizer.end_of_turn_id()
    if end_of_turn is not None:
        ids.add(end_of_turn)
    return tuple(sorted(ids))
