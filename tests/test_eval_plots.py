"""The study's figures and tables from files: bootstrap bands against a direct computation, the per-mode table,
the entropy histograms the metrics logger keeps, and every PNG from run folders + an evaluation folder."""
import json
import os
import statistics

import numpy as np
import pytest
import torch

from megatron_simko.eval.passk import bootstrap_replicates, pass_at_k, percentile_band
from megatron_simko.eval.plots import main as plots_main
from megatron_simko.eval.plots import make_figures, passk_bands
from megatron_simko.eval.results import (AVERAGE, PASSK_FIELDS, PER_PROBLEM_FIELDS, format_group_table,
                                         format_model_table, group_of, group_table, passk_rows, read_passk_csv,
                                         write_csv_atomic)
from megatron_simko.metrics import HIST_BINS, HIST_RANGE, MetricsLogger


def test_bootstrap_replicates_match_a_direct_loop():
    rng = np.random.default_rng(3)
    pk = rng.random((3, 7, 4))  # [S, P, K]
    seed_idx = rng.integers(0, 3, size=(50, 3))
    state = np.random.default_rng(11)
    reps = bootstrap_replicates(pk, seed_idx, state)
    prob_idx = np.random.default_rng(11).integers(0, 7, size=(50, 7))  # the draws bootstrap_replicates makes
    for b in range(50):
        direct = [sum(pk[s, p, k] for s in seed_idx[b] for p in prob_idx[b]) / (3 * 7) for k in range(4)]
        assert reps[b] == pytest.approx(direct, abs=1e-12)
    lo, hi = percentile_band(reps)
    assert np.all(lo <= reps.mean(0)) and np.all(reps.mean(0) <= hi)


def test_bands_collapse_without_spread_and_cover_the_mean():
    same = {("m", "b"): [(8, 3)] * 20}
    lo, hi = passk_bands(same, ["m"], ["b"], [1, 2, 8])["b"]
    assert lo == pytest.approx([pass_at_k(8, 3, k) for k in (1, 2, 8)]) and hi == pytest.approx(lo)
    rng = np.random.default_rng(0)
    per = {(m, b): [(16, int(c)) for c in rng.integers(0, 17, size=30)] for m in ("s1", "s2") for b in ("x", "y")}
    bands = passk_bands(per, ["s1", "s2"], ["x", "y"], [1, 4, 16])
    assert set(bands) == {"x", "y", AVERAGE}
    for b in ("x", "y"):
        mean = [np.mean([pass_at_k(n, c, k) for m in ("s1", "s2") for n, c in per[m, b]]) for k in (1, 4, 16)]
        lo, hi = bands[b]
        assert np.all(lo <= mean) and np.all(np.array(mean) <= hi) and np.all(hi - lo > 0)


def test_group_table_mean_and_std_over_seeds():
    counts = {"grpo-s1": {"h": [(4, 1), (4, 4)]}, "grpo-s2": {"h": [(4, 0), (4, 2)]}, "base": {"h": [(4, 2)] * 2}}
    rows = passk_rows(counts, [1, 4])
    assert group_of("grpo-s2") == "grpo" and group_of("w_reinforce-seed3") == "w_reinforce"
    assert group_of("base") == "base"
    table = {e["group"]: e for e in group_table(rows, "h", [1, 4])}
    p1 = [(0.25 + 1.0) / 2, (0.0 + 0.5) / 2]
    assert table["grpo"]["seeds"] == 2
    assert table["grpo"][1] == pytest.approx((statistics.fmean(p1), statistics.stdev(p1)))
    assert table["base"][1] == pytest.approx((0.5, 0.0))
    text = format_group_table(list(table.values()), [1, 4])
    assert "| grpo | 2 | 0.438 ± 0.265 |" in text
    assert "| grpo-s1 | 0.625 | 1.000 |" in format_model_table(rows, "h", [1, 4])
    avg = [r for r in rows if r["model"] == "base" and r["benchmark"] == AVERAGE and r["k"] == 4]
    assert avg[0]["pass_at_k"] == pytest.approx(1.0)


