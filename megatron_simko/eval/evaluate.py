"""pass@k evaluation at the paper's protocol: several models × several benchmarks, n samples per problem drawn
in rounds of distinct seeds, resumable (files: ``eval/results.py``); one vLLM engine while the models share an
architecture (their weights swapped in turn), a new one when it changes.

    evaluate({"base": "runs/base", "simko": "runs/simko/hf_final"},
             {"countdown": "reasoning_gym/countdown"}, EvalSettings(n=256, **PROTOCOLS["paper"]), "runs/passk")

Seeds: sample j of problem i in round r is drawn with ``request_seed(seed, r, i, j)`` (rollout/base.py), so a
sample depends on nothing but (seed, round, problem, sample) — not on batching, round size elsewhere, or which
models ran before. Everything checkable is checked before the first engine starts (:func:`prepare`): unknown
benchmarks, model folders without weights, n < max k, prompts longer than the model's context — each an
:class:`EvalError` with a one-line message, and nothing written.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional

from .passk import default_ks
from .results import (PER_PROBLEM_FIELDS, PASSK_FIELDS, passk_rows, problem_counts, read_round, round_path,
                      write_csv_atomic, write_json_atomic, write_jsonl_atomic)

# The authors' evaluation sampling (SimKO, arXiv 2510.14807: temperature 0.6, top-p 0.95); "train" samples as
# the RL rollouts do.
PROTOCOLS = {"paper": {"temperature": 0.6, "top_p": 0.95}, "train": {"temperature": 1.0, "top_p": 1.0}}
DEFAULT_RG_SIZE = 64  # problems per reasoning_gym benchmark unless EvalSettings.size says otherwise
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class EvalError(ValueError):
    """Bad input to an evaluation; the message is one line naming the problem and what to do."""


@dataclass(frozen=True)
class EvalSettings:
    n: int = 64  # samples per problem
    samples_per_round: int = 64  # each round draws this many per problem with its own seeds (n: a multiple)
    ks: Optional[tuple] = None  # pass@k for these k; default 1, 2, 4, ..., n
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int = 0
    size: Optional[int] = None  # problems per benchmark: files all rows, reasoning_gym DEFAULT_RG_SIZE
    split: str = "validation"  # reasoning_gym split (seeded by data_seed)
    data_seed: int = 0
    task_config: Mapping[str, Any] = field(default_factory=dict)  # reasoning_gym task options
    system_prompt: Optional[str] = None  # None: the trainer's default (data/prompts.py)
    instruction: Optional[str] = None  # None: the trainer's default
    dtype: str = "auto"
    kv_cache_gib: int = 1  # CPU: vLLM KV cache
    reward_timeout_s: float = 5.0

    @property
    def round_size(self) -> int:
        return min(self.samples_per_round, self.n)

    @property
    def rounds(self) -> int:
        return math.ceil(self.n / self.round_size)

    @property
    def k_values(self) -> list[int]:
        return list(self.ks) if self.ks else default_ks(self.n)

    def sampling_key(self) -> dict:
        """What the drawn samples depend on (a resumed evaluation must agree on all of it; n and ks may grow)."""
        d = asdict(self)
        for k in ("n", "ks", "dtype", "kv_cache_gib", "reward_timeout_s"):
            d.pop(k)
        d["samples_per_round"] = self.round_size
        d["task_config"] = dict(self.task_config)
        return d


def check_settings(s: EvalSettings) -> None:
    if s.n < 1 or s.samples_per_round < 1:
        raise EvalError(f"--n ({s.n}) and --samples-per-round ({s.samples_per_round}) must be >= 1")
    if s.n > s.samples_per_round and s.n % s.samples_per_round:
        raise EvalError(f"--n {s.n} must be a multiple of --samples-per-round {s.samples_per_round} (or at most it)")
    if s.ks and (min(s.ks) < 1 or max(s.ks) > s.n):
        raise EvalError(f"pass@{max(s.ks)} needs n >= {max(s.ks)} samples per problem, but --n is {s.n}; raise --n "
                        f"or lower --ks")
    if not s.temperature > 0 or not 0 < s.top_p <= 1 or s.max_tokens < 1:
        raise EvalError(f"need temperature > 0, 0 < top_p <= 1, max_tokens >= 1; got {s.temperature}, {s.top_p}, "
                        f"{s.max_tokens}")
    if s.split not in ("train", "validation"):
        raise EvalError(f"--split must be train or validation, got {s.split!r}")


def parse_named(spec: str, what: str) -> tuple[str, str]:
    """"NAME=VALUE" → (NAME, VALUE); a bare VALUE is named after its last path part (reasoning_gym/x → x)."""
    name, sep, value = spec.partition("=")
    if not sep:
        value = spec
        name = os.path.basename(os.path.normpath(spec)).split(".")[0]
    if not name or not value or not set(name) <= _NAME_CHARS:
        raise EvalError(f"{what} {spec!r}: expected NAME=VALUE with NAME made of letters, digits, '.', '_', '-'")
    return name, value


# ------------------------------------------------------------------------------------------ checks, inputs
def load_benchmark(name: str, source: str, s: EvalSettings) -> list:
    """The problems of one benchmark (PromptExample list); EvalError for an unknown source."""
    from ..data import load_prompts
    from ..data.procedural import SOURCE_PREFIX, rg_task_names

    if source.startswith(SOURCE_PREFIX):
        task = source[len(SOURCE_PREFIX):]
        if task not in rg_task_names():
            raise EvalError(f"--data {name}={source}: unknown reasoning-gym task {task!r} (see "
                            f"reasoning_gym.factory.DATASETS for the names)")
        try:
            return list(load_prompts(source, s.split, size=s.size or DEFAULT_RG_SIZE, seed=s.data_seed,
                                     **dict(s.task_config)))
        except (TypeError, ValueError) as e:
            raise EvalError(f"--data {name}={source}: bad task options {dict(s.task_config)}: {e}") from None
    if not os.path.isfile(source):
        raise EvalError(f"--data {name}={source}: neither reasoning_gym/<task> nor an existing .jsonl / .parquet "
                        f"file")
    try:
        return list(load_prompts(source, size=s.size))
    except ValueError as e:
        raise EvalError(f"--data {name}={source}: {e}") from None


def model_fingerprint(path: str) -> str:
    """Identifies a model folder's contents cheaply: config.json's bytes and each weight file's size and mtime."""
    h = hashlib.sha256()
    with open(os.path.join(path, "config.json"), "rb") as f:
        h.update(f.read())
    for name in sorted(os.listdir(path)):
        if name.endswith((".safetensors", ".bin")):
            st = os.stat(os.path.join(path, name))
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


