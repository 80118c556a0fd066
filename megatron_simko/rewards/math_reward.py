"""Math reward: math-verify on the last \\boxed{...} of the response against the gold answer (1.0 or 0.0)."""
from __future__ import annotations

import logging
import threading
from functools import lru_cache

from .extract import last_boxed

# math-verify's own limit per parse / comparison (signal.alarm, whole seconds, main thread only). It stops
# sympy blow-ups early; the hard guarantee is the isolated worker's kill (rewards/worker.py).
INNER_TIMEOUT_S = 1


def set_inner_timeout(seconds: int) -> None:
    """math-verify's own limit (whole seconds, >= 1) for parses and comparisons in this process."""
    global INNER_TIMEOUT_S
    INNER_TIMEOUT_S = max(1, int(seconds))


class _TimeoutCounter(logging.Handler):
    """math-verify reports its own time limit only as a log warning ("Timeout during parsing / comparison")
    and returns "no match": count those (the response scores 0 either way), pass real errors on to stderr."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.count = 0
        self._errors = logging.StreamHandler()
        self._errors.setLevel(logging.ERROR)

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Timeout during"):
            self.count += 1
        elif record.levelno >= logging.ERROR:
            self._errors.emit(record)


_timeouts = _TimeoutCounter()


def count_verify_timeouts() -> None:
    """From now on, count math-verify's own time-limit hits (see verify_timeouts) instead of logging them."""
    mv = logging.getLogger("math_verify")
    if _timeouts not in mv.handlers:
        mv.addHandler(_timeouts)
        mv.setLevel(logging.WARNING)
        mv.propagate = False


def verify_timeouts() -> int:
    """math-verify time-limit hits in this process since count_verify_timeouts()."""
    return _timeouts.count


def _timeout() -> int | None:
    return INNER_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=65536)
def _parse_gold(gold: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    boxed = last_boxed(gold)
    text = f"\\boxed{{{boxed}}}" if boxed is not None else f"${gold}$"
    return parse(text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=_timeout())


def _squash(s: str) -> str:
    return "".join(s.split())


def math_verify_equal(pred: str, gold: str) -> bool:
    """True if the LaTeX answer `pred` (box content) equals `gold` per math-verify."""
    from math_verify import LatexExtractionConfig, parse, verify

    if _squash(pred) and _squash(pred) == _squash(gold):  # identical text: equal without sympy
        return True
    gold_parsed = _parse_gold(gold)
    if not gold_parsed:
        return False
    pred_parsed = parse(f"\\boxed{{{pred}}}", extraction_config=[LatexExtractionConfig(boxed_match_priority=0)],
                        parsing_timeout=_timeout())
    if not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=_timeout()))


def math_reward(response: str, example) -> float:
    """1.0 if the last \\boxed{...} in response equals example.answer (math-verify), else 0.0 (also when
    there is no box, the box is unclosed, or either side does not parse)."""
    pred = last_boxed(response)
    if pred is None or not pred.strip():
        return 0.0
    try:
        return 1.0 if math_verify_equal(pred, str(example.answer)) else 0.0
    except Exception:  # math-verify raises on its own timeouts only if asked; anything else: no credit
        return 0.0
