"""tools/eval_passk.py and megatron_simko/eval/: several models × several benchmarks, rounds of seeds, resume,
the files it writes (checked against an independent pass@k from the per-sample rewards), and the one-line
errors for bad input — each before anything is written."""
import csv
import json
import os
import shutil
import subprocess
import sys
from fractions import Fraction
from math import comb

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(ROOT, "tools", "eval_passk.py")
sys.path.insert(0, os.path.join(ROOT, "tools"))

import eval_passk  # noqa: E402

CHAIN_SUM = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}


def exact_passk(n, c, k):
    return float(1 - Fraction(comb(n - c, k), comb(n, k)))


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """A tiny model folder (tokenizer, config, random weights): enough for every check before sampling."""
    from megatron_simko.models.tiny import TinyModelSpec, make_tiny_model

    out = str(tmp_path_factory.mktemp("untrained") / "model")
    make_tiny_model(out, TinyModelSpec(task="chain_sum", sft_steps=0, threads=1), log=lambda m: None)
    return out


def run_main(argv, capsys):
    rc = eval_passk.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, needle):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("case,needle", [
    ("unknown_task", "unknown reasoning-gym task 'no_such_task'"),
    ("missing_file", "neither reasoning_gym/<task> nor an existing"),
    ("no_weights", "has no weight files"),
    ("n_below_k", "pass@16 needs n >= 16"),
    ("too_long", "exceeds model m's context of 64 tokens"),
    ("twice", "the name 'm' is given twice"),
    ("bad_name", "expected NAME=VALUE"),
    ("bad_task_config", "--task-config is not valid JSON"),
    ("n_not_multiple", "must be a multiple of --samples-per-round"),
    ("task_config_no_task", "--task-config applies to reasoning_gym/<task> benchmarks and none is given"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, needle, untrained, tmp_path, capsys):
    model, data = untrained, "cs=reasoning_gym/chain_sum"
    extra = []
    if case == "unknown_task":
        data = "x=reasoning_gym/no_such_task"
    elif case == "missing_file":
        data = f"x={tmp_path / 'nope.jsonl'}"
    elif case == "no_weights":
        model = str(tmp_path / "noweights")
        shutil.copytree(untrained, model, ignore=shutil.ignore_patterns("*.safetensors"))
    elif case == "n_below_k":
        extra = ["--ks", "1,16"]
    elif case == "too_long":
        model = str(tmp_path / "short")
        shutil.copytree(untrained, model)
        cfg = json.loads(open(os.path.join(model, "config.json")).read())
        cfg["max_position_embeddings"] = 64
        open(os.path.join(model, "config.json"), "w").write(json.dumps(cfg))
    elif case == "twice":
        extra = ["--model", f"m={untrained}"]
    elif case == "bad_name":
        model = f"bad name={untrained}"
    elif case == "bad_task_config":
        extra = ["--task-config", "{nope"]
    elif case == "n_not_multiple":
        extra = ["--n", "12", "--samples-per-round", "8"]
    elif case == "task_config_no_task":
        data = f"x={tmp_path / 'bench.jsonl'}"
        from megatron_simko.data import load_prompts, write_prompt_jsonl

        write_prompt_jsonl(data[2:], list(load_prompts("reasoning_gym/chain_sum", size=2, seed=1, **CHAIN_SUM)))
    out_dir = tmp_path / "out"
    argv = ["--model", model if case == "bad_name" else f"m={model}", "--data", data, "--n", "8", "--size", "4",
            "--max-tokens", "16", "--out-dir", str(out_dir), "--no-progress", *extra]
    if case != "bad_task_config":
        argv += ["--task-config", json.dumps(CHAIN_SUM)]
    rc, _, err = run_main(argv, capsys)
    assert_one_line_error(rc, err, needle)
    assert not out_dir.exists()


@pytest.mark.parametrize("content,needle", [
    (None, "cannot read results (FileNotFoundError"),
    ('{"n": 4, "c": 1}\n{"n": 4}\n', "row 2: field 'c'"),
    ("not json\n", "row 1: field '<row>': invalid JSON"),
    ('{"n": 4, "c": 1}\n', "pass@8 needs at least 8 samples per problem"),
    (b"\xff\xfe\x00garbage", "cannot read results (UnicodeDecodeError"),
])
def test_bad_results_file_is_one_line_exit_2(content, needle, tmp_path, capsys):
    """Issue 10, item 10: a bad results file used to end in a traceback."""
    path = tmp_path / "r.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    out = tmp_path / "report.json"
    rc, _, err = run_main(["--results", str(path), "--out", str(out), "--ks", "1,8"] if "pass@8" in needle
                          else ["--results", str(path), "--out", str(out)], capsys)
    assert_one_line_error(rc, err, needle)
    assert not out.exists()


# --------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def warm(tiny_model):
    """A briefly supervised chain_sum model, so rewards are mixed and pass@k is not trivially 0 or 1: the session's
    read-only tiny model (tests/conftest.py), which the end-to-end training tests use too."""
    return tiny_model


def cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_LOGGING_LEVEL="ERROR", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, CLI, *args], capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)


def read_rows(out_dir, model, bench):
    folder = os.path.join(out_dir, "samples", model, bench)
    rows = []
    for name in sorted(os.listdir(folder)):
        rows += [json.loads(line) for line in open(os.path.join(folder, name))]
    return rows


