"""The GPU smoke run's stages as processes with time limits: subprocesses in their own process group, their output
streamed line by line and kept in a log, killed at the stage's limit (exit 124); in-process stages under SIGALRM
(``StageTimeout``); the import pre-flight; the JSON summary (atomic writes, also to ``$OUT``).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

# Seconds per stage (a hang must not eat the device window); the sum stays under the 10-minute device budget.
PREFLIGHT_TIMEOUT = 90  # before the mode is known (importing torch decides it)
STAGE_TIMEOUTS = {"gpu": dict(build=150, run1=150, run2=120, export=60),
                  "cpu": dict(build=300, run1=300, run2=300, export=120)}
# Imports the stages need: (module, distribution for the version, required).
PREFLIGHT = (("torch", "torch", True), ("transformers", "transformers", True), ("megatron.core", "megatron-core", True),
             ("safetensors", "safetensors", True), ("tokenizers", "tokenizers", True), ("yaml", "pyyaml", True),
             ("tensorboard", "tensorboard", True), ("sympy", "sympy", True), ("math_verify", "math-verify", True),
             ("triton", "triton", False))  # triton: the loss's fused kernels on CUDA; without it, the torch backend


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], log_path: str, timeout: float) -> tuple[int, float, str]:
    """Run a command (PYTHONPATH = the repo) in its own process group, streaming its output line by line to
    stdout and log_path; killed (group) after ``timeout`` s, exit code 124 then. (exit code, seconds, output)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    lines: list[str] = []
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    timed_out = threading.Event()

    def kill():
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout, kill)
    timer.start()
    name = os.path.splitext(os.path.basename(log_path))[0]
    with open(log_path, "w", encoding="utf-8") as f:
        for line in proc.stdout:
            lines.append(line)
            f.write(line)
            f.flush()
            print(f"  [{name}] {line}", end="", flush=True)
    rc = proc.wait()
    timer.cancel()
    if timed_out.is_set():
        rc = 124
        msg = f"[gpu_smoke] {name}: killed after its {timeout:.0f} s stage limit\n"
        lines.append(msg)
        print(msg, end="", flush=True)
    return rc, time.perf_counter() - t0, "".join(lines)


class StageTimeout(Exception):
    pass


def in_process(seconds: float, fn, *args):
    """fn(*args) in this process with a SIGALRM time limit (StageTimeout past it)."""
    def expire(signum, frame):
        raise StageTimeout(f"stage exceeded its {seconds:.0f} s limit")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(max(1, int(seconds)))
    try:
        return fn(*args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def preflight() -> tuple[dict, list[str]]:
    """Import every module the stages need: ({module: version or None}, [missing required modules])."""
    import importlib
    import importlib.metadata

    versions, missing = {}, []
    for module, dist, required in PREFLIGHT:
        try:
            importlib.import_module(module)
            try:
                versions[module] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                versions[module] = "?"
        except Exception as e:  # noqa: BLE001 - reported
            versions[module] = None
            if required:
                missing.append(f"{module} ({type(e).__name__}: {e})")
    return versions, missing


def write_summary(out: str, summary: dict) -> list[str]:
    """summary.json in the output folder and, when $OUT is set, $OUT/gpu_smoke_summary.json (atomic writes)."""
    paths = [os.path.join(out, "summary.json")]
    if os.environ.get("OUT"):
        paths.append(os.path.join(os.environ["OUT"], "gpu_smoke_summary.json"))
    for path in paths:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1, default=str)
        os.replace(path + ".tmp", path)
    return paths


def train(config: str, overrides: list[str], log_path: str, timeout: float) -> tuple[int, float, str]:
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port",
                str(free_port()), "-m", "megatron_simko.train", "--config", config, *overrides], log_path, timeout)


def loss_backend_of(log: str) -> str:
    """The loss backend the trainer reported ("[megatron_simko] loss backend: triton (...)"), or "?"."""
    for line in log.splitlines():
        if "loss backend:" in line:
            return line.split("loss backend:", 1)[1].split()[0]
    return "?"


def safetensors_in(directory: str) -> dict:
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out
