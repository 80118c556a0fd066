"""examples/graph_study_readings.py applies the second study's committed thresholds to a study's files."""
import csv
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import graph_study_readings as gr  # noqa: E402

N, P = 256, 8
ARMS = {"grpo": 0, "simko": 1, "simko_a03": 2, "entropy_adv": 0, "kl_cov": 0}  # how many extra problems pass


def _write_study(root, base_solved: int, grpo_c: int, arms=tuple(ARMS)):
    """base solves `base_solved` problems with c = 2 of 256; GRPO solves fewer but each more often."""
    os.makedirs(root / "passk")
    with open(root / "passk" / "per_problem.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "benchmark", "problem", "n", "c"])
        for p in range(P):
            w.writerow(["base", "heldout", p, N, 2 if p < base_solved else 0])
        for arm in arms:
            extra = ARMS[arm]
            for s in (1, 2, 3):
                for p in range(P):
                    w.writerow([f"{arm}-s{s}", "heldout", p, N, grpo_c if p < 2 + extra else 0])
    for arm in arms:
        for s in (1, 2, 3):
            run = root / "runs" / f"{arm}-s{s}"
            os.makedirs(run)
            p23 = 0.3 if arm == "simko_a03" else 0.1
            with open(run / "metrics.jsonl", "w") as f:
                for step in (1, 2):
                    f.write(json.dumps({"step": step, "gated/all/p_1": 1 - p23, "gated/all/p_2": p23 / 2,
                                        "gated/all/p_3": p23 / 2}) + "\n")
        room = root / "room" / f"{arm}-s1"
        os.makedirs(room)
        json.dump({"metrics": {"mean_invalid_topk_mass": 0.1 if arm.startswith("simko") else 0.3}},
                  open(room / "room.json", "w"))


def test_readings_when_grpo_collapses(tmp_path):
    _write_study(tmp_path, base_solved=8, grpo_c=128)  # base pass@256 ~0.87, GRPO 2/8 problems: collapse
    text = gr.readings(str(tmp_path))
    assert "**Precondition**" in text and "→ **holds**" in text
    assert "H1** (" in text and "pairs +0.125, +0.125, +0.125" in text and "→ met" in text.split("**H2**")[0]
    h2 = text.split("**H2**")[1].split("**H3**")[0]
    assert "pairs +0.250, +0.250, +0.250" in h2 and "α = 0.3 0.300 vs GRPO 0.100 (ratio 3.00" in h2 and "→ met" in h2
    assert "H3** (better SimKO setting — simko_a03" in text and "→ met (pass@256 ≥; invalid mass less" in text
    assert "→ not falsified" in text


def test_readings_are_inconclusive_without_collapse(tmp_path):
    _write_study(tmp_path, base_solved=2, grpo_c=2)  # GRPO equals the base: nothing to resist
    text = gr.readings(str(tmp_path))
    assert "→ **fails** → the study is inconclusive for H1–H3" in text
    assert "not applicable (no collapse to resist)" in text
    assert gr.main(["--study", str(tmp_path / "missing")]) == 2


def test_readings_without_the_entropy_baselines_skip_h3(tmp_path):
    _write_study(tmp_path, base_solved=8, grpo_c=128, arms=("grpo", "simko", "simko_a03"))
    text = gr.readings(str(tmp_path))
    assert "**H3** not computed" in text and "→ met" in text.split("**H2**")[1] and "→ not falsified" in text
    assert "entropy_adv" not in text
