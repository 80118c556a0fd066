"""The study's figures from files already written (nothing is recomputed from samples or weights):

    python -m megatron_simko.eval.plots --passk runs/toy/passk --runs runs/toy/train/* --out-dir runs/toy/figures

* ``passk.png``    pass@k vs log2 k, one line per mode, shaded 95% bootstrap band over problems (and over seeds
                   where a mode has several), one panel per benchmark + their average — the paper's Figure 1.
                   From ``passk.csv`` (lines) and ``per_problem.csv`` (bands).
* ``lambda.png``   Λ^(1..K) (mean log-prob of the rank-k candidate) vs training step, one panel per mode, thin
                   lines per seed, thick for the mean over seeds — the paper's Figures 3 / 5. From metrics.jsonl.
* ``entropy.png``  histogram of response-token entropy at the first vs the last step, one panel per mode (seeds
                   pooled). From histograms.jsonl (megatron_simko/metrics.py).
* ``training.png`` reward, train pass@1 and validation pass@k vs step, one line per mode (mean over seeds).
* ``gated.png``    SimKO's gated tokens vs step (metrics.jsonl ``gated/`` keys, metrics.gated_metrics), one line
                   per mode (mean over seeds); top row A > 0, bottom row A < 0: p_1..p_K (line style = rank,
                   log scale), the fractions where the target is rank-1 / inside the top-K, the fraction where
                   the floor α/K is acting, the α gradient share (band between its bounds), and the signal left
                   (gated tokens with A ≠ 0; groups with mixed rewards). Written when a run logged ``gated/`` keys.

A mode is a run's or model's name without its seed suffix ("simko-s2" → "simko", ``results.group_of``).
Headless (matplotlib's Agg backend), PNG.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from .passk import bootstrap_replicates, pass_at_k, percentile_band
from .results import AVERAGE, group_of, read_passk_csv, read_per_problem_csv

BOOTSTRAP_REPS = 1000


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _groups(names: Iterable[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(group_of(n), []).append(n)
    return out


def _style(ax, title: str, xlabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)


def _finish(fig, axes, ylabel: Optional[str], path: str) -> str:
    """Label the first panel, put the legend there, save."""
    if ylabel:
        axes[0][0].set_ylabel(ylabel)
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}.png"
    fig.savefig(tmp, dpi=90, bbox_inches="tight")
    os.replace(tmp, path)
    _pyplot().close(fig)
    return path


# ------------------------------------------------------------------------------------------------- pass@k
def passk_bands(per_problem: Mapping[tuple, Sequence[tuple[int, int]]], models: Sequence[str],
                benchmarks: Sequence[str], ks: Sequence[int], reps: int = BOOTSTRAP_REPS,
                seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{benchmark or AVERAGE: (low, high) per k}: 95% bootstrap band of the mean pass@k of ``models`` (the
    seeds of one mode), resampling seeds and problems; the average resamples each benchmark's problems and
    shares the seed draws. Benchmarks missing for a model are skipped."""
    rng = np.random.default_rng(seed)
    seed_idx = rng.integers(0, len(models), size=(reps, len(models)))
    bands, reps_by_bench = {}, []
    for b in benchmarks:
        if not all((m, b) in per_problem for m in models):
            continue
        pk = np.array([[[pass_at_k(n, c, k) for k in ks] for n, c in per_problem[m, b]] for m in models])  # [S,P,K]
        r = bootstrap_replicates(pk, seed_idx, rng)
        bands[b] = percentile_band(r)
        reps_by_bench.append(r)
    if reps_by_bench:
        bands[AVERAGE] = percentile_band(np.mean(reps_by_bench, axis=0))
    return bands