@dataclass
class Prepared:
    """Everything validated before sampling: per model its tokenizer's prompts, per benchmark its problems."""

    models: dict  # name -> path
    benchmarks: dict  # name -> source
    problems: dict  # benchmark -> [PromptExample]
    prompt_ids: dict  # (model, benchmark) -> [[token ids] per problem]
    eos_ids: dict  # model -> eos id
    max_model_len: dict  # model -> prompt + response tokens the engine must hold
    fingerprints: dict  # model -> model_fingerprint


def prepare(models: Mapping[str, str], benchmarks: Mapping[str, str], s: EvalSettings) -> Prepared:
    """Loads and checks every input; raises EvalError (one line) on the first problem, before any sampling."""
    from ..data import render_prompt
    from ..data.procedural import SOURCE_PREFIX
    from ..data.prompts import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM
    from ..data.tokenizer import load_tokenizer
    from ..rollout.vllm_engine import EngineBuildError, check_weights_present, read_model_config

    check_settings(s)
    if not models or not benchmarks:
        raise EvalError("give at least one --model NAME=DIR and one --data NAME=SOURCE")
    problems = {b: load_benchmark(b, src, s) for b, src in benchmarks.items()}
    if s.task_config and not any(src.startswith(SOURCE_PREFIX) for src in benchmarks.values()):
        raise EvalError("--task-config applies to reasoning_gym/<task> benchmarks and none is given; drop it "
                        "(prompt files carry their problems)")
    system = DEFAULT_SYSTEM if s.system_prompt is None else s.system_prompt
    instruction = DEFAULT_INSTRUCTION if s.instruction is None else s.instruction
    prompt_ids, eos_ids, max_len, prints = {}, {}, {}, {}
    for m, path in models.items():
        try:
            cfg = read_model_config(path)
            check_weights_present(path)
        except EngineBuildError as e:
            raise EvalError(f"--model {m}={path}: {e}") from None
        context = int(cfg.get("max_position_embeddings") or 0)
        try:
            tok = load_tokenizer(path)
        except (OSError, ValueError) as e:
            raise EvalError(f"--model {m}={path}: no usable tokenizer in the folder ({e})") from None
        eos_ids[m], longest = tok.eos_id, 0
        for b, exs in problems.items():
            ids = [tok.encode(render_prompt(ex, tok, system=system, instruction=instruction)) for ex in exs]
            i = max(range(len(ids)), key=lambda j: len(ids[j]))
            if context and len(ids[i]) + s.max_tokens > context:
                raise EvalError(f"--data {b}: problem {i} has {len(ids[i])} prompt tokens; with --max-tokens "
                                f"{s.max_tokens} that exceeds model {m}'s context of {context} tokens; lower "
                                f"--max-tokens or drop long problems")
            prompt_ids[m, b] = ids
            longest = max(longest, len(ids[i]))
        max_len[m] = longest + s.max_tokens
        prints[m] = model_fingerprint(path)
    return Prepared(dict(models), dict(benchmarks), problems, prompt_ids, eos_ids, max_len, prints)


