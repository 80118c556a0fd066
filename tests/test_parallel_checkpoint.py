"""dist_checkpointing: resume is bitwise identical, TP2 weights load at TP1 and PP2 (one torchrun launch)."""
import json
import os
import subprocess
import sys

import socket

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "parallel_checkpoint_worker.py")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    out = tmp / "result.json"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={port}", WORKER,
           "--root", str(tmp / "ckpts"), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(out.read_text()), tmp / "ckpts_prune"


@pytest.mark.slow
def test_resume_is_bitwise_identical(result):
    ranks, _ = result
    for res in ranks:
        resume = res["resume"]
        assert resume["step"] == 1 and resume["config"] == {"note": "tp2 step 1"}
        assert resume["loaded_optimizer"] and resume["loaded_rng"]
        assert resume["loss_resumed"] == resume["loss_uninterrupted"]  # bitwise: float equality
        assert resume["lr_resumed"] == resume["lr_uninterrupted"] > 0
        assert resume["params_bitwise_equal"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp1_pp1", "tp1_pp2"])
def test_tp2_checkpoint_loads_at_other_layouts(result, layout):
    ranks, _ = result
    for res in ranks:
        r = res[layout]
        assert r["optimizer_refused"], "optimizer state must not be loaded at another layout"
        assert r["logprob_err"] <= 1e-6 and r["entropy_err"] <= 1e-6, r
        assert r["topk_ids_equal"]


@pytest.mark.slow
def test_keep_last_and_latest_pointer(result):
    ranks, root = result
    assert ranks[0]["steps_after_prune"] == [2, 3] and ranks[0]["latest"] == 3
    assert sorted(os.listdir(root)) == ["iter_0000002", "iter_0000003", "latest"]
    assert (root / "latest").read_text() == "3"
    meta = json.loads((root / "iter_0000003" / "simko_meta.json").read_text())
    assert meta["step"] == 3 and meta["layout"]["tp"] == 2
