"""The "room" report: will SimKO have anything to do for this model on this task, with these α, K, τ?

    python tools/simko_room.py --model DIR --data reasoning_gym/TASK [--alpha 0.01 --top-k 3 --tau 0.8] --out-dir D

Measured on responses the model samples at the training temperature (1, no top-p) for the task's prompts:

1. **Where the gate lands.** SimKO's top-K smoothing acts only on the gated tokens w_t = 1[H_t > q_τ(H_i)]
   (SIMKO_SPEC.md; `losses.simko.high_entropy_mask` on the entropies of `losses.vocab_parallel.token_statistics`,
   the trainer's own functions): which token strings they are, how many per response, and — for tasks with a
   known decision token (countdown: the signs; graph_color: the colours) — the share that are decisions.
2. **What is there to keep.** Mean entropy and mean p_1..p_K (the top-K probabilities, descending) at the gated
   tokens: SimKO spreads α of a positive update over the top-K, so p_2..p_K is what it can protect.
3. **Are the alternatives valid?** Exactly, where the task allows it (`COMPLETABLE`: countdown, graph_color —
   can the response so far, with c_k appended, still be completed to a correct answer?), at every gated token;
   and for any task by sampling: at a sample of gated tokens ("forks") each top-K candidate c_k is forced, m
   completions are sampled (temperature 1) and scored by the task's reward, and c_k counts as valid if any scores
   1 (biased low when the model itself often fails to complete a valid prefix). Smoothing towards an invalid
   candidate only spends probability on junk.
4. **Prediction.** F = gated tokens per response × the share of gated forks with ≥ 2 valid candidates (exact
   validity where known, else sampled). SimKO's positive update leaves each other candidate a floor of about α/K, so a
   sample leaves the mode at some fork with probability about 1 − (1 − α(K−1)/K)^F.
5. **Visibility.** Whether an evaluation protocol (temperature T, top-p) can see an alternative of probability
   p at all: at a two-way fork (p_1 = 1 − p) it is inside the nucleus iff p_1^(1/T) / (p_1^(1/T) + p^(1/T)) <
   top-p, i.e. p > p_min = 1 / (1 + (top-p / (1 − top-p))^T); measured too: the share of gated tokens whose
   rank-k candidate is inside the nucleus and its mean probability there.

The room gate of docs/toy_study.md (second study) is `ROOM_GATE`; the report checks it and writes a verdict line.
Output: room.json and room.md (atomic), room.png. Deterministic for a seed (CPU, Hugging Face generate).
"""
from __future__ import annotations

import collections
import itertools
import json
import os
import random
import re
import textwrap
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from .results import write_json_atomic, write_text_atomic

# The second study's room gate (issue 19, docs/toy_study.md): (metric, threshold); every one must hold.
ROOM_GATE = (("decision_share", 0.9), ("mean_gated_entropy", 0.7), ("mean_p2_plus_p3", 0.2),
             ("mean_valid_candidates", 1.8))
PROTOCOLS = {"paper": (0.6, 0.95), "train": (1.0, 1.0)}  # (temperature, top-p), as eval/evaluate.py's PROTOCOLS


class RoomError(ValueError):
    """Bad input to the room report; the message is one line."""


@dataclass
class RoomSettings:
    alpha: float = 0.01  # SimKO's α, K, τ (the paper's settings by default)
    top_k: int = 3
    tau: float = 0.8
    n_prompts: int = 32  # task prompts (validation split at data_seed)
    samples: int = 4  # responses per prompt at temperature 1
    forks: int = 24  # gated tokens probed by forcing each top-K candidate
    m: int = 8  # completions per forced candidate
    max_new_tokens: int = 32
    data_seed: int = 1000  # the validation split's seed (1000 = the toy studies' development split)
    seed: int = 0  # sampling and fork choice
    eval_temperature: float = 0.6  # the evaluation protocol whose visibility is checked
    eval_top_p: float = 0.95

    def check(self) -> "RoomSettings":
        if not 0 <= self.alpha <= 1 or not 0 <= self.tau < 1 or self.top_k < 2:
            raise RoomError(f"need 0 <= alpha <= 1, 0 <= tau < 1, top_k >= 2 (got alpha={self.alpha}, "
                            f"tau={self.tau}, top_k={self.top_k})")
        if min(self.n_prompts, self.samples, self.m, self.max_new_tokens) < 1 or self.forks < 0:
            raise RoomError("n_prompts, samples, m and max_new_tokens must be >= 1 and forks >= 0")
        if not self.eval_temperature > 0 or not 0 < self.eval_top_p <= 1:
            raise RoomError(f"need eval temperature > 0 and 0 < top-p <= 1 (got {self.eval_temperature}, "
                            f"{self.eval_top_p})")
        return self


