"""pass@k evaluation: n sampled responses per problem (vLLM), scored by the reward registry.

Also reads per-problem results from jsonl, one problem per line, any of:
    {"n": 8, "c": 3}   {"num_samples": 8, "num_correct": 3}   {"rewards": [1, 0, ...]}   {"correct": [true, ...]}
(a reward counts as correct when it is >= 1.0, like the binary RLVR rewards).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

from .passk import default_ks, pass_at_k_table


def read_results_jsonl(path: str) -> list[tuple[int, int]]:
    """(n, c) per problem; a malformed line raises ValueError naming file, row and field."""
    counts = []
    with open(path, encoding="utf-8") as f:
        rows = [ln for ln in f if ln.strip()]
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


def generate_and_score(model_dir: str, examples: Sequence[Any], n: int, max_tokens: int = 512,
                       temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                       tokenizer_dir: str | None = None, dtype: str = "auto", reward_timeout_s: float = 5.0,
                       llm_kwargs: dict | None = None) -> list[dict]:
    """Per problem: {"index", "data_source", "rewards", "n", "c", "responses"} from n samples each.

    vLLM runs in this process (on CPU: VLLM_ENABLE_V1_MULTIPROCESSING=0, enforce_eager). Prompts are rendered
    with the tokenizer's chat template (else ChatML) and given to vLLM as token ids, so no BOS is added twice.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from ..data.prompts import render_prompt
    from ..data.tokenizer import HFTokenizer
    from ..rewards.worker import RewardScorer

    tok = HFTokenizer(tokenizer_dir or model_dir)
    prompts = [TokensPrompt(prompt_token_ids=tok.encode(render_prompt(ex, tok))) for ex in examples]
    max_len = max(len(p["prompt_token_ids"]) for p in prompts) + max_tokens
    kwargs = dict(model=model_dir, tokenizer=tokenizer_dir or model_dir, dtype=dtype, seed=seed,
                  max_model_len=max_len, enforce_eager=True)
    kwargs.update(llm_kwargs or {})
    llm = LLM(**kwargs)
    params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    responses = [[o.text for o in out.outputs] for out in outputs]
    with RewardScorer(timeout_s=reward_timeout_s) as scorer:
        flat = scorer.score([r for rs in responses for r in rs], [ex for ex, rs in zip(examples, responses)
                                                                     for _ in rs])
    results = []
    for i, (ex, rs) in enumerate(zip(examples, responses)):
        rewards = flat[i * n:(i + 1) * n]
        results.append({"index": i, "data_source": ex.data_source, "n": n,
                        "c": sum(1 for r in rewards if r >= 1.0), "rewards": rewards, "responses": rs})
    return results


def summarize(counts: Sequence[tuple[int, int]], ks: Sequence[int] | None = None,
              extra: dict | None = None) -> dict:
    """The json report: pass@k per k (string keys), number of problems, samples per problem."""
    table = pass_at_k_table(counts, ks)
    n_min = min(n for n, _ in counts)
    return {"pass_at_k": {str(k): v for k, v in table.items()}, "num_problems": len(counts),
            "samples_per_problem": n_min, "ks": list(table), **(extra or {})}


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes json to path via a temporary file and os.replace (never a half-written file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}.{int(time.time() * 1e6)}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


__all__ = ["default_ks", "generate_and_score", "read_results_jsonl", "summarize", "write_json_atomic"]
