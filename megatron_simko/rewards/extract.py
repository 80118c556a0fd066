"""Answer extraction from a model response."""
from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_TEXT_WRAP = re.compile(r"^\\text\{(.*)\}$", re.DOTALL)


def _braced(text: str, start: int) -> str | None:
    """Content of the brace group opening at text[start] == "{", or None if it never closes.
    Escaped braces (\\{ and \\}) do not count."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the LAST \\boxed{...} (or \\fbox{...}) in text, nested braces included.

    `\\boxed 5` (no braces) gives "5". None when there is no box or the last one is not closed (e.g. a
    response cut off at the length limit): an unfinished last answer is no answer.
    """
    pos = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if pos < 0:
        return None
    cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, pos))
    i = pos + len(cmd)
    j = i
    while j < len(text) and text[j].isspace():
        j += 1
    if j < len(text) and text[j] == "{":
        return _braced(text, j)
    if j > i:  # "\boxed 5": the next token
        m = re.match(r"[^\s$]+", text[j:])
        return m.group(0) if m else None
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a response to a procedural (reasoning-gym) task, in this order:
    the last \\boxed{...} (a single outer \\text{...} unwrapped); else the last <answer>...</answer>;
    else the last non-empty line. Stripped; None if nothing is found."""
    boxed = last_boxed(text)
    if boxed is not None:
        m = _TEXT_WRAP.match(boxed.strip())
        return (m.group(1) if m else boxed).strip()
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else None