# ------------------------------------------------------------------------------------------ formulas
def predicted_deviation(alpha: float, top_k: int, forks_per_response: float) -> float:
    """1 − (1 − α(K−1)/K)^F: the chance a sample leaves the mode at one of F forks (each at the floor α/K)."""
    return 1.0 - (1.0 - alpha * (top_k - 1) / top_k) ** forks_per_response


def visibility_threshold(temperature: float, top_p: float) -> float:
    """The smallest p an alternative at a two-way fork (p_1 = 1 − p) needs to be inside the top-p nucleus at
    `temperature`: p_1^(1/T) / (p_1^(1/T) + p^(1/T)) < top-p  ⇔  p > 1 / (1 + (top-p / (1 − top-p))^T)."""
    if top_p >= 1.0:
        return 0.0
    return 1.0 / (1.0 + (top_p / (1.0 - top_p)) ** temperature)


def nucleus_view(logits_row, temperature: float, top_p: float, ids) -> list[float]:
    """The probability each token in `ids` gets under sampling at `temperature` with top-p (0 outside the
    nucleus: the smallest set of most likely tokens whose mass reaches top_p, as vLLM / HF keep it)."""
    import torch

    p = torch.softmax(logits_row.double() / temperature, dim=-1)
    order = torch.argsort(p, descending=True)
    before = torch.cumsum(p[order], 0) - p[order]  # mass of the tokens ranked above
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[order] = before < top_p
    kept = torch.where(keep, p, torch.zeros_like(p))
    kept = kept / kept.sum()
    return [float(kept[i]) for i in ids]


DECISIONS: dict[str, Callable[[str, str], bool]] = {  # (response text before the token, token text) -> decision?
    "countdown": lambda before, tok: tok.strip() in ("+", "-", "{", "{-"),  # a sign ("{" / "{-": the first one)
    "graph_color": lambda before, tok: before.rstrip().endswith(":") and tok.strip()[:1].isdigit(),
}


def _graph_color_completable(example, text: str) -> bool:
    """Can the colouring written so far (``\\boxed{{"0":1,"1":2`` …) still be completed to a valid one?"""
    body = text.rsplit("\\boxed{", 1)[-1]
    if not re.fullmatch(r'\{(?:"\d+":\d,)*(?:"\d+":\d?|"\d*"?)?', body):
        return False
    puzzle = example.metadata["rg_entry"]["metadata"]["puzzle"]
    verts, colors = puzzle["vertices"], puzzle["color_options"]
    fixed = {int(v): int(c) for v, c in re.findall(r'"(\d+)":(\d)', body)}
    if any(v not in verts or c not in colors for v, c in fixed.items()):
        return False
    free = [v for v in verts if v not in fixed]
    return any(all(col[u] != col[v] for u, v in puzzle["edges"])
               for col in ({**fixed, **dict(zip(free, ch))} for ch in itertools.product(colors, repeat=len(free))))


def _countdown_completable(example, text: str) -> bool:
    """Can the signed sum written so far (``\\boxed{7 - 5 +`` …) still reach the target with the unused numbers
    (+ and - only, so any order of them)?"""
    meta = example.metadata["rg_entry"]["metadata"]
    body = text.rsplit("\\boxed{", 1)[-1]
    if not re.fullmatch(r"[\d\s+-]*", body):
        return False
    total, used, sign, expect_num = 0, [], 1, True
    for t in re.findall(r"\d+|[+-]", body):
        if t in "+-":
            if not expect_num:
                sign, expect_num = (1 if t == "+" else -1), True
            elif not used and sign == 1 and t == "-":  # a leading unary minus
                sign = -1
            else:
                return False
        elif not expect_num:
            return False
        else:
            total, sign, expect_num = total + sign * int(t), 1, False
            used.append(int(t))
    rest = list(meta["numbers"])
    for n in used:
        if n not in rest:
            return False
        rest.remove(n)
    if not rest:
        return not expect_num and total == meta["target"]
    if not expect_num:  # the next token must be a sign: any signs
        return any(total + sum(s * n for s, n in zip(signs, rest)) == meta["target"]
                   for signs in itertools.product((1, -1), repeat=len(rest)))
    first = [sign] if sign == -1 or used else [1, -1]  # the pending sign takes whichever number comes next
    return any(total + f * rest[i] + sum(s * n for s, n in zip(signs, rest[:i] + rest[i + 1:])) == meta["target"]
               for i in range(len(rest)) for f in first for signs in itertools.product((1, -1), repeat=len(rest) - 1))


