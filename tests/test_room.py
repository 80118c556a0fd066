"""The room report (megatron_simko/eval/room.py, tools/simko_room.py): its formulas, its gate positions and
top-K probabilities against an independent float64 forward of each response alone, and the CLI end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_simko.eval.room import (RoomSettings, measure, nucleus_view, predicted_deviation,
                                      visibility_threshold)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(n_prompts=3, samples=2, forks=3, m=2, max_new_tokens=16, data_seed=5, seed=3)


def test_formulas():
    # the numbers: 1.3% at F = 2 and ~50% at F = 100 for α = 0.01, K = 3; the T = 0.6 / top-p 0.95
    # detector threshold ≈ 0.15 at a binary fork
    assert predicted_deviation(0.01, 3, 2) == pytest.approx(1 - (1 - 0.02 / 3) ** 2, abs=1e-12)
    assert predicted_deviation(0.01, 3, 2) == pytest.approx(0.0133, abs=1e-4)
    assert predicted_deviation(0.01, 3, 100) == pytest.approx(0.487, abs=1e-3)
    p_min = visibility_threshold(0.6, 0.95)
    assert p_min == pytest.approx(1 / (1 + 19 ** 0.6), abs=1e-12) and 0.14 < p_min < 0.15
    assert visibility_threshold(1.0, 1.0) == 0.0
    # nucleus_view agrees with the threshold at a two-way fork (a third token with negligible mass)
    for p2, inside in ((p_min * 1.02, True), (p_min * 0.98, False)):
        logits = torch.tensor([np.log(1 - p2), np.log(p2), -60.0])
        view = nucleus_view(logits, 0.6, 0.95, [0, 1])
        assert (view[1] > 0) == inside
        assert sum(view) == pytest.approx(1.0, abs=1e-9)


def independent_stats(model, prompt_ids, ids, top_k, tau):
    """Gate positions and top-K probabilities of one response from its own unpadded forward in float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + ids])).logits[0].double()
    z = logits[len(prompt_ids) - 1:len(prompt_ids) - 1 + len(ids)]  # row t predicts response token t
    p = torch.softmax(z, -1)
    h = -(p * torch.log(p.clamp_min(1e-300))).sum(-1).numpy()
    q = np.quantile(h, tau)  # numpy's default "linear" quantile, as torch.nanquantile
    return set(np.nonzero(h > q)[0].tolist()), torch.sort(p, -1, descending=True).values[:, :top_k].numpy(), h, q


def test_room_matches_an_independent_forward(tiny_model):
    from transformers import AutoModelForCausalLM

    s = RoomSettings(alpha=0.3, top_k=3, tau=0.5, **SMALL)
    rec = measure(tiny_model, "reasoning_gym/chain_sum", s)
    again = measure(tiny_model, "reasoning_gym/chain_sum", s)
    assert json.dumps(rec["metrics"]) == json.dumps(again["metrics"])  # deterministic for a seed
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype="float32").eval()
    assert len(rec["responses"]) == 6 and rec["gated"]
    checked = 0
    for b, r in enumerate(rec["responses"]):
        gate, top_p, h, q = independent_stats(model, r["prompt_ids"], r["ids"], 3, s.tau)
        mine = {g["pos"]: g for g in rec["gated"] if g["response"] == b}
        near = {t for t in range(len(h)) if abs(h[t] - q) < 1e-5}  # fp32 vs fp64 may flip an exact tie only
        assert set(mine) ^ gate <= near, (b, sorted(mine), sorted(gate))
        for t in set(mine) & gate:
            np.testing.assert_allclose(mine[t]["p"], top_p[t], rtol=0, atol=2e-5)
            assert mine[t]["entropy"] == pytest.approx(h[t], abs=2e-5)
            checked += 1
    assert checked >= 3
    m = rec["metrics"]
    assert m["gated_per_response"] == pytest.approx(len(rec["gated"]) / 6)
    assert m["mean_p"][0] == pytest.approx(np.mean([g["p"][0] for g in rec["gated"]]), abs=1e-12)
    probed = [g for g in rec["gated"] if "valid_rate" in g]
    assert len(probed) == m["forks_probed"] == min(3, len(rec["gated"]))
    assert all(len(g["valid_rate"]) == 3 and all(v in (0.0, 0.5, 1.0) for v in g["valid_rate"]) for g in probed)
    F = m["gated_per_response"] * m["share_forks_2plus_valid"]
    assert m["predicted_deviation"] == pytest.approx(predicted_deviation(0.3, 3, F), abs=1e-12)
    assert m["pass1_t1"] == pytest.approx(np.mean([r["reward"] for r in rec["responses"]]))
    assert m["decision_share"] is None  # chain_sum has no declared decision token
    assert rec["verdict"].startswith(("room", "no room"))


