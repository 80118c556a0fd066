"""Rewards with a hard per-response time limit: scoring runs in a separate worker process.

math-verify's own timeouts use signal.alarm: whole seconds, main thread only, and powerless against work
that never returns to the interpreter (a huge integer power inside C). So the trainer scores in a child
process (`python -m megatron_simko.rewards.worker_main`, a fresh interpreter: no fork of a process holding
threads, no re-import of the caller's __main__), one response at a time, results streamed back in order.
If one response takes longer than `timeout_s`, the parent kills the worker, gives that response 0.0, and
starts a new worker for the rest of the batch.

Wire format: each message is an 8-byte little-endian length followed by a pickle. The worker keeps its real
stdout for messages and sends anything printed to stderr.
"""
from __future__ import annotations

import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("<Q")


def _send(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    payload = _HEADER.pack(len(data)) + data
    view = memoryview(payload)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _recv(fd: int, deadline: float | None = None) -> Any:
    """One message from fd; TimeoutError past deadline (time.monotonic()), EOFError if the peer is gone."""
    def read_exact(n: int) -> bytes:
        chunks, got = [], 0
        while got < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise TimeoutError
            chunk = os.read(fd, n - got)
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    (size,) = _HEADER.unpack(read_exact(_HEADER.size))
    return pickle.loads(read_exact(size))


class RewardScorer:
    """Scores (response, example) pairs with the reward registry in an isolated worker process.

    timeout_s: hard limit per response (default 5 s); a response past it gets 0.0 and the worker is restarted.
    The first call starts the worker (about 1 to 4 s: imports and a warm-up verify); later calls cost the
    scoring itself plus about 0.1 ms per response of pipe traffic. Thread-safe; one worker per scorer.
    Counters (cumulative; `counters()` reads them): `n_scored`; `n_timeouts` (past the hard limit: 0.0);
    `n_errors` (a reward function raised, or the worker died: 0.0); `n_verify_timeouts` (math-verify's own
    per-step time limit cut a parse or comparison short: "no match", usually 0.0).
    """

    def __init__(self, timeout_s: float = 5.0, startup_timeout_s: float = 120.0):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s, self.startup_timeout_s = float(timeout_s), float(startup_timeout_s)
        self.n_scored = self.n_timeouts = self.n_errors = self.n_verify_timeouts = 0
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    # -- worker lifecycle
    def _start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env.setdefault("OMP_NUM_THREADS", "1")
        self._proc = subprocess.Popen([sys.executable, "-m", "megatron_simko.rewards.worker_main"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        inner = max(1, int(self.timeout_s / 4))  # math-verify's own per-step alarm, well inside the hard limit
        _send(self._proc.stdin.fileno(), ("init", inner))
        try:
            msg = _recv(self._proc.stdout.fileno(), time.monotonic() + self.startup_timeout_s)
        except (TimeoutError, EOFError) as e:
            self._kill()
            raise RuntimeError(f"reward worker failed to start ({type(e).__name__})") from None
        if msg != ("ready",):
            self._kill()
            raise RuntimeError(f"reward worker failed to start: {msg!r}")

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for f in (self._proc.stdin, self._proc.stdout):
                f.close()
            self._proc = None

    def warmup(self) -> None:
        """Starts the worker now (imports math-verify, sympy and reasoning-gym), so the first batch is fast."""
        with self._lock:
            if self._proc is None:
                self._start()

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                try:
                    _send(self._proc.stdin.fileno(), ("exit",))
                    self._proc.wait(timeout=5)
                except Exception:
                    pass
                self._kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self._kill()
        except Exception:
            pass

    def counters(self) -> dict[str, int]:
        """The failure counters so far: {"timeouts", "errors", "verify_timeouts"} (see the class docstring)."""
        return {"timeouts": self.n_timeouts, "errors": self.n_errors, "verify_timeouts": self.n_verify_timeouts}

    # -- scoring
    def score(self, responses: Sequence[str], examples: Sequence[Any]) -> list[float]:
        """Rewards for responses[i] against examples[i] (data_source selects the reward function)."""
        from .registry import get_reward_fn

        if len(responses) != len(examples):
            raise ValueError(f"{len(responses)} responses for {len(examples)} examples")
        items = [(i, get_reward_fn(ex.data_source), r, ex) for i, (r, ex) in enumerate(zip(responses, examples))]
        rewards = [0.0] * len(items)
        with self._lock:
            todo = items
            while todo:
                if self._proc is None:
                    self._start()
                try:
                    _send(self._proc.stdin.fileno(), ("score", todo))
                except (pickle.PicklingError, AttributeError, TypeError) as e:
                    raise TypeError("reward functions and examples must be picklable (register module-level "
                                    f"functions): {e}") from None
                except BrokenPipeError:  # the worker died between batches: start a new one
                    self._kill()
                    continue
                # Per-task set-up (e.g. importing reasoning-gym, building a scorer) is not a response's time.
                try:
                    _recv(self._proc.stdout.fileno(), time.monotonic() + self.startup_timeout_s)
                except (TimeoutError, EOFError) as e:
                    self._kill()
                    raise RuntimeError(f"reward worker failed preparing a batch ({type(e).__name__})") from None
                done = 0
                try:
                    while done < len(todo):
                        _, reward, error, verify_timeout = _recv(self._proc.stdout.fileno(),
                                                                 time.monotonic() + self.timeout_s)
                        i = todo[done][0]
                        rewards[i] = reward
                        if error:
                            self.n_errors += 1
                            logger.warning("reward function raised for item %d: %s", i, error)
                        self.n_verify_timeouts += int(verify_timeout)
                        done += 1
                except (TimeoutError, EOFError) as e:
                    i = todo[done][0]
                    if isinstance(e, TimeoutError):
                        self.n_timeouts += 1
                        logger.warning("reward for item %d (%s) exceeded %.1f s: 0.0, worker restarted",
                                       i, examples[i].data_source, self.timeout_s)
                    else:
                        self.n_errors += 1
                        logger.warning("reward worker died on item %d (%s): 0.0, worker restarted",
                                       i, examples[i].data_source)
                    self._kill()
                    rewards[i] = 0.0
                    done += 1
                todo = todo[done:]
            self.n_scored += len(items)
        return rewards


_DEFAULT: RewardScorer | None = None


def default_scorer() -> RewardScorer:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = RewardScorer()
    return _DEFAULT


def compute_rewards(responses: Sequence[str], examples: Sequence[Any]) -> list[float]:
    """Batch rewards through the process-wide default RewardScorer (5 s hard limit per response)."""
    return default_scorer().score(responses, examples)


def compute_reward(response: str, example: Any) -> float:
    """The reward of one response (1.0 / 0.0 for the built-in rewards), with the hard time limit."""
    return compute_rewards([response], [example])[0]


# ----------------------------------------------------------------------------------------------- worker side
def _warm_up() -> None:
    from ..data.prompts import PromptExample
    from .registry import score_response

    score_response("\\boxed{\\frac{1}{2}}", PromptExample("warm-up", "0.5", "math"))


def _prepare(examples: Sequence[Any]) -> None:
    """Builds (and caches) the reasoning-gym scorers a batch needs, before its clock starts."""
    from ..data.procedural import SOURCE_PREFIX, rg_score_fn

    for ex in examples:
        if ex.data_source.startswith(SOURCE_PREFIX):
            try:
                rg_score_fn(ex.data_source[len(SOURCE_PREFIX):], ex.metadata.get("rg_config"))
            except Exception:  # an unknown task fails again, with its message, when scored
                pass


def _serve() -> None:
    out_fd = os.dup(1)  # messages go to the real stdout; anything printed goes to stderr
    os.dup2(2, 1)
    in_fd = sys.stdin.fileno()
    # (the package exports the function math_reward, which shadows the module name: import the names)
    from .math_reward import count_verify_timeouts, set_inner_timeout, verify_timeouts

    _, inner = _recv(in_fd)
    count_verify_timeouts()  # math-verify's own time limit scores 0.0: counted and reported per response
    set_inner_timeout(inner)
    try:
        _warm_up()
    except Exception as e:  # report, don't die silently
        _send(out_fd, ("failed", repr(e)))
        return
    _send(out_fd, ("ready",))
    while True:
        try:
            msg = _recv(in_fd)
        except EOFError:
            return
        if msg[0] == "exit":
            return
        _prepare([example for _, _, _, example in msg[1]])
        _send(out_fd, ("prepared",))
        for i, fn, response, example in msg[1]:
            before = verify_timeouts()
            try:
                reward, error = float(fn(response, example)), None
            except Exception as e:
                reward, error = 0.0, f"{type(e).__name__}: {e}"
            _send(out_fd, (i, reward, error, verify_timeouts() > before))