# Exact validity of a response prefix (example, text up to and including a candidate) -> completable?, where the
# task allows it; the sampled test (a completion scored 1) is biased low by the model's own completion failures.
COMPLETABLE: dict[str, Callable] = {"countdown": _countdown_completable, "graph_color": _graph_color_completable}


# ------------------------------------------------------------------------------------------ measuring
def load(model_dir: str, data: str, task_config: Optional[dict]):
    """(model, tokenizer, task, task config, prompt style); RoomError on a bad folder or task."""
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise RoomError(f"--model {model_dir!r} is not a Hugging Face model folder (no config.json)")
    if not data.startswith("reasoning_gym/") or len(data) <= len("reasoning_gym/"):
        raise RoomError(f"--data must be reasoning_gym/<task>, got {data!r}")
    task = data[len("reasoning_gym/"):]
    made, style = {}, "task"
    meta = os.path.join(model_dir, "tiny_model.json")
    if os.path.isfile(meta):
        with open(meta, encoding="utf-8") as f:
            made = json.load(f)
        if made.get("task") == task:
            style = made.get("prompt_style", "task")
    if task_config is None:
        task_config = made.get("reasoning_gym_config", {}) if made.get("task") == task else {}
    from transformers import AutoModelForCausalLM

    from ..data.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
    return model, load_tokenizer(model_dir), task, task_config, style


def token_table(model, tok, prompts: list[list[int]], responses: list[list[int]], top_k: int, tau: float):
    """Per response: the trainer's statistics at every response token. Returns a list of dicts with ids,
    entropy [L], topk_p [L, K], topk_ids [L, K], gate [L] (bool) and the logits rows [L, V]."""
    import torch

    from ..losses.simko import high_entropy_mask
    from ..losses.vocab_parallel import token_statistics
    from ..models.tiny import pad_batch

    seqs = [(p, r) for p, r in zip(prompts, responses)]
    input_ids, attn, labels = pad_batch(seqs, tok.pad_id)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attn).logits[:, :-1].float()  # t predicts t+1
    targets, mask = labels[:, 1:], labels[:, 1:] != -100  # [B, T-1]
    stats = token_statistics(logits, targets.clamp(min=0), top_k, mask=mask)
    gate = high_entropy_mask(stats.entropy, mask, tau)
    rows = []
    for b, (p, r) in enumerate(seqs):
        sl = slice(len(p) - 1, len(p) - 1 + len(r))  # the positions predicting the response tokens
        rows.append({"ids": r, "entropy": stats.entropy[b, sl], "topk_p": stats.topk_logprob[b, sl].exp(),
                     "topk_ids": stats.topk_ids[b, sl], "gate": gate[b, sl], "logits": logits[b, sl]})
    return rows


def probe_forks(model, tok, scorer, forks, m: int, seed: int, max_new_tokens: int):
    """For each fork (prompt ids, example, response prefix ids, candidate ids): the share of m completions after
    each forced candidate that the task's reward scores 1 — [fork][k] floats."""
    from ..models.tiny import sample_responses

    prefixes = [(p + pre + [c], ex, pre + [c]) for p, ex, pre, cands in forks for c in cands]
    if not prefixes:
        return []
    rates = []
    for i in range(0, len(prefixes), 32):
        chunk = prefixes[i:i + 32]
        outs = sample_responses(model, tok, [c[0] for c in chunk], m, seed + i, max_new_tokens)
        texts = [tok.decode(c[2] + outs[j * m + s], skip_special_tokens=True) for j, c in enumerate(chunk)
                 for s in range(m)]
        rewards = scorer.score(texts, [c[1] for c in chunk for _ in range(m)])
        rates += [sum(rewards[j * m:(j + 1) * m]) / m for j in range(len(chunk))]
    k = len(forks[0][3])
    return [rates[i * k:(i + 1) * k] for i in range(len(forks))]


