"""No silent NaN: a non-finite loss or gradient on any rank skips the optimizer update on every rank, is
counted, and too many in a row stop the run naming the step (one torchrun launch, TP=2 then DP=2)."""
import json
import os
import socket
import subprocess
import sys

import pytest

from megatron_simko.trainer.optimizer import BadUpdateGuard, NonFiniteUpdateError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "nonfinite_worker.py")


def test_guard_counts_consecutive_skips():
    g = BadUpdateGuard(max_consecutive=2)
    g.record(True, "RL step 3")
    g.record(False, "RL step 3")
    assert (g.consecutive, g.skipped_total) == (0, 1)
    g.record(True, "RL step 4")
    with pytest.raises(NonFiniteUpdateError, match=r"^RL step 5: .* 2 consecutive .*train.max_bad_steps=2"):
        g.record(True, "RL step 5")
    with pytest.raises(ValueError):
        BadUpdateGuard(max_consecutive=0)


@pytest.mark.slow
@pytest.mark.dev_shm
def test_nonfinite_updates_are_skipped_on_every_rank(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={port}", WORKER,
           "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    for rank in (0, 1):  # rank 0 saw finite values itself in both bad cases
        rep = json.loads((tmp_path / f"result.json.rank{rank}").read_text())
        for key in ("tp2", "tp1"):  # tp1 = DP=2 (non-finite loss on DP rank 1 only)
            assert rep[f"{key}/good_first"], (rank, key)
            assert rep[f"{key}/bad_skipped"] and rep[f"{key}/bad_grad_norm_nan"], (rank, key)
            assert rep[f"{key}/unchanged_after_bad"], (rank, key)  # weights, Adam moments, LR schedule
            assert rep[f"{key}/counts_after_bad"] == [1, 1]
            assert rep[f"{key}/good_after"] and rep[f"{key}/changed_after_good"], (rank, key)
            assert rep[f"{key}/counts_after_good"] == [0, 1]
            assert rep[f"{key}/weights_finite"]
        assert rep["limit_error"] is not None and rep["limit_error"].startswith("RL step 7: ")
        assert "2 consecutive optimizer updates" in rep["limit_error"]
        assert rep["weights_finite_at_limit"]