def run_cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "tools/simko_room.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)


def test_cli_end_to_end(tiny_model, tmp_path):
    out = tmp_path / "room"
    small = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    proc = run_cli("--model", tiny_model, "--data", "reasoning_gym/chain_sum", "--protocol", "paper",
                   "--out-dir", str(out), *small)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((out / "room.json").read_text())
    text = (out / "room.md").read_text()
    assert rec["settings"]["eval_temperature"] == 0.6 and rec["settings"]["eval_top_p"] == 0.95
    assert f"**Verdict:** {rec['verdict']}" in text and "| mean p_2 + p_3 at gated tokens |" in text
    assert (out / "room.png").stat().st_size > 1000
    assert not [p for p in os.listdir(out) if ".tmp" in p]


@pytest.mark.parametrize("args, needle", [
    (["--model", "/nonexistent", "--data", "reasoning_gym/chain_sum"], "not a Hugging Face model folder"),
    (["--data", "countdown"], "--data must be reasoning_gym/<task>"),
    (["--data", "reasoning_gym/chain_sum", "--task-config", "{bad"], "--task-config is not valid JSON"),
    (["--data", "reasoning_gym/chain_sum", "--tau", "1.5"], "tau"),
])
def test_cli_bad_input(tiny_model, tmp_path, args, needle):
    if "--model" not in args:
        args = ["--model", tiny_model, *args]
    proc = run_cli(*args, "--out-dir", str(tmp_path / "r"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert not (tmp_path / "r").exists()


def test_exact_validity_oracles():
    from megatron_simko.eval.room import COMPLETABLE
    from megatron_simko.models.tiny import task_examples

    cd = task_examples("countdown", {"min_numbers": 3, "max_numbers": 3, "min_value": 1, "max_value": 9,
                                     "min_target": 1, "max_target": 25, "operators": ["+", "-"]}, "train", 1, 0)[0]
    meta = cd.metadata["rg_entry"]["metadata"]
    a, b, c = meta["numbers"]
    ok = COMPLETABLE["countdown"]
    brute = lambda pre, sgn: any(pre + sgn[0] * b + s * c == meta["target"] for s in (1, -1))  # noqa: E731
    assert ok(cd, "\\boxed{") == any(sa * a + sb * b + sc * c == meta["target"] or sa * a + sb * c + sc * b ==
                                     meta["target"] for sa in (1, -1) for sb in (1, -1) for sc in (1, -1))
    for sign in (1, -1):
        assert ok(cd, f"\\boxed{{{a} {'+' if sign > 0 else '-'}") == (brute(a, (sign,)) or any(
            a + sign * c + s * b == meta["target"] for s in (1, -1)))
    assert not ok(cd, "\\boxed{x") and not ok(cd, f"\\boxed{{{a} + + ")
    assert ok(cd, f"\\boxed{{{a} + {b} + {c}") == (a + b + c == meta["target"])
    g = task_examples("graph_color", {"num_colors": 3, "min_num_vertices": 6, "max_num_vertices": 6,
                                      "edge_probability": 0.3}, "train", 1, 0)[0]
    p = g.metadata["rg_entry"]["metadata"]["puzzle"]
    ok = COMPLETABLE["graph_color"]
    u, v = p["edges"][0]
    assert ok(g, '\\boxed{{"0":') and not ok(g, '\\boxed{{"0":7') and not ok(g, '\\boxed{{"0":,"')
    same = "".join(f'"{w}":1,' for w in sorted((u, v)))  # both ends of an edge with colour 1: never valid
    assert not ok(g, "\\boxed{{" + same.rstrip(","))
