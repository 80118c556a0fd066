"""pass@k table from per-problem results, or from sampling a model with vLLM.

    # from results (one problem per line: {"n": 8, "c": 3} or {"rewards": [...]} or {"correct": [...]})
    python tools/eval_passk.py --results per_problem.jsonl --out passk.json

    # sample a Hugging Face model folder: n responses per problem, scored by the reward registry
    python tools/eval_passk.py --model runs/hf_model --data reasoning_gym/chain_sum --size 64 --n 8 \
        --max-tokens 256 --out passk.json [--per-problem per_problem.jsonl]

--data is a .jsonl / .parquet prompt file or reasoning_gym/<task> (validation split of --seed).
Prints the table (k = 1, 2, 4, ..., n) and writes the json atomically.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_simko.eval.evaluate import read_results_jsonl, summarize, write_json_atomic  # noqa: E402
from megatron_simko.eval.passk import format_table  # noqa: E402


def load_examples(spec: str, size: int | None, seed: int):
    """A prompt file, or the validation split of reasoning_gym/<task> (64 problems unless --size)."""
    from megatron_simko.data.datasets import load_prompts

    if spec.startswith("reasoning_gym/"):
        return list(load_prompts(spec, split="validation", size=size or 64, seed=seed))
    return list(load_prompts(spec, size=size))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--results", help="jsonl of per-problem results")
    src.add_argument("--model", help="Hugging Face model folder to sample from (vLLM)")
    ap.add_argument("--data", help="prompt file or reasoning_gym/<task> (with --model)")
    ap.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    ap.add_argument("--size", type=int, help="number of problems (default: all; 64 for reasoning_gym)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=8, help="samples per problem")
    ap.add_argument("--ks", help="comma-separated k values (default 1,2,4,...,n)")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--dtype", default="auto", help="vLLM dtype (float32 on CPU tests)")
    ap.add_argument("--out", help="json report path (written atomically)")
    ap.add_argument("--per-problem", help="also write per-problem results (with responses) as jsonl")
    args = ap.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")] if args.ks else None

    t0 = time.time()
    extra = {}
    if args.results:
        counts = read_results_jsonl(args.results)
        extra["source"] = {"results": os.path.abspath(args.results)}
    else:
        if not args.data:
            ap.error("--model needs --data")
        from megatron_simko.eval.evaluate import generate_and_score

        examples = load_examples(args.data, args.size, args.seed)
        results = generate_and_score(args.model, examples, n=args.n, max_tokens=args.max_tokens,
                                     temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                     tokenizer_dir=args.tokenizer, dtype=args.dtype)
        counts = [(r["n"], r["c"]) for r in results]
        extra["source"] = {"model": os.path.abspath(args.model), "data": args.data, "n": args.n,
                           "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                           "seed": args.seed}
        extra["mean_reward"] = sum(c for _, c in counts) / sum(n for n, _ in counts)
        if args.per_problem:
            tmp = args.per_problem + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                for r in results:
                    f.write(json.dumps(r) + "\n")
            os.replace(tmp, args.per_problem)
    report = summarize(counts, ks, extra)
    report["seconds"] = round(time.time() - t0, 3)
    print(format_table({int(k): v for k, v in report["pass_at_k"].items()},
                       f"pass@k over {report['num_problems']} problems, {report['samples_per_problem']} samples each"))
    if args.out:
        write_json_atomic(args.out, report)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