def plot_passk(passk_csv: str, out_png: str, per_problem_csv: Optional[str] = None, title: str = "") -> str:
    """The pass@k figure (see the module docstring)."""
    plt = _pyplot()
    rows = read_passk_csv(passk_csv)
    if not rows:
        raise ValueError(f"{passk_csv}: no rows")
    benchmarks = list(dict.fromkeys(r["benchmark"] for r in rows if r["benchmark"] != AVERAGE))
    panels = benchmarks + ([AVERAGE] if len(benchmarks) > 1 else [])
    groups = _groups(dict.fromkeys(r["model"] for r in rows))
    per_problem = read_per_problem_csv(per_problem_csv) if per_problem_csv and os.path.exists(per_problem_csv) else {}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    trained = [g for g in groups if g != "base"]  # the base model in black; modes keep their colors across figures
    for group, models in groups.items():
        color = "k" if group == "base" else f"C{trained.index(group) % 10}"
        ks = sorted({r["k"] for r in rows if r["model"] in models})
        bands = passk_bands(per_problem, models, benchmarks, ks) if per_problem else {}
        for ax, panel in zip(axes[0], panels):
            curve = [np.mean([r["pass_at_k"] for r in rows if r["model"] in models and r["benchmark"] == panel
                              and r["k"] == k]) for k in ks]
            x = np.log2(ks)
            ax.plot(x, curve, marker="o", ms=3, color=color,
                    label=f"{group} ({len(models)} seed{'s' if len(models) > 1 else ''})")
            if panel in bands:
                lo, hi = bands[panel]
                ax.fill_between(x, lo, hi, color=color, alpha=0.18, lw=0)
    for ax, panel in zip(axes[0], panels):
        _style(ax, panel, "log2 k")
    if title:
        fig.suptitle(title)
    return _finish(fig, axes, "pass@k", out_png)


# ------------------------------------------------------------------------------------------- run folders
def read_metrics(run_dir: str) -> list[dict]:
    """metrics.jsonl of a run (steps in order); ValueError naming the file if missing or malformed."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{run_dir}: no metrics.jsonl (not a training run folder?)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {i}: {e.msg}") from None
    return sorted(rows, key=lambda r: r["step"])


def read_histograms(run_dir: str, name: str = "entropy/response_tokens") -> list[dict]:
    path = os.path.join(run_dir, "histograms.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return sorted((r for r in rows if r["name"] == name), key=lambda r: r["step"])


def _series(metrics: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(m["step"], m[key]) for m in metrics if key in m and m[key] is not None and np.isfinite(m[key])]
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def _mean_series(runs: Mapping[str, Sequence[dict]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean over runs at the steps every run logged."""
    series = [dict(zip(*_series(m, key))) for m in runs.values()]
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    return np.array(steps), np.array([np.mean([s[t] for s in series]) for t in steps])


def plot_lambda(runs: Mapping[str, Sequence[dict]], out_png: str) -> str:
    """Λ^(k) vs step, one panel per mode (see the module docstring)."""
    plt = _pyplot()
    groups = _groups(runs)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False, sharey=True)
    for ax, (group, names) in zip(axes[0], groups.items()):
        keys = sorted({k for n in names for m in runs[n] for k in m if k.startswith("lambda/")},
                      key=lambda k: int(k.split("/")[1]))
        for i, key in enumerate(keys):
            for n in names:
                ax.plot(*_series(runs[n], key), color=f"C{i}", lw=0.6, alpha=0.4)
            ax.plot(*_mean_series({n: runs[n] for n in names}, key), color=f"C{i}", lw=1.8,
                    label=f"Λ^({key.split('/')[1]})")
        _style(ax, f"{group} ({len(names)} run{'s' if len(names) > 1 else ''})", "step")
    return _finish(fig, axes, "mean log-prob of rank-k candidate", out_png)


