"""pass@k: the product-form estimator against exact combinatorics, and the CLI from a results file (sampling
models: tests/test_eval_passk.py)."""
import json
import os
import subprocess
import sys
from fractions import Fraction
from math import comb

import pytest

from megatron_simko.eval import default_ks, pass_at_k, pass_at_k_curve, pass_at_k_table
from megatron_simko.eval.results import read_results_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(ROOT, "tools", "eval_passk.py")


def exact(n, c, k):
    return 1 - Fraction(comb(n - c, k), comb(n, k))  # comb(m, k) = 0 when m < k


def test_matches_exact_combinatorics():
    for n in range(1, 25):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(exact(n, c, k)), abs=1e-12), (n, c, k)
    # large n: the binomials have hundreds of digits; the product form stays exact to rounding
    assert pass_at_k(1024, 3, 100) == pytest.approx(float(exact(1024, 3, 100)), rel=1e-12)
    assert pass_at_k(2000, 1, 1) == pytest.approx(1 / 2000, rel=1e-12)


def test_edge_cases():
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 0, 1) == 0.0          # c = 0
    assert pass_at_k(8, 8, 1) == 1.0                                          # c = n
    assert pass_at_k(8, 5, 4) == 1.0 and pass_at_k(8, 5, 3) < 1.0             # n - c < k
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)                         # pass@1 = c / n
    for bad in [(4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)
    curve = pass_at_k_curve(16, 3)
    assert len(curve) == 16 and all(a <= b for a, b in zip(curve, curve[1:])) and curve[-1] == 1.0


def test_table_averages_over_problems():
    counts = [(8, 0), (8, 2), (8, 8)]
    table = pass_at_k_table(counts)
    assert list(table) == [1, 2, 4, 8] == default_ks(8) and default_ks(6) == [1, 2, 4, 6]
    for k, v in table.items():
        assert v == pytest.approx(float(sum(exact(n, c, k) for n, c in counts) / 3))
    with pytest.raises(ValueError, match="needs at least 16 samples"):
        pass_at_k_table(counts, ks=[16])


def test_results_jsonl_formats_and_errors(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"n": 4, "c": 1}\n{"num_samples": 4, "num_correct": 0}\n\n{"rewards": [1.0, 0.0, 0.2, 1]}\n'
                 '{"correct": [true, false, false, false]}\n')
    assert read_results_jsonl(str(p)) == [(4, 1), (4, 0), (4, 2), (4, 1)]
    for bad, field in [('{"n": 4}', "c"), ('{"n": 4, "c": 5}', "c"), ('{"rewards": []}', "rewards"), ("[", "<row>")]:
        p.write_text('{"n": 4, "c": 1}\n' + bad + "\n")
        with pytest.raises(ValueError, match=f"r.jsonl: row 2: field '{field}'"):
            read_results_jsonl(str(p))


def test_cli_from_results(tmp_path):
    rows = [{"n": 8, "c": c} for c in (0, 1, 3, 8)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sub" / "passk.json"
    proc = subprocess.run([sys.executable, CLI, "--results", str(tmp_path / "r.jsonl"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["ks"] == [1, 2, 4, 8] and report["num_problems"] == 4
    assert report["pass_at_k"]["1"] == pytest.approx((0 + 1 / 8 + 3 / 8 + 1) / 4)
    assert "pass@k over 4 problems" in proc.stdout
    assert os.listdir(out.parent) == ["passk.json"]  # no temporary file left behind