def test_metrics_logger_keeps_fixed_bin_histograms_and_truncates_on_resume(tmp_path):
    log = MetricsLogger(str(tmp_path), tensorboard=False)
    values = torch.tensor([0.0, 0.01, 0.07, 3.31, 50.0, -1.0])  # out-of-range values land in the edge bins
    log.log(1, {"reward/mean": 0.5}, histograms={"entropy/response_tokens": values})
    log.log(2, {"reward/mean": 0.6}, histograms={"entropy/response_tokens": values[:2]})
    rows = [json.loads(line) for line in open(tmp_path / "histograms.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["range"] == list(HIST_RANGE)
    counts = rows[0]["counts"]
    assert len(counts) == HIST_BINS and sum(counts) == 6
    width = (HIST_RANGE[1] - HIST_RANGE[0]) / HIST_BINS
    assert counts[0] == 3 and counts[1] == 1 and counts[int(3.31 / width)] == 1 and counts[-1] == 1
    MetricsLogger(str(tmp_path), tensorboard=False, resume_step=1)  # a resume from step 1 drops step 2's lines
    assert [json.loads(line)["step"] for line in open(tmp_path / "histograms.jsonl")] == [1]


def gated_keys(step, shift, K=3):
    """A step's ``gated/`` metrics as metrics.gated_metrics names them (values only need to be plottable)."""
    out = {"gated/signal_tokens": 40.0 - step, "gated/mixed_group_fraction": 0.5 - 0.05 * step}
    for split, n in (("all", 60.0), ("pos", 20.0), ("neg", 0.0 if step == 2 else 15.0)):  # an empty split at step 2
        p1 = min(0.5 + 0.1 * step * (1 - shift), 0.95)
        out.update({f"gated/{split}/tokens": n, f"gated/{split}/rank1_fraction": p1, f"gated/{split}/in_topk_fraction": 0.9,
                    f"gated/{split}/floor_fraction": 0.1 * step, f"gated/{split}/alpha_share_lo": 0.02 * step,
                    f"gated/{split}/alpha_share_hi": 0.025 * step})
        for k in range(1, K + 1):
            out[f"gated/{split}/p_{k}"] = p1 / 4 ** (k - 1)
            out[f"gated/{split}/lambda_{k}"] = float(np.log(p1 / 4 ** (k - 1)))
    return out


def fake_run(folder, mode_shift, steps=4, gated=True):
    log = MetricsLogger(str(folder), tensorboard=False)
    gen = torch.Generator().manual_seed(len(str(folder)))
    for s in range(1, steps + 1):
        metrics = {"reward/mean": 0.2 + 0.05 * s, "train/pass@1": 0.2 + 0.05 * s,
                   **{f"lambda/{k}": -0.1 * k * (1 + mode_shift * s) for k in (1, 2, 3)},
                   **(gated_keys(s, mode_shift) if gated else {})}
        if s % 2 == 0:
            metrics.update({"val/pass@1": 0.3, "val/pass@8": 0.7})
        log.log(s, metrics, histograms={"entropy/response_tokens": torch.rand(500, generator=gen) * (3 - 0.5 * s)})
    log.close()


def test_every_figure_from_run_folders_and_an_evaluation(tmp_path):
    runs = [tmp_path / "runs" / n for n in ("grpo-s1", "grpo-s2", "simko-s1")]
    for i, r in enumerate(runs):
        fake_run(r, mode_shift=0.1 * i)
    ev = tmp_path / "passk"
    rng = np.random.default_rng(1)
    counts = {m: {b: [(16, int(c)) for c in rng.integers(0, 17, 12)] for b in ("h1", "h2")}
              for m in ("base", "grpo-s1", "grpo-s2", "simko-s1")}
    write_csv_atomic(str(ev / "passk.csv"), PASSK_FIELDS, passk_rows(counts, [1, 2, 4, 8, 16]))
    write_csv_atomic(str(ev / "per_problem.csv"), PER_PROBLEM_FIELDS,
                     [{"model": m, "benchmark": b, "problem": i, "n": n, "c": c}
                      for m, per in counts.items() for b, cs in per.items() for i, (n, c) in enumerate(cs)])
    assert len(read_passk_csv(str(ev / "passk.csv"))) == 4 * 3 * 5
    written = make_figures(str(tmp_path / "fig"), str(ev), [str(r) for r in runs])
    assert sorted(os.path.basename(p) for p in written) == ["entropy.png", "gated.png", "lambda.png", "passk.png",
                                                            "training.png"]
    for p in written:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(p) > 5000
    assert sorted(os.listdir(tmp_path / "fig")) == sorted(os.path.basename(p) for p in written)  # no temp files


def test_gated_figure_from_metrics_jsonl_via_the_cli(tmp_path, capsys):
    """gated.png from run folders' metrics.jsonl (CLI); runs logged before the gated/ keys existed get none."""
    for name, shift in (("grpo-s1", 0.0), ("simko-s1", 0.5), ("simko-s2", 0.4)):
        fake_run(tmp_path / "runs" / name, shift)
    assert plots_main(["--runs", *(str(p) for p in sorted((tmp_path / "runs").iterdir())),
                       "--out-dir", str(tmp_path / "fig")]) == 0
    png = tmp_path / "fig" / "gated.png"
    assert f"wrote {png}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20000
    fake_run(tmp_path / "old" / "grpo-s1", 0.0, gated=False)
    assert "gated.png" not in [os.path.basename(p) for p in make_figures(str(tmp_path / "f2"), None,
                                                                         [str(tmp_path / "old" / "grpo-s1")])]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert plots_main(["--passk", str(tmp_path), "--out-dir", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no passk.csv" in err and len(err.strip().splitlines()) == 1
    assert plots_main(["--runs", str(tmp_path), "--out-dir", str(tmp_path / "f")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
