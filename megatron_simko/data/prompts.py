"""Prompt datasets from jsonl / parquet files, and the chat rendering of a prompt.

A row needs a problem text ("prompt" or "problem") and a gold "answer"; "data_source" is optional (default: the
caller's value, else the file's stem). Every other field is kept in `PromptExample.metadata`.

"prompt" may also be a list of chat messages ({"role", "content"}), as in verl-style parquet files; such a
prompt is rendered as given, without the default system message and instruction.

A malformed row raises ValueError naming the file, the 1-based row number and the field. With
`skip_malformed=True` such rows are skipped instead, and the count is reported as a warning (never silently).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

DEFAULT_SYSTEM = "You are a helpful assistant."
# The paper's instruction (Qwen2.5-Math setup), appended to the problem on a new line.
DEFAULT_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."

Messages = list[dict[str, str]]


@dataclass
class PromptExample:
    """One prompt: the problem (text, or chat messages), its gold answer, where it comes from, anything else."""

    prompt: Union[str, Messages]
    answer: str
    data_source: str
    metadata: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- rendering
def build_messages(prompt: Union[str, Messages], system: str | None = DEFAULT_SYSTEM,
                   instruction: str = DEFAULT_INSTRUCTION) -> Messages:
    """The chat messages for a prompt: [system], user = problem + instruction. Message lists pass unchanged."""
    if not isinstance(prompt, str):
        return [dict(m) for m in prompt]
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": prompt + instruction})
    return messages


def render_chatml(messages: Messages, add_generation_prompt: bool = True) -> str:
    """Qwen-style ChatML, for tokenizers without a chat template (e.g. a SentencePiece model)."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def render_prompt(example: Union[PromptExample, str, Messages], tokenizer=None, system: str | None = DEFAULT_SYSTEM,
                  instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The text given to the model: the tokenizer's chat rendering if one is given, else built-in ChatML."""
    prompt = example.prompt if isinstance(example, PromptExample) else example
    messages = build_messages(prompt, system, instruction)
    if tokenizer is not None:
        return tokenizer.apply_chat(messages)
    return render_chatml(messages)


# ----------------------------------------------------------------------------------------------- loading
def _rows(path: str):
    """Yields (row_number, row_or_error) with 1-based row numbers; a row that is not a JSON object is an error."""
    if path.endswith(".jsonl") or path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            row_no = 0
            for line in f:
                if not line.strip():  # blank lines are not rows
                    continue
                row_no += 1
                try:
                    yield row_no, json.loads(line)
                except json.JSONDecodeError as e:
                    yield row_no, ValueError(f"invalid JSON ({e.msg} at column {e.colno})")
    elif path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:  # pragma: no cover - pyarrow comes with vllm / datasets
            raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from e
        for row_no, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield row_no, row
    else:
        raise ValueError(f"{path}: unsupported prompt file type (expected .jsonl, .json lines or .parquet)")


def _parse_row(row: Any, default_source: str) -> PromptExample:
    """A PromptExample from one row; raises ValueError("field 'x': ...") on a malformed one."""
    if isinstance(row, Exception):
        raise ValueError(f"field '<row>': {row}")
    if not isinstance(row, dict):
        raise ValueError(f"field '<row>': expected a JSON object, got {type(row).__name__}")
    key = "prompt" if row.get("prompt") is not None else "problem" if row.get("problem") is not None else None
    if key is None:
        raise ValueError("field 'prompt': missing (need 'prompt' or 'problem')")
    prompt = row[key]
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                  and isinstance(m.get("content"), str) for m in prompt):
            raise ValueError(f"field '{key}': a message list needs {{'role': str, 'content': str}} items")
    elif not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"field '{key}': expected a non-empty string, got {type(prompt).__name__} {prompt!r:.40}")
    answer = row.get("answer")
    if answer is None:
        raise ValueError("field 'answer': missing")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"field 'answer': expected a string or number, got {type(answer).__name__}")
    source = row.get("data_source", default_source)
    if source is None:
        source = default_source
    if not isinstance(source, str) or not source:
        raise ValueError(f"field 'data_source': expected a non-empty string, got {source!r:.40}")
    extra = {k: v for k, v in row.items()
             if k not in (key, "answer", "data_source") and not (k in ("prompt", "problem") and v is None)}
    return PromptExample(prompt=prompt, answer=str(answer), data_source=source, metadata=extra)


def load_prompt_file(path: str, data_source: str | None = None, skip_malformed: bool = False) -> list[PromptExample]:
    """All rows of a .jsonl or .parquet prompt file.

    data_source: used for rows without one (default: the file name without extension).
    skip_malformed: skip bad rows with a warning count instead of raising.
    """
    default_source = data_source or os.path.basename(path).split(".")[0]
    examples, bad = [], []
    for row_no, row in _rows(path):
        try:
            examples.append(_parse_row(row, default_source))
        except ValueError as e:
            msg = f"{path}: row {row_no}: {e}"
            if not skip_malformed:
                raise ValueError(msg) from None
            bad.append(msg)
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} malformed row(s); first: {bad[0]}", stacklevel=2)
    if not examples:
        raise ValueError(f"{path}: no usable rows")
    return examples


def load_prompt_files(paths: Sequence[str], data_source: str | None = None,
                      skip_malformed: bool = False) -> list[PromptExample]:
    """Concatenation of several prompt files, in order."""
    out: list[PromptExample] = []
    for p in paths:
        out.extend(load_prompt_file(p, data_source, skip_malformed))
    return out


def write_prompt_jsonl(path: str, examples: Sequence[PromptExample]) -> None:
    """Writes examples as a jsonl prompt file (metadata flattened back into the row), atomically."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for ex in examples:
            row = {"prompt": ex.prompt, "answer": ex.answer, "data_source": ex.data_source, **ex.metadata}
            f.write(json.dumps(row, default=str) + "\n")
    os.replace(tmp, path)