def measure(model_dir: str, data: str, settings: RoomSettings, task_config: Optional[dict] = None,
            log=print) -> dict:
    """The room record (see the module docstring): every number of the table plus per-response details."""
    import torch

    from ..data import render_prompt
    from ..models.tiny import sample_responses, task_examples
    from ..rewards import RewardScorer

    s = settings.check()
    model, tok, task, cfg, style = load(model_dir, data, task_config)
    try:
        examples = task_examples(task, cfg, "validation", s.n_prompts, s.data_seed, style)
    except Exception as e:  # reasoning-gym rejects the task name or a config key
        raise RoomError(f"{data} with config {json.dumps(cfg)}: {type(e).__name__}: {e}".splitlines()[0]) from None
    torch.manual_seed(s.seed)
    prompts = [tok.encode(render_prompt(ex, tok)) for ex in examples]
    responses = sample_responses(model, tok, prompts, s.samples, s.seed, s.max_new_tokens)
    rep_prompts = [p for p in prompts for _ in range(s.samples)]
    rep_examples = [ex for ex in examples for _ in range(s.samples)]
    rows = token_table(model, tok, rep_prompts, responses, s.top_k, s.tau)
    decide, exact = DECISIONS.get(task), COMPLETABLE.get(task)
    gated, strings = [], collections.Counter()
    for b, row in enumerate(rows):
        for t in torch.nonzero(row["gate"]).flatten().tolist():
            text = tok.decode([row["ids"][t]])
            strings[text] += 1
            before = tok.decode(row["ids"][:t], skip_special_tokens=True)
            gated.append({"response": b, "pos": t, "token": text, "entropy": float(row["entropy"][t]),
                          "p": [float(x) for x in row["topk_p"][t]], "ids": row["topk_ids"][t].tolist(),
                          "decision": None if decide is None else bool(decide(before, text)),
                          "valid_exact": None if exact is None else [
                              bool(exact(rep_examples[b], tok.decode(row["ids"][:t] + [c], skip_special_tokens=True)))
                              for c in row["topk_ids"][t].tolist()],
                          "visible_p": nucleus_view(row["logits"][t], s.eval_temperature, s.eval_top_p,
                                                    row["topk_ids"][t].tolist())})
    with RewardScorer() as scorer:
        texts = [tok.decode(r, skip_special_tokens=True) for r in responses]
        rewards = scorer.score(texts, rep_examples)
        picks = random.Random(s.seed).sample(range(len(gated)), min(s.forks, len(gated)))
        forks = [(rep_prompts[g["response"]], rep_examples[g["response"]], rows[g["response"]]["ids"][:g["pos"]],
                  g["ids"]) for g in (gated[i] for i in picks)]
        rates = probe_forks(model, tok, scorer, forks, s.m, s.seed + 1, s.max_new_tokens)
    for i, r in zip(picks, rates):
        gated[i]["valid_rate"] = r
    rec = summarize(s, task, cfg, style, model_dir, gated, strings, rewards, len(responses))
    rec["responses"] = [{"prompt_ids": p, "ids": r, "text": x, "reward": w}
                        for p, r, x, w in zip(rep_prompts, responses, texts, rewards)]
    return rec


