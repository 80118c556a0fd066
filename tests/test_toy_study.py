"""The pass@K study driver end to end at smoke size (examples/configs/toy_study.yaml, variant smoke: 2 RL steps,
n = 8): every artifact is produced and well-formed, a re-run resumes without redoing anything, and a training
run repeated with the same seed and config logs the same metrics (CPU, fp32)."""
import csv
import json
import os
import subprocess

import pytest

from test_train_e2e import NONDETERMINISTIC, PY, ROOT
from test_train_e2e import _env as env


def study(out):
    return subprocess.run([PY, "-m", "megatron_simko.eval.study", "--variant", "smoke", "--out-dir", str(out)],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=1500)


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(NONDETERMINISTIC)} for line in f]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "smoke"
    proc = study(out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc.stdout


@pytest.mark.slow
def test_every_artifact_is_produced_and_well_formed(smoke):
    out, stdout = smoke
    runs = ["grpo-s1", "grpo-s2", "simko-s1"]
    assert json.load(open(out / "model" / "tiny_model.json"))["prompt_style"] == "compact"
    heldout = [json.loads(line) for line in open(out / "heldout.jsonl")]
    train = [json.loads(line) for line in open(out / "data" / "train.jsonl")]
    assert len(heldout) == 4 and len(train) == 64 and len(open(out / "data" / "validation.jsonl").readlines()) == 4
    assert all(r["data_source"] == "reasoning_gym/countdown" and r["prompt"].startswith("Make ") for r in heldout)
    assert not {r["prompt"] for r in heldout} & {r["prompt"] for r in train}
    from megatron_simko.models.tiny import task_examples

    made = json.load(open(out / "model" / "tiny_model.json"))
    sft = task_examples("countdown", made["reasoning_gym_config"], "train", made["sft"]["train_problems"], made["seed"],
                        made["prompt_style"])
    assert made["sft"]["seen_problems"] and not {sft[i].prompt for i in made["sft"]["seen_problems"]} & {
        r["prompt"] for r in heldout}  # nor any problem the SFT trained on
    for name in runs:
        run = out / "runs" / name
        assert (run / "hf_final" / "config.json").exists() and (run / "train.log").exists()
        steps = metrics(run)
        assert [m["step"] for m in steps] == [1, 2]
        assert all(k in steps[-1] for k in ("reward/mean", "train/pass@1", "lambda/1", "lambda/3", "val/pass@1"))
        hist = [json.loads(line) for line in open(run / "histograms.jsonl")]
        assert [h["step"] for h in hist] == [1, 2] and all(sum(h["counts"]) > 0 for h in hist)
        cfg = (run / "config.yaml").read_text()
        assert f"mode: {name.split('-')[0]}" in cfg and f"seed: {name[-1]}" in cfg
    with open(out / "passk" / "passk.csv") as f:
        rows = list(csv.DictReader(f))
    models = ["base", *runs]
    assert {(r["model"], r["benchmark"], r["k"]) for r in rows} == {
        (m, b, str(k)) for m in models for b in ("heldout", "average") for k in (1, 2, 4, 8)}
    assert all(0.0 <= float(r["pass_at_k"]) <= 1.0 and r["n"] == "8" and r["num_problems"] == "4" for r in rows)
    for m in models:
        assert len(os.listdir(out / "passk" / "samples" / m / "heldout")) == 2  # n = 8 in rounds of 4
    for fig in ("figures/passk.png", "figures/lambda.png", "figures/entropy.png", "figures/training.png",
                "figures/gated.png", "figures_t1/passk.png"):
        with open(out / fig, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(out / "passk_t1" / "passk.csv") as f:  # the secondary evaluation: same models, temperature 1
        assert {(r["model"], r["k"]) for r in csv.DictReader(f) if r["benchmark"] == "heldout"} == {
            (m, str(k)) for m in models for k in (1, 2, 4, 8)}
    assert json.load(open(out / "passk_t1" / "eval_config.json"))["sampling"]["temperature"] == 1.0
    table = (out / "table.md").read_text()
    assert table.index("## Primary evaluation") < table.index("## Secondary (t1) evaluation")
    assert "| base | 1 |" in table and "| grpo | 2 |" in table and "| simko | 1 |" in table and "pass@8" in table
    assert all(f"| {m} | " in table for m in ("grpo-s1", "grpo-s2", "simko-s1"))  # every seed listed too
    record = json.load(open(out / "study.json"))
    assert set(record["seconds"]) >= {"model", "data", "train", "eval", "report"} and record["earlier"] == []
    assert len([c for c in record["commands"] if "megatron_simko.train" in c]) == 3
    assert "| grpo | 2 |" in stdout


@pytest.mark.slow
def test_rerun_resumes_without_redoing_anything(smoke):
    out, _ = smoke
    stamp = {p: os.stat(p).st_mtime_ns for p in [out / "model" / "model.safetensors", out / "heldout.jsonl",
                                                  *(out / "runs").glob("*/hf_final/model.safetensors"),
                                                  *(out / "passk" / "samples").glob("*/*/*.jsonl"),
                                                  *(out / "passk_t1" / "samples").glob("*/*/*.jsonl")]}
    proc = study(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished, kept") == 3 and "exists, kept" in proc.stdout
    assert all("0 to draw" in (out / "logs" / log).read_text() for log in ("eval.log", "eval_t1.log"))
    assert {p: os.stat(p).st_mtime_ns for p in stamp} == stamp
    record = json.load(open(out / "study.json"))
    assert len(record["earlier"]) == 1 and "train" in record["earlier"][0]["seconds"]  # both invocations kept


@pytest.mark.slow
def test_same_seed_and_config_give_the_same_metrics(smoke, tmp_path):
    """The study's grpo-s1 training command, rerun into another folder: identical metrics (timings aside)."""
    out, _ = smoke
    from megatron_simko.eval.study import free_port, load_study_config, train_overrides

    cfg = load_study_config(os.path.join(ROOT, "examples", "configs", "toy_study.yaml"), "smoke", str(out))
    overrides = [o if not o.startswith("train.log_dir=") else f"train.log_dir={tmp_path / 'again'}"
                 for o in train_overrides(cfg, "grpo", 1, str(out))]
    proc = subprocess.run([os.path.join(os.path.dirname(PY), "torchrun"), "--nproc-per-node", "1", "--master-port",
                           str(free_port()), "-m", "megatron_simko.train", "--config", cfg["train_config"], *overrides],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert metrics(tmp_path / "again") == metrics(out / "runs" / "grpo-s1")


def test_ablation_modes_are_reported_in_their_own_table():
    from megatron_simko.eval.results import group_table
    from megatron_simko.eval.study import load_study_config, study_table

    cfg = load_study_config(os.path.join(ROOT, "examples", "configs", "toy_study.yaml"), "ablation")
    ablations = {m for m, spec in cfg["modes"].items() if spec.get("ablation")}
    assert ablations == {"simko_a03"} and {"grpo", "simko"} <= set(cfg["modes"])
    rows = [{"model": m, "benchmark": "heldout", "k": k, "pass_at_k": p}
            for m, p in (("base", 0.3), ("grpo-s1", 0.5), ("grpo-s2", 0.7), ("simko_a03-s1", 0.9)) for k in (1, 8)]
    text = study_table(rows, group_table(rows, "heldout", [1, 8]), [1, 8], ablations, size=4, n=8)
    main, rest = text.split("Ablation (labelled; not part of the main comparison):")
    assert "| grpo | 2 | 0.600 ± 0.141 |" in main and "simko_a03" not in main
    ablation, every = rest.split("Every model:")
    assert "| simko_a03 | 1 | 0.900 ± 0.000 |" in ablation and "grpo" not in ablation
    assert "| simko_a03-s1 | 0.900 |" in every and "| grpo-s2 | 0.700 |" in every


# ------------------------------------------------------------------ the second study (graph_color, issue 19)
GRAPH = os.path.join(ROOT, "examples", "configs", "graph_study.yaml")


def test_graph_study_config_declares_the_protocol_arms():
    from megatron_simko.eval.study import Study, load_study_config, run_names, train_overrides

    cfg = load_study_config(GRAPH)
    assert {m: s["overrides"] for m, s in cfg["modes"].items()} == {
        "grpo": ["loss.mode=grpo"], "simko": ["loss.mode=simko"], "simko_a03": ["loss.mode=simko", "loss.alpha=0.3"],
        "entropy_adv": ["loss.mode=entropy_adv"], "kl_cov": ["loss.mode=kl_cov"]}
    assert all(s["seeds"] == [1, 2, 3] for s in cfg["modes"].values())
    e = cfg["eval"]
    assert (e["protocol"], e["n"], e["exclude_data_seeds"]) == ("train", 256, [1000])
    assert e["secondary"]["protocol"] == "paper" and e["paired_reference"] == "grpo"
    study = Study(cfg, GRAPH, log=lambda m: None)
    for name, mode, seed in run_names(cfg):  # every run's training config resolves
        t = study._train_config(train_overrides(cfg, mode, seed, study.out))
        assert t.loss.mode == mode.replace("simko_a03", "simko") and t.train.seed == seed
    dev = load_study_config(GRAPH, "lr_dev")
    assert dev["eval"]["data_seed"] == 1000 and set(dev["modes"]) == {"grpo_lr5e4", "grpo_lr7e4"}
    assert dev["eval"]["paired_reference"] is None  # no GRPO seed to pair with in the lr grid


def test_graph_color_sft_targets_are_uniform_over_valid_colourings():
    """Every SFT target is a valid colouring (reasoning-gym's scorer), and over many problems the first vertex's
    colour is spread over all three colours (not the greedy first colouring, which always starts with colour 1)."""
    import collections

    from megatron_simko.models.tiny import DEFAULT_TASK_CONFIGS, response_text, task_examples, uniform_coloring
    from megatron_simko.rewards import score_response

    exs = task_examples("graph_color", DEFAULT_TASK_CONFIGS["graph_color"], "train", 300, 0, "compact")
    assert exs[0].prompt.startswith("Color 0-5 with 1-3. Edges: ")
    assert all(score_response(response_text(ex, "graph_color"), ex) == 1.0 for ex in exs[:100])
    assert uniform_coloring(exs[0]) == uniform_coloring(exs[0])  # fixed per problem
    first = collections.Counter(uniform_coloring(ex)["0"] for ex in exs)
    assert set(first) == {1, 2, 3} and min(first.values()) > 70  # ≈ 100 each


@pytest.mark.slow
def test_graph_study_smoke(tmp_path):
    out = tmp_path / "graph"
    proc = subprocess.run([PY, "-m", "megatron_simko.eval.study", "--config", GRAPH, "--variant", "smoke",
                           "--out-dir", str(out)], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    heldout = [json.loads(line) for line in open(out / "heldout.jsonl")]
    assert len(heldout) == 4 and all(r["data_source"] == "reasoning_gym/graph_color" for r in heldout)
    for name in ("grpo-s1", "simko_a03-s1"):
        assert (out / "runs" / name / "hf_final" / "config.json").exists()
    for suffix in ("", "_paper"):
        with open(out / f"passk{suffix}" / "passk.csv") as f:
            assert {r["model"] for r in csv.DictReader(f)} == {"base", "grpo-s1", "simko_a03-s1"}
    for name in ("base", "grpo-s1", "simko_a03-s1"):  # the room before and after RL
        rec = json.load(open(out / "room" / name / "room.json"))
        assert rec["task"] == "graph_color" and rec["verdict"] and (out / "room" / name / "room.png").exists()
    table = (out / "table.md").read_text()
    assert "## Room" in table and "| simko_a03-s1 |" in table.split("## Room")[1]
    for section in table.split("## Room")[0].split("## ")[1:]:  # both evaluations: the paired differences vs GRPO
        assert "Paired differences, arm − grpo" in section and "| simko_a03 | 1 |" in section
        assert "| simko_a03 | mean |" in section
