"""Vocab-parallel SimKO == single-device reference at TP = 1, 2, 4 (real torch.distributed, gloo, CPU).

One launch per TP size runs every case of tests/loss_dist_worker.py (loss, each rank's gradient shard,
metrics, forward-only statistics, inputs unchanged, communication volume, no backward communication);
the tests below only report its per-case verdicts.
"""
import pytest

import loss_dist_worker as worker

TP_SIZES = (1, 2, 4)


@pytest.fixture(scope="module", params=TP_SIZES, ids=lambda tp: f"tp{tp}")
def tp_results(request, tmp_path_factory):
    tp = request.param
    return tp, worker.launch(tp, str(tmp_path_factory.mktemp(f"loss_tp{tp}")))


@pytest.mark.parametrize("case", list(worker.CASES) + ["errors", "dp_selection"])
def test_matches_reference(tp_results, case):
    tp, results = tp_results
    failures = results.get(case)
    assert failures is not None, f"TP={tp}: case {case} did not run"
    assert not failures, f"TP={tp} case {case}:\n" + "\n".join(failures)