def check_resume(out_dir: str, p: Prepared, s: EvalSettings) -> dict:
    """The eval_config.json to write: the one on disk extended by these models / benchmarks. EvalError if the
    samples on disk were drawn differently (other sampling settings, other model weights, other problems)."""
    path = os.path.join(out_dir, "eval_config.json")
    mine = {"sampling": s.sampling_key(),
            "models": {m: {"path": os.path.abspath(d), "fingerprint": p.fingerprints[m]} for m, d in p.models.items()},
            "benchmarks": {b: {"source": src if src.startswith("reasoning_gym/") else os.path.abspath(src),
                               "num_problems": len(p.problems[b]),
                               "first_problem": _digest(p.problems[b][0].prompt)} for b, src in p.benchmarks.items()}}
    if not os.path.exists(path):
        return mine
    with open(path, encoding="utf-8") as f:
        old = json.load(f)
    if old.get("sampling") != mine["sampling"]:
        diff = sorted(k for k in mine["sampling"] if old.get("sampling", {}).get(k) != mine["sampling"][k])
        raise EvalError(f"{out_dir} holds samples drawn with other settings ({', '.join(diff)} differ): use the "
                        f"same settings to resume, or another --out-dir")
    for kind in ("models", "benchmarks"):
        for name, entry in mine[kind].items():
            before = old.get(kind, {}).get(name)
            if before is not None and before != entry and _has_samples(out_dir, kind, name):
                raise EvalError(f"{out_dir}: {kind[:-1]} {name!r} was evaluated from a different "
                                f"{'folder or weights' if kind == 'models' else 'problem set'} ({before}); use "
                                f"another name or --out-dir, or delete {os.path.join(out_dir, 'samples')} entries "
                                f"for it")
    merged = {"sampling": mine["sampling"], "models": {**old.get("models", {}), **mine["models"]},
              "benchmarks": {**old.get("benchmarks", {}), **mine["benchmarks"]}}
    return merged


def _digest(prompt: Any) -> str:
    return hashlib.sha256(json.dumps(prompt).encode()).hexdigest()[:16]


def _has_samples(out_dir: str, kind: str, name: str) -> bool:
    root = os.path.join(out_dir, "samples")
    if not os.path.isdir(root):
        return False
    if kind == "models":
        return os.path.isdir(os.path.join(root, name))
    return any(os.path.isdir(os.path.join(root, m, name)) for m in os.listdir(root))


# ------------------------------------------------------------------------------------------------ sampling
def evaluate(models: Mapping[str, str], benchmarks: Mapping[str, str], s: EvalSettings, out_dir: str,
             progress: bool = True, log=print) -> dict:
    """Draws what is missing, then writes per_problem.csv, passk.csv and passk.json; returns passk.json's dict."""
    p = prepare(models, benchmarks, s)
    config = check_resume(out_dir, p, s)
    write_json_atomic(os.path.join(out_dir, "eval_config.json"), config)
    todo = {(m, b, r) for m in p.models for b in p.benchmarks for r in range(s.rounds)
            if not os.path.exists(round_path(out_dir, m, b, r))}
    done = len(p.models) * len(p.benchmarks) * s.rounds - len(todo)
    if done:
        log(f"resuming: {done} (model, benchmark, round) already on disk, {len(todo)} to draw")
    t0 = time.perf_counter()
    if todo:
        _draw(p, s, out_dir, todo, progress, log)
    report = aggregate(out_dir, p, s)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(os.path.join(out_dir, "passk.json"), report)
    return report