def _mean(xs) -> Optional[float]:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def summarize(s: RoomSettings, task, cfg, style, model_dir, gated, strings, rewards, n_responses) -> dict:
    K = s.top_k
    probed = [g for g in gated if "valid_rate" in g]
    sampled_counts = [sum(r > 0 for r in g["valid_rate"]) for g in probed]
    exact = bool(gated) and gated[0]["valid_exact"] is not None
    valid_counts = [sum(g["valid_exact"]) for g in gated] if exact else sampled_counts
    per_response = len(gated) / n_responses
    fork_share = _mean(c >= 2 for c in valid_counts)
    F = per_response * (fork_share if fork_share is not None else 0.0)
    p_min = visibility_threshold(s.eval_temperature, s.eval_top_p)
    floor = s.alpha / K
    m = {
        "responses": n_responses, "gated_tokens": len(gated), "gated_per_response": per_response,
        "decision_share": _mean(g["decision"] for g in gated) if gated and gated[0]["decision"] is not None else None,
        "mean_gated_entropy": _mean(g["entropy"] for g in gated),
        "mean_p": [_mean(g["p"][k] for g in gated) for k in range(K)],
        "mean_p2_plus_p3": _mean(sum(g["p"][1:3]) for g in gated),
        "forks_probed": len(probed), "validity": "exact" if exact else "sampled",
        "mean_valid_candidates": _mean(valid_counts), "mean_valid_candidates_sampled": _mean(sampled_counts),
        "valid_share_by_rank": [_mean(g["valid_exact"][k] for g in gated) for k in range(K)] if exact else None,
        "mean_invalid_topk_mass": _mean(sum(p for p, v in zip(g["p"], g["valid_exact"]) if not v) for g in gated)
        if exact else None,
        "valid_rate_by_rank": [_mean(g["valid_rate"][k] for g in probed) for k in range(K)],
        "share_forks_2plus_valid": fork_share, "gated_forks_per_response": F,
        "predicted_deviation": predicted_deviation(s.alpha, K, F),
        "floor_alpha_over_k": floor, "visibility_threshold": p_min,
        "visible_share_by_rank": [_mean(g["visible_p"][k] > 0 for g in gated) for k in range(K)],
        "mean_visible_p_by_rank": [_mean(g["visible_p"][k] for g in gated) for k in range(K)],
        "pass1_t1": _mean(rewards),
    }
    gate_checks = {name: (None if m[name] is None else m[name] >= thr) for name, thr in ROOM_GATE}
    return {"model": model_dir, "task": task, "task_config": cfg, "prompt_style": style, "settings": asdict(s),
            "metrics": m, "gate": gate_checks, "gate_thresholds": dict(ROOM_GATE),
            "verdict": verdict(s, m, gate_checks),
            "gated_token_strings": strings.most_common(20), "gated": gated}


def verdict(s: RoomSettings, m: dict, gate: dict) -> str:
    """One line: room or not, and why."""
    fails = [f"{k} {m[k]:.3g} < {dict(ROOM_GATE)[k]}" for k, ok in gate.items() if ok is False]
    reasons = list(fails)
    if m["predicted_deviation"] < 0.05:
        reasons.append(f"predicted deviation {m['predicted_deviation']:.3f} (F = {m['gated_forks_per_response']:.2f} "
                       f"gated forks/response) is tiny at α = {s.alpha}")
    if m["floor_alpha_over_k"] < m["visibility_threshold"]:
        reasons.append(f"the floor α/K = {m['floor_alpha_over_k']:.4f} is below the T = {s.eval_temperature} / "
                       f"top-p {s.eval_top_p} visibility threshold {m['visibility_threshold']:.3f}")
    head = "no room" if fails else ("room, but little for SimKO to do" if reasons else "room")
    return (f"{head}: SimKO (α = {s.alpha}, K = {s.top_k}, τ = {s.tau}) " + ("— " + "; ".join(reasons)
            if reasons else f"has {m['gated_forks_per_response']:.2f} valid gated forks per response to keep open"))