def mtimes(out_dir):
    root = os.path.join(out_dir, "samples")
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(root) for f in fs}


@pytest.mark.slow
def test_models_benchmarks_rounds_files_and_resume(warm, tmp_path):
    from megatron_simko.data import load_prompts, write_prompt_jsonl

    prompts = str(tmp_path / "file_bench.jsonl")
    write_prompt_jsonl(prompts, list(load_prompts("reasoning_gym/chain_sum", "validation", size=3, seed=77,
                                                  **CHAIN_SUM)))
    out = str(tmp_path / "eval")
    base = ["--model", f"a={warm}", "--model", f"b={warm}", "--data", "cs=reasoning_gym/chain_sum",
            "--data", f"file={prompts}", "--task-config", json.dumps(CHAIN_SUM), "--size", "5",
            "--samples-per-round", "4", "--protocol", "paper", "--max-tokens", "16", "--out-dir", out,
            "--no-progress", "--dtype", "float32"]
    proc = cli(*base, "--n", "8")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = mtimes(out)
    assert len(files) == 2 * 2 * 2  # models × benchmarks × rounds
    for m in ("a", "b"):
        for bench, problems in (("cs", 5), ("file", 3)):
            rows = read_rows(out, m, bench)
            assert len(rows) == problems * 8
            assert {(r["problem"], r["sample"]) for r in rows} == {(p, s) for p in range(problems) for s in range(8)}
            assert all(r["reward"] in (0.0, 1.0) and r["finish_reason"] in ("stop", "length") for r in rows)
            assert len({r["seed"] for r in rows}) == len(rows)  # every sample its own seed, rounds included
    # a sample depends only on (seed, round, problem, sample): the same weights under two names agree exactly
    strip = lambda rows: [{k: v for k, v in r.items() if k != "model"} for r in rows]  # noqa: E731
    assert strip(read_rows(out, "a", "cs")) == strip(read_rows(out, "b", "cs"))
    rewards = [r["reward"] for r in read_rows(out, "a", "cs")]
    assert 0 < sum(rewards) < len(rewards)  # mixed: the check below is not trivial

    def check_tables(n):
        with open(os.path.join(out, "passk.csv")) as f:
            table = {(r["model"], r["benchmark"], int(r["k"])): float(r["pass_at_k"]) for r in csv.DictReader(f)}
        ks = [k for k in (1, 2, 4, 8, 16) if k <= n]
        assert set(table) == {(m, b, k) for m in "ab" for b in ("cs", "file", "average") for k in ks}
        for m in "ab":
            for bench in ("cs", "file"):
                rows = [r for r in read_rows(out, m, bench) if r["sample"] < n]
                per_problem = {}
                for r in rows:
                    per_problem.setdefault(r["problem"], []).append(r["reward"])
                for k in ks:
                    ref = sum(exact_passk(n, int(sum(v)), k) for v in per_problem.values()) / len(per_problem)
                    assert table[m, bench, k] == pytest.approx(ref, abs=1e-12)
            for k in ks:
                assert table[m, "average", k] == pytest.approx((table[m, "cs", k] + table[m, "file", k]) / 2)
        report = json.load(open(os.path.join(out, "passk.json")))
        assert report["n"] == n and report["settings"]["temperature"] == 0.6 and report["settings"]["top_p"] == 0.95
        assert report["pass_at_k"]["a"]["cs"]["1"] == pytest.approx(table["a", "cs", 1])

    check_tables(8)
    # a re-run draws nothing ...
    proc = cli(*base, "--n", "8")
    assert proc.returncode == 0 and "0 to draw" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert mtimes(out) == files
    # ... a larger n draws only the new rounds ...
    proc = cli(*base, "--n", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    grown = mtimes(out)
    assert len(grown) == 2 * 2 * 4 and all(grown[p] == t for p, t in files.items())
    check_tables(16)
    # ... and other sampling settings on the same folder are refused, changing nothing
    proc = cli(*base, "--n", "16", "--temperature", "1.0")
    assert proc.returncode == 2 and "temperature" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert mtimes(out) == grown

    # One engine serves the models of one architecture: `a`'s weights swapped into an engine built for another
    # model (same config, other weights) sample exactly what a fresh engine drew for `a` above, bit for bit.
    other = perturbed_copy(warm, str(tmp_path / "other"))
    out2 = str(tmp_path / "eval_shared")
    assert base[:4] == ["--model", f"a={warm}", "--model", f"b={warm}"]
    shared = ["--model", f"o={other}", "--model", f"a={warm}", *(a.replace(out, out2) for a in base[4:])]
    proc = cli(*shared, "--n", "16")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "a: weights swapped into the running engine" in proc.stdout, proc.stdout[-2000:]
    for bench in ("cs", "file"):
        assert read_rows(out2, "a", bench) == read_rows(out, "a", bench)
    assert strip(read_rows(out2, "o", "cs")) != strip(read_rows(out, "a", "cs"))  # other weights: not trivial


def perturbed_copy(model_dir: str, dest: str) -> str:
    """The model folder with every weight moved by a little noise (same config, tokenizer and files)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, dest)
    gen = torch.Generator().manual_seed(0)
    path = os.path.join(dest, "model.safetensors")
    weights = load_file(path)
    save_file({k: v + 0.02 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in weights.items()}, path,
              metadata={"format": "pt"})
    return dest