def _draw(p: Prepared, s: EvalSettings, out_dir: str, todo: set, progress: bool, log) -> None:
    from tqdm import tqdm

    from ..data.tokenizer import load_tokenizer
    from ..rewards import RewardScorer
    from ..rollout import SamplingConfig, VLLMEngineConfig, VLLMRolloutEngine

    total = sum(len(p.problems[b]) * s.round_size for _, b, r in todo)
    bar = tqdm(total=total, desc="samples", unit="sample", disable=not progress, dynamic_ncols=True)
    engine = None
    with RewardScorer(timeout_s=s.reward_timeout_s) as scorer:
        try:
            for m, path in p.models.items():
                mine = sorted((b, r) for mm, b, r in todo if mm == m)
                if not mine:
                    continue
                # One engine while the models share an architecture (a study's checkpoints): the next model's
                # weights are swapped in instead of building an engine again (seconds each on CPU).
                if engine is not None and engine.serves_like(path, p.max_model_len[m]):
                    swap = engine.load_model_weights(path)
                    log(f"{m}: weights swapped into the running engine ({swap['seconds']:.1f} s)")
                else:
                    if engine is not None:
                        engine.shutdown()  # idempotent: the finally below may call it again if the build fails
                    engine = VLLMRolloutEngine(VLLMEngineConfig(
                        model_dir=path, dtype=s.dtype, max_model_len=p.max_model_len[m], seed=s.seed,
                        cpu_kv_cache_gib=s.kv_cache_gib))
                tok = load_tokenizer(path)
                for b, r in mine:
                    bar.set_description(f"{m} / {b} / round {r + 1}/{s.rounds}")
                    params = SamplingConfig(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                                            seed=s.seed, stop_token_ids=(p.eos_ids[m],))
                    k = s.round_size
                    results = engine.generate(p.prompt_ids[m, b], k, params, step=r)
                    texts = [tok.decode(smp.token_ids, skip_special_tokens=True)
                             for res in results for smp in res.samples]
                    rewards = scorer.score(texts, [p.problems[b][res.prompt_index] for res in results
                                                   for _ in res.samples])
                    rows, t = [], 0
                    for res in results:
                        for j, smp in enumerate(res.samples):
                            rows.append({"model": m, "benchmark": b, "problem": res.prompt_index,
                                         "sample": r * s.round_size + j, "round": r, "seed": smp.seed,
                                         "response": texts[t], "reward": rewards[t], "finish_reason": smp.finish_reason,
                                         "length": smp.length})
                            t += 1
                    write_jsonl_atomic(round_path(out_dir, m, b, r), rows)
                    bar.update(len(rows))
        finally:
            if engine is not None:
                engine.shutdown()
    bar.close()
    if scorer.n_timeouts or scorer.n_errors:
        log(f"warning: {scorer.n_timeouts} reward timeouts and {scorer.n_errors} reward errors scored 0.0")


def aggregate(out_dir: str, p: Prepared, s: EvalSettings) -> dict:
    """per_problem.csv, passk.csv and passk.json's dict from the round files of these models × benchmarks."""
    counts: dict = {}
    per_problem, rewards = [], {}
    for m in p.models:
        for b, exs in p.problems.items():
            rows = []
            for r in range(s.rounds):
                rows += read_round(round_path(out_dir, m, b, r), len(exs), s.round_size)
            cs = problem_counts(rows, len(exs), s.n)
            counts.setdefault(m, {})[b] = cs
            per_problem += [{"model": m, "benchmark": b, "problem": i, "n": n, "c": c} for i, (n, c) in enumerate(cs)]
            rewards.setdefault(m, {})[b] = sum(c for _, c in cs) / sum(n for n, _ in cs)
    ks = s.k_values
    table = passk_rows(counts, ks)
    write_csv_atomic(os.path.join(out_dir, "per_problem.csv"), PER_PROBLEM_FIELDS, per_problem)
    write_csv_atomic(os.path.join(out_dir, "passk.csv"), PASSK_FIELDS, table)
    nested: dict = {}
    for row in table:
        nested.setdefault(row["model"], {}).setdefault(row["benchmark"], {})[str(row["k"])] = row["pass_at_k"]
    return {"pass_at_k": nested, "ks": ks, "n": s.n, "rounds": s.rounds,
            "num_problems": {b: len(exs) for b, exs in p.problems.items()}, "mean_reward": rewards,
            "settings": {**s.sampling_key(), "n": s.n}, "models": {m: os.path.abspath(d) for m, d in p.models.items()},
            "benchmarks": dict(p.benchmarks)}


__all__ = ["EvalError", "EvalSettings", "PROTOCOLS", "aggregate", "evaluate", "load_benchmark", "parse_named",
           "prepare"]