# ------------------------------------------------------------------------------------------ output
def room_markdown(rec: dict) -> str:
    m, s, K = rec["metrics"], rec["settings"], rec["settings"]["top_k"]
    f = lambda x: "–" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))  # noqa: E731
    thr = rec["gate_thresholds"]
    lines = [f"# Room report: {rec['model']} on reasoning_gym/{rec['task']}", "",
             f"α = {s['alpha']}, K = {K}, τ = {s['tau']}; {m['responses']} responses at T = 1 ({s['n_prompts']} "
             f"prompts × {s['samples']}, validation split seed {s['data_seed']}); {m['forks_probed']} forks × K × "
             f"m = {s['m']} completions; visibility at T = {s['eval_temperature']}, top-p {s['eval_top_p']}.", "",
             "| quantity | value | gate |", "|---|---|---|"]
    rows = [("gated tokens per response", m["gated_per_response"], None),
            ("share of gated tokens that are decisions", m["decision_share"], "decision_share"),
            ("mean entropy at gated tokens (nats)", m["mean_gated_entropy"], "mean_gated_entropy"),
            *[(f"mean p_{k + 1} at gated tokens", m["mean_p"][k], None) for k in range(K)],
            ("mean p_2 + p_3 at gated tokens", m["mean_p2_plus_p3"], "mean_p2_plus_p3"),
            (f"valid candidates among the top-K ({m['validity']})", m["mean_valid_candidates"],
             "mean_valid_candidates"),
            *([(f"rank-{k + 1} candidate valid (exact share)", m["valid_share_by_rank"][k], None) for k in range(K)]
              + [("top-K mass on invalid candidates", m["mean_invalid_topk_mass"], None)]
              if m["validity"] == "exact" else []),
            ("valid candidates, sampled (≥ 1 of m completions scores 1)", m["mean_valid_candidates_sampled"], None),
            *[(f"completion success after rank-{k + 1} candidate", m["valid_rate_by_rank"][k], None)
              for k in range(K)],
            (f"share of gated forks with ≥ 2 valid candidates ({m['validity']})", m["share_forks_2plus_valid"], None),
            ("F: valid gated forks per response", m["gated_forks_per_response"], None),
            ("predicted deviation 1 − (1 − α(K−1)/K)^F", m["predicted_deviation"], None),
            ("SimKO floor α/K", m["floor_alpha_over_k"], None),
            ("visibility threshold (two-way fork)", m["visibility_threshold"], None),
            *[(f"rank-{k + 1} inside the nucleus (share of gated)", m["visible_share_by_rank"][k], None)
              for k in range(1, K)],
            *[(f"rank-{k + 1} mean probability at the eval protocol", m["mean_visible_p_by_rank"][k], None)
              for k in range(1, K)],
            ("pass@1 at T = 1 (these samples)", m["pass1_t1"], None)]
    for name, value, key in rows:
        gate = "" if key is None else f"≥ {thr[key]}: " + {True: "pass", False: "FAIL", None: "n/a"}[rec["gate"][key]]
        lines.append(f"| {name} | {f(value)} | {gate} |")
    top = ", ".join(f"{tok!r} × {n}" for tok, n in rec["gated_token_strings"][:10])
    return "\n".join(lines + ["", f"Gated token strings (most common): {top}", "", f"**Verdict:** {rec['verdict']}",
                              ""])


def room_figure(rec: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, K = rec["metrics"], rec["settings"]["top_k"]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].hist([g["entropy"] for g in rec["gated"]], bins=20, color="tab:blue")
    ax[0].axvline(0.7, color="k", ls="--", lw=1, label="gate 0.7")
    ax[0].set(title="entropy at gated tokens", xlabel="H (nats)", ylabel="gated tokens")
    ax[0].legend()
    ranks = [f"p_{k + 1}" for k in range(K)]
    ax[1].bar(ranks, m["mean_p"], color="tab:orange", label="mean p_k (T = 1)")
    ax[1].bar(ranks, [x or 0 for x in m["valid_rate_by_rank"]], width=0.4, color="tab:green",
              label="success after forcing c_k")
    if m.get("valid_share_by_rank"):
        ax[1].plot(ranks, m["valid_share_by_rank"], "kD", label="c_k valid (exact share)")
    ax[1].axhline(m["floor_alpha_over_k"], color="tab:red", lw=1, label="floor α/K")
    ax[1].axhline(m["visibility_threshold"], color="k", ls=":", lw=1, label="visibility threshold")
    ax[1].set(title="top-K at gated tokens", ylim=(0, 1))
    ax[1].legend(fontsize=7)
    top = rec["gated_token_strings"][:10]
    ax[2].barh([repr(t) for t, _ in top][::-1], [n for _, n in top][::-1], color="tab:purple")
    ax[2].set(title="where the gate lands", xlabel="count")
    fig.suptitle("\n".join(textwrap.wrap(rec["verdict"], 160)), fontsize=8)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_report(rec: dict, out_dir: str) -> list[str]:
    """room.json, room.md (atomic) and room.png in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in ("room.json", "room.md", "room.png")]
    write_json_atomic(paths[0], rec)
    write_text_atomic(paths[1], room_markdown(rec))
    room_figure(rec, paths[2])
    return paths


__all__ = ["ROOM_GATE", "RoomError", "RoomSettings", "measure", "nucleus_view", "predicted_deviation",
           "room_markdown", "visibility_threshold", "write_report"]