def plot_entropy(hists: Mapping[str, Sequence[dict]], out_png: str) -> str:
    """Entropy histogram of response tokens, first vs last logged step, one panel per mode."""
    plt = _pyplot()
    groups = _groups(n for n in hists if hists[n])
    if not groups:
        raise ValueError("no run has histograms.jsonl entries to plot")
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False, sharey=True)
    for ax, (group, names) in zip(axes[0], groups.items()):
        first, last, edges, steps = None, None, None, []
        for n in names:
            h0, h1 = hists[n][0], hists[n][-1]
            c0, c1 = np.array(h0["counts"], float), np.array(h1["counts"], float)
            first = c0 if first is None else first + c0
            last = c1 if last is None else last + c1
            edges = np.linspace(h0["range"][0], h0["range"][1], h0["bins"] + 1)
            steps.append((h0["step"], h1["step"]))
        top = max(np.nonzero(first + last)[0].max() + 2, 10)
        for counts, label, color in ((first, "first step", "C0"), (last, "last step", "C3")):
            density = counts[:top] / max(counts.sum(), 1.0)
            ax.stairs(density, edges[:top + 1], label=label, color=color, lw=1.4)
        s0, s1 = min(s[0] for s in steps), max(s[1] for s in steps)
        ax.set_yscale("log")
        _style(ax, f"{group}: step {s0} vs {s1}", "token entropy (nats)")
    return _finish(fig, axes, "fraction of response tokens", out_png)


def plot_training(runs: Mapping[str, Sequence[dict]], out_png: str) -> str:
    """Reward, train pass@1 and validation pass@k vs step, one line per mode (mean over its runs)."""
    plt = _pyplot()
    groups = _groups(runs)
    val_keys = sorted({k for m in runs.values() for row in m for k in row if k.startswith("val/pass@")},
                      key=lambda k: int(k.split("@")[1]))
    panels = [("reward/mean", "reward"), ("train/pass@1", "train pass@1")]
    if val_keys:
        panels += [(val_keys[0], f"validation {val_keys[0][4:]}")]
        if len(val_keys) > 1:
            panels += [(val_keys[-1], f"validation {val_keys[-1][4:]}")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.3), squeeze=False)
    for gi, (group, names) in enumerate(groups.items()):
        for ax, (key, _) in zip(axes[0], panels):
            x, y = _mean_series({n: runs[n] for n in names}, key)
            if len(x):
                ax.plot(x, y, color=f"C{gi % 10}", marker="o" if len(x) < 12 else None, ms=3,
                        label=f"{group} ({len(names)})")
    for ax, (_, label) in zip(axes[0], panels):
        _style(ax, label, "step")
    return _finish(fig, axes, None, out_png)


_GATED_PANELS = (("p", "p_k (k = 1 —, 2 --, 3 :)"), ("rank1_fraction", "target is rank-1"),
                 ("in_topk_fraction", "target in top-K"), ("floor_fraction", "floor acting: p_K < α/K"),
                 ("alpha_share", "α gradient share (lo–hi)"), ("signal", None))
_GATED_SIGNAL = {"pos": ("gated/signal_tokens", "gated tokens with A ≠ 0"),
                 "neg": ("gated/mixed_group_fraction", "groups with mixed rewards")}
_RANK_STYLES = ("-", "--", ":", "-.")


