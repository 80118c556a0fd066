"""pass@k of models on benchmarks, sampled with vLLM (megatron_simko/eval/evaluate.py), or from a results file.

    # several models × several benchmarks, the paper's sampling (temperature 0.6, top-p 0.95), n = 256 per problem
    python tools/eval_passk.py --model base=runs/base --model simko=runs/simko/hf_final \\
        --data countdown=reasoning_gym/countdown --task-config '{"min_numbers": 3, "max_numbers": 3}' \\
        --data mine=problems.jsonl --size 128 --n 256 --protocol paper --max-tokens 64 --out-dir runs/passk

    # pass@k from per-problem results (one problem per line: {"n": 8, "c": 3}, {"rewards": [...]}, {"correct": [...]})
    python tools/eval_passk.py --results per_problem.jsonl [--out passk.json]

Samples are drawn in rounds of --samples-per-round per problem, each round with its own seeds; a re-run with
the same --out-dir skips every (model, benchmark, round) already on disk (n may grow, models may be added).
Writes <out-dir>/samples/<model>/<benchmark>/round_*.jsonl, per_problem.csv, passk.csv (model × benchmark × k,
plus the per-model "average" over benchmarks) and passk.json, each atomically. Bad input is a one-line error,
exit status 2, with nothing written.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_simko.cli import json_object, refuse_flags  # noqa: E402
from megatron_simko.eval.passk import format_table  # noqa: E402

# flags of the sampling mode (--model): none applies to --results, which only reads a file
MODEL_ONLY = ("data", "task_config", "size", "split", "data_seed", "n", "samples_per_round", "protocol",
              "temperature", "top_p", "max_tokens", "seed", "dtype", "out_dir", "no_progress")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(allow_abbrev=False,
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--results", help="jsonl of per-problem results")
    src.add_argument("--model", action="append", metavar="NAME=DIR",
                     help="a Hugging Face model folder to sample (repeatable; NAME defaults to the folder name)")
    ap.add_argument("--data", action="append", metavar="NAME=SOURCE",
                    help="a benchmark: reasoning_gym/<task> or a .jsonl / .parquet prompt file (repeatable)")
    ap.add_argument("--task-config", default="{}", help="JSON options for the reasoning_gym tasks, e.g. "
                                                       '\'{"min_numbers": 3}\'')
    ap.add_argument("--size", type=int, help="problems per benchmark (default: all rows; 64 for reasoning_gym)")
    ap.add_argument("--split", default="validation", choices=("train", "validation"), help="reasoning_gym split")
    ap.add_argument("--data-seed", type=int, default=0, help="reasoning_gym problem seed (the split's seed base)")
    ap.add_argument("--n", type=int, default=64, help="samples per problem (up to 1024 and beyond)")
    ap.add_argument("--samples-per-round", type=int, default=64, help="samples per problem per round (seeded apart)")
    ap.add_argument("--ks", help="comma-separated k values (default 1,2,4,...,n)")
    ap.add_argument("--protocol", choices=("paper", "train"),
                    help="sampling preset: paper = temperature 0.6, top-p 0.95; train = 1.0, 1.0 (flags override)")
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--max-tokens", type=int, default=512, help="response length limit")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--dtype", default="auto", help="vLLM dtype (float32 for CPU fp32 checks)")
    ap.add_argument("--out-dir", default="runs/passk", help="output folder (resumable)")
    ap.add_argument("--out", help="--results: json report path (written atomically)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def from_results(args) -> int:
    from megatron_simko.eval.evaluate import EvalError
    from megatron_simko.eval.results import read_results_jsonl, summarize, write_json_atomic

    ks = parse_ks(args.ks)
    try:
        counts = read_results_jsonl(args.results)
        report = summarize(counts, ks, {"source": {"results": os.path.abspath(args.results)}})
    except ValueError as e:  # a bad results file, or k > n
        raise EvalError(str(e)) from None
    print(format_table({int(k): v for k, v in report["pass_at_k"].items()},
                       f"pass@k over {report['num_problems']} problems, {report['samples_per_problem']} samples each"))
    if args.out:
        write_json_atomic(args.out, report)
        print(f"wrote {args.out}")
    return 0


def parse_ks(text):
    if not text:
        return None
    from megatron_simko.eval.evaluate import EvalError

    try:
        return tuple(int(k) for k in text.split(","))
    except ValueError:
        raise EvalError(f"--ks {text!r}: expected comma-separated integers") from None


def from_models(args) -> int:
    from megatron_simko.eval.evaluate import PROTOCOLS, EvalError, EvalSettings, evaluate, parse_named

    if not args.data:
        raise EvalError("--model needs at least one --data NAME=SOURCE")
    models, benchmarks = {}, {}
    named = [(m, "--model", models) for m in args.model] + [(d, "--data", benchmarks) for d in args.data]
    for spec, what, into in named:
        name, value = parse_named(spec, what)
        if name in into:
            raise EvalError(f"{what}: the name {name!r} is given twice")
        into[name] = value
    task_config = json_object(args.task_config, "--task-config", EvalError)
    sampling = dict(PROTOCOLS[args.protocol or "train"])
    if args.temperature is not None:
        sampling["temperature"] = args.temperature
    if args.top_p is not None:
        sampling["top_p"] = args.top_p
    settings = EvalSettings(n=args.n, samples_per_round=args.samples_per_round, ks=parse_ks(args.ks),
                            max_tokens=args.max_tokens, seed=args.seed, size=args.size, split=args.split,
                            data_seed=args.data_seed, task_config=task_config, dtype=args.dtype, **sampling)
    t0 = time.time()
    report = evaluate(models, benchmarks, settings, args.out_dir, progress=not args.no_progress)
    for m, per_bench in report["pass_at_k"].items():
        for b, table in per_bench.items():
            print(format_table({int(k): v for k, v in table.items()}, f"{m} / {b}"))
    print(f"wrote {os.path.join(args.out_dir, 'passk.csv')} and passk.json ({time.time() - t0:.0f} s)")
    return 0


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.results:
        refuse_flags(ap, args, MODEL_ONLY, "does not apply to --results (it reads pass@k inputs from the file)")
    else:
        refuse_flags(ap, args, ("out",), "applies to --results only; with --model, results go to --out-dir")
    from megatron_simko.eval.evaluate import EvalError
    from megatron_simko.rollout.vllm_engine import EngineBuildError
    from megatron_simko.versions import VersionError, require_supported_versions

    try:
        if not args.results:  # sampling needs vLLM and transformers at the supported versions
            require_supported_versions(vllm=True)
        return from_results(args) if args.results else from_models(args)
    except (EvalError, EngineBuildError, VersionError) as e:  # bad input: one line, exit 2, nothing written
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    sys.exit(main())
