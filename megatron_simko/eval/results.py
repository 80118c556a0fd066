"""What a pass@k evaluation writes, and reading it back (the plots and the study read these files).

    <out_dir>/eval_config.json                         settings, models and benchmarks (checked on resume)
    <out_dir>/samples/<model>/<benchmark>/round_<r>.jsonl  one line per sample: model, benchmark, problem,
                                                       sample, round, seed, response, reward, finish_reason,
                                                       length (tokens)
    <out_dir>/per_problem.csv                          model, benchmark, problem, n, c
    <out_dir>/passk.csv                                model, benchmark, k, pass_at_k, num_problems, n
                                                       (benchmark "average": the mean over the benchmarks)
    <out_dir>/passk.json                               the same nested by model → benchmark → k, with the
                                                       settings and the mean reward

Every file is written under a temporary name and renamed into place, so a file that exists is complete: a
round file on disk is a finished (model, benchmark, round), which is what makes an evaluation resumable.

Also reads per-problem results from any jsonl with one problem per line, in one of the forms
    {"n": 8, "c": 3}   {"num_samples": 8, "num_correct": 3}   {"rewards": [1, 0, ...]}   {"correct": [true, ...]}
(a reward counts as correct when it is >= 1.0, like the binary RLVR rewards).
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

from .passk import default_ks, pass_at_k_table

AVERAGE = "average"  # the benchmark name of the per-model mean over benchmarks in passk.csv
PASSK_FIELDS = ("model", "benchmark", "k", "pass_at_k", "num_problems", "n")
PER_PROBLEM_FIELDS = ("model", "benchmark", "problem", "n", "c")


# ------------------------------------------------------------------------------------------ atomic writes
def write_text_atomic(path: str, text: str) -> None:
    """Writes text to path via a temporary file in the same folder and os.replace (never half-written)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl_atomic(path: str, rows: Iterable[Mapping[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_csv_atomic(path: str, fields: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


# ------------------------------------------------------------------------------------------ sample files
def round_path(out_dir: str, model: str, benchmark: str, round_index: int) -> str:
    return os.path.join(out_dir, "samples", model, benchmark, f"round_{round_index:04d}.jsonl")


def read_round(path: str, num_problems: int, samples: int) -> list[dict]:
    """The rows of one round file; ValueError naming the file if it does not hold problems × samples rows."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    seen = {(r["problem"], r["sample"]) for r in rows}
    if len(rows) != num_problems * samples or len(seen) != len(rows):
        raise ValueError(f"{path}: {len(rows)} samples, expected {num_problems} problems × {samples}; delete the "
                         f"file to redraw that round")
    return rows


def problem_counts(rows: Iterable[Mapping[str, Any]], num_problems: int, n: int) -> list[tuple[int, int]]:
    """(n, c) per problem from sample rows, counting the samples with index < n (c: reward >= 1)."""
    drawn, correct = [0] * num_problems, [0] * num_problems
    for r in rows:
        if r["sample"] < n:
            drawn[r["problem"]] += 1
            correct[r["problem"]] += float(r["reward"]) >= 1.0
    short = [p for p in range(num_problems) if drawn[p] != n]
    if short:
        raise ValueError(f"problem {short[0]} has {drawn[short[0]]} samples, expected {n}")
    return list(zip(drawn, correct))


# ---------------------------------------------------------------------------------------------- tables
def passk_rows(counts: Mapping[str, Mapping[str, Sequence[tuple[int, int]]]],
               ks: Sequence[int]) -> list[dict]:
    """passk.csv rows from {model: {benchmark: [(n, c) per problem]}}; each model also gets the "average"
    benchmark (the unweighted mean over its benchmarks, as the paper averages its math benchmarks)."""
    rows = []
    for model, per_bench in counts.items():
        tables = {b: pass_at_k_table(cs, ks) for b, cs in per_bench.items()}
        for bench, table in tables.items():
            cs = per_bench[bench]
            rows += [{"model": model, "benchmark": bench, "k": k, "pass_at_k": table[k], "num_problems": len(cs),
                      "n": min(n for n, _ in cs)} for k in ks]
        total = sum(len(cs) for cs in per_bench.values())
        n_min = min(n for cs in per_bench.values() for n, _ in cs)
        rows += [{"model": model, "benchmark": AVERAGE, "k": k, "num_problems": total, "n": n_min,
                  "pass_at_k": sum(t[k] for t in tables.values()) / len(tables)} for k in ks]
    return rows


def read_passk_csv(path: str) -> list[dict]:
    """passk.csv rows with typed values; ValueError naming the file if a column is missing or malformed."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in PASSK_FIELDS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a passk.csv (missing columns {missing})")
        rows = []
        for i, r in enumerate(reader, start=2):
            try:
                rows.append({"model": r["model"], "benchmark": r["benchmark"], "k": int(r["k"]),
                             "pass_at_k": float(r["pass_at_k"]), "num_problems": int(r["num_problems"]),
                             "n": int(r["n"])})
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}: line {i}: {e}") from None
    return rows


def read_per_problem_csv(path: str) -> dict[tuple[str, str], list[tuple[int, int]]]:
    """{(model, benchmark): [(n, c) per problem, in problem order]} from per_problem.csv."""
    out: dict[tuple[str, str], dict[int, tuple[int, int]]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        for i, r in enumerate(csv.DictReader(f), start=2):
            try:
                out.setdefault((r["model"], r["benchmark"]), {})[int(r["problem"])] = (int(r["n"]), int(r["c"]))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}: line {i}: not a per_problem.csv row ({e})") from None
    return {key: [v[p] for p in sorted(v)] for key, v in out.items()}


def group_of(name: str) -> str:
    """The mode a model or run belongs to: its name without a trailing seed suffix ("grpo-s2" → "grpo")."""
    return re.sub(r"[-_]s(eed)?\d+$", "", name)


def group_table(rows: Sequence[Mapping[str, Any]], benchmark: str, ks: Sequence[int]) -> list[dict]:
    """Per group (mode), in first-seen order: {"group", "seeds", "models", k: (mean, std over seeds)} for the
    ks present; std is the sample standard deviation (0.0 for one seed)."""
    import statistics

    values: dict[str, dict[str, dict[int, float]]] = {}
    for r in rows:
        if r["benchmark"] == benchmark and r["k"] in ks:
            values.setdefault(group_of(r["model"]), {}).setdefault(r["model"], {})[r["k"]] = r["pass_at_k"]
    out = []
    for group, models in values.items():
        entry: dict[Any, Any] = {"group": group, "seeds": len(models), "models": sorted(models)}
        for k in ks:
            xs = [m[k] for m in models.values() if k in m]
            if xs:
                entry[k] = (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)
        out.append(entry)
    return out


def format_group_table(table: Sequence[Mapping[Any, Any]], ks: Sequence[int]) -> str:
    """A markdown table: mode, seeds, pass@k as mean ± std over seeds."""
    lines = ["| mode | seeds | " + " | ".join(f"pass@{k}" for k in ks) + " |",
             "|---|---|" + "---|" * len(ks)]
    for e in table:
        cells = [f"{e[k][0]:.3f} ± {e[k][1]:.3f}" if k in e else "–" for k in ks]
        lines.append(f"| {e['group']} | {e['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_model_table(rows: Sequence[Mapping[str, Any]], benchmark: str, ks: Sequence[int]) -> str:
    """A markdown table: every model (every seed) on its own line, pass@k for the ks."""
    values: dict[str, dict[int, float]] = {}
    for r in rows:
        if r["benchmark"] == benchmark and r["k"] in ks:
            values.setdefault(r["model"], {})[r["k"]] = r["pass_at_k"]
    lines = ["| model | " + " | ".join(f"pass@{k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    lines += [f"| {m} | " + " | ".join(f"{v[k]:.3f}" if k in v else "–" for k in ks) + " |" for m, v in values.items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------ per-problem results from a file
def read_results_jsonl(path: str) -> list[tuple[int, int]]:
    """(n, c) per problem; a missing file, or a malformed line, raises ValueError naming file, row and field."""
    counts = []
    try:
        with open(path, encoding="utf-8") as f:
            rows = [ln for ln in f if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read results ({type(e).__name__}: {e})") from None
    for row_no, line in enumerate(rows, start=1):
        where = f"{path}: row {row_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: field '<row>': invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: field '<row>': expected a JSON object")
        if "rewards" in row or "correct" in row:
            key = "rewards" if "rewards" in row else "correct"
            vals = row[key]
            if not isinstance(vals, list) or not vals or not all(isinstance(v, (int, float, bool)) for v in vals):
                raise ValueError(f"{where}: field '{key}': expected a non-empty list of numbers / booleans")
            n, c = len(vals), sum(1 for v in vals if float(v) >= 1.0)
        else:
            nk, ck = ("n", "c") if "n" in row else ("num_samples", "num_correct")
            for key in (nk, ck):
                if not isinstance(row.get(key), int) or isinstance(row.get(key), bool):
                    raise ValueError(f"{where}: field '{key}': expected an integer "
                                     f"(or give 'rewards' / 'correct' lists)")
            n, c = row[nk], row[ck]
            if not 0 <= c <= n or n < 1:
                raise ValueError(f"{where}: field '{ck}': need 0 <= c <= n and n >= 1, got n={n}, c={c}")
        counts.append((n, c))
    if not counts:
        raise ValueError(f"{path}: no results")
    return counts


def summarize(counts: Sequence[tuple[int, int]], ks: Sequence[int] | None = None,
              extra: dict | None = None) -> dict:
    """The json report of one results file: pass@k per k (string keys), number of problems, samples each."""
    n_min = min(n for n, _ in counts)
    ks = list(ks) if ks is not None else default_ks(n_min)
    table = pass_at_k_table(counts, ks)
    return {"pass_at_k": {str(k): v for k, v in table.items()}, "num_problems": len(counts),
            "samples_per_problem": n_min, "ks": list(table), **(extra or {})}