def _gated_series(runs: Mapping[str, Sequence[dict]], key: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean over runs of ``key``, at the steps where every run logged it and had gated tokens in ``split``."""
    count = f"gated/{split}/tokens"
    kept = {n: [m for m in rows if m.get(count, 1) > 0] for n, rows in runs.items()}
    return _mean_series(kept, key)


def plot_gated(runs: Mapping[str, Sequence[dict]], out_png: str) -> str:
    """The gated-token diagnostics vs step (see the module docstring)."""
    plt = _pyplot()
    groups = _groups(runs)
    K = max((int(k.rsplit("_", 1)[1]) for m in runs.values() for row in m for k in row
             if k.startswith("gated/pos/p_")), default=0)
    fig, axes = plt.subplots(2, len(_GATED_PANELS), figsize=(3.3 * len(_GATED_PANELS), 6.2), squeeze=False)
    for gi, (group, names) in enumerate(groups.items()):
        color, mine = f"C{gi % 10}", {n: runs[n] for n in names}
        for row, split in enumerate(("pos", "neg")):
            for ax, (panel, _) in zip(axes[row], _GATED_PANELS):
                if panel == "p":
                    for k in range(K):
                        x, y = _gated_series(mine, f"gated/{split}/p_{k + 1}", split)
                        ax.plot(x, y, color=color, ls=_RANK_STYLES[k % len(_RANK_STYLES)],
                                label=f"{group} ({len(names)})" if k == 0 else None)
                elif panel == "alpha_share":
                    x, lo = _gated_series(mine, f"gated/{split}/alpha_share_lo", split)
                    _, hi = _gated_series(mine, f"gated/{split}/alpha_share_hi", split)
                    if len(x):
                        ax.fill_between(x, lo, hi, color=color, alpha=0.3, lw=0)
                        ax.plot(x, hi, color=color, lw=1.0)
                else:
                    key = _GATED_SIGNAL[split][0] if panel == "signal" else f"gated/{split}/{panel}"
                    x, y = _gated_series(mine, key, split) if panel != "signal" else _mean_series(mine, key)
                    ax.plot(x, y, color=color, marker="o" if len(x) < 12 else None, ms=3)
    for row, (split, sign) in enumerate((("pos", "A > 0"), ("neg", "A < 0"))):
        for ax, (panel, label) in zip(axes[row], _GATED_PANELS):
            _style(ax, f"{sign}: {label}" if label else _GATED_SIGNAL[split][1], "step")
            ax.title.set_fontsize(9)
        axes[row][0].set_yscale("log")
    fig.suptitle("gated tokens (w = 1), mean over seeds", fontsize=10)
    fig.subplots_adjust(hspace=0.4, wspace=0.32)
    return _finish(fig, axes, None, out_png)


def make_figures(out_dir: str, passk_dir: Optional[str] = None, run_dirs: Sequence[str] = ()) -> list[str]:
    """Every figure the inputs allow; returns the PNG paths written."""
    written = []
    if passk_dir:
        csv_path = passk_dir if passk_dir.endswith(".csv") else os.path.join(passk_dir, "passk.csv")
        if not os.path.isfile(csv_path):
            raise ValueError(f"--passk {passk_dir}: no passk.csv there (tools/eval_passk.py writes it)")
        written.append(plot_passk(csv_path, os.path.join(out_dir, "passk.png"),
                                  os.path.join(os.path.dirname(csv_path), "per_problem.csv")))
    if run_dirs:
        runs = {os.path.basename(os.path.normpath(d)): read_metrics(d) for d in run_dirs}
        empty = [n for n, m in runs.items() if not m]
        if empty:
            raise ValueError(f"runs without logged steps: {', '.join(empty)}")
        written.append(plot_lambda(runs, os.path.join(out_dir, "lambda.png")))
        written.append(plot_training(runs, os.path.join(out_dir, "training.png")))
        if any(k.startswith("gated/") for m in runs.values() for row in m for k in row):
            written.append(plot_gated(runs, os.path.join(out_dir, "gated.png")))
        hists = {os.path.basename(os.path.normpath(d)): read_histograms(d) for d in run_dirs}
        if any(hists.values()):
            written.append(plot_entropy(hists, os.path.join(out_dir, "entropy.png")))
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False,
                                 prog="python -m megatron_simko.eval.plots", description=__doc__.split("\n")[0],
                                 epilog="Each figure is described in the module docstring.")
    ap.add_argument("--passk", help="an evaluation folder (passk.csv, per_problem.csv) or a passk.csv")
    ap.add_argument("--runs", nargs="*", default=[], help="training run folders (metrics.jsonl, histograms.jsonl)")
    ap.add_argument("--out-dir", required=True, help="where the PNGs go")
    args = ap.parse_args(argv)
    if not args.passk and not args.runs:
        ap.error("give --passk and/or --runs")
    try:
        for path in make_figures(args.out_dir, args.passk, args.runs):
            print(f"wrote {path}")
    except (ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
