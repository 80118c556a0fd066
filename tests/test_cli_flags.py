"""Command lines mean what they say: no entry point accepts an abbreviated flag, and a flag that does not apply to
the chosen mode is refused in one line (exit 2) instead of being silently ignored (megatron_simko/cli.py)."""
import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import eval_passk  # noqa: E402

from megatron_simko.train import parse_args  # noqa: E402


def entry_point_files():
    for folder in ("megatron_simko", "tools", "benchmarks", "examples"):
        for dirpath, _, names in os.walk(os.path.join(ROOT, folder)):
            yield from (os.path.join(dirpath, n) for n in names if n.endswith(".py"))


def parser_calls(path):
    """Every ArgumentParser(...) and subparsers' add_parser(...) call in a file, as (line, keyword names)."""
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("ArgumentParser", "add_parser"):
            yield node.lineno, {k.arg for k in node.keywords}


def test_every_parser_refuses_abbreviations():
    calls = [(os.path.relpath(p, ROOT), line, kw) for p in entry_point_files() for line, kw in parser_calls(p)]
    assert len(calls) >= 12, calls  # train, export, eval (study, plots), tools/, benchmarks/ all found
    missing = [f"{p}:{line}" for p, line, kw in calls if "allow_abbrev" not in kw]
    assert not missing, f"ArgumentParser without allow_abbrev=False: {missing}"


def test_an_abbreviated_flag_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", "x.yaml", "--dry"])  # argparse's default would take it for --dry-run
    assert e.value.code == 2 and "unrecognized arguments: --dry" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["--config", "x.yaml", "--skip-data"], "error: --skip-data applies to --dry-run only"),
    (["--config", "x.yaml", "--nodes", "4"], "error: --nodes applies to --dry-run only"),
    (["--config", "x.yaml", "--gpu-memory-gib", "40"], "error: --gpu-memory-gib applies to --dry-run only"),
    (["--config", "x.yaml", "--te", "no"], "error: --te applies to --dry-run only"),
])
def test_train_refuses_dry_run_flags_without_dry_run(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [needle], err
    assert parse_args(argv + ["--dry-run"]).dry_run  # with --dry-run the same line is fine


def test_eval_out_is_refused_when_sampling(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        eval_passk.main(["--model", f"a={tmp_path}", "--data", "c=reasoning_gym/chain_sum", "--out", "x.json"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == ["error: --out applies to --results only; with --model, results go to "
                                         "--out-dir"], err
    assert os.listdir(tmp_path) == []  # nothing written, no runs/passk


@pytest.mark.parametrize("flag,value", [("--n", "8"), ("--out-dir", "elsewhere"), ("--protocol", "paper"),
                                        ("--temperature", "0.6"), ("--data", "c=reasoning_gym/chain_sum")])
def test_eval_sampling_flags_are_refused_with_results(flag, value, tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    results.write_text('{"n": 4, "c": 1}\n')
    with pytest.raises(SystemExit) as e:
        eval_passk.main(["--results", str(results), flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [f"error: {flag} does not apply to --results (it reads pass@k inputs from "
                                         f"the file)"], err
    assert eval_passk.main(["--results", str(results), "--ks", "1,2"]) == 0  # its own flags still work
