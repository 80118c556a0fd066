"""benchmarks/rl_step_bench.py: its pure parts (medians from a metrics.jsonl, the FLOP count, the table, the
command line) and, slow, a reduced run of our side (TP 1, transformers backend, 3 steps). TRL is never
installed by the tests."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import rl_step_bench as bench  # noqa: E402


def write_metrics(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def record(step, wall, tokens, **phases):
    step_time = sum(phases.values())
    return {"step": step, "time": wall, "time/step": step_time, "throughput/tokens_per_s": tokens / step_time,
            "reward/mean": 0.5, **{f"time/{k}": v for k, v in phases.items()}}


def test_step_medians_reads_steps_first_to_last(tmp_path):
    path = tmp_path / "metrics.jsonl"
    walls = [100.0, 101.5, 103.5, 104.5, 107.5]  # intervals ending at steps 2..5: 1.5, 2.0, 1.0, 3.0
    tokens = [9000, 8000, 6000, 7000, 5000]
    trains = [9.0, 0.5, 0.6, 0.4, 0.8]  # step 1 (slow warm-up) and 2 lie outside the window
    write_metrics(path, [record(s + 1, walls[s], tokens[s], rollout=0.1 * (s + 1), reward=0.01,
                                old_logprob=0.2, train=trains[s], sync=0.03) for s in range(5)])
    m = bench.step_medians(str(path), 3, 5, params=1_000_000)
    assert m["s_per_step"] == pytest.approx(2.0)  # median of 2.0, 1.0, 3.0
    assert m["train"] == pytest.approx(0.6) and m["rollout"] == pytest.approx(0.4)
    assert m["old_logprob"] == pytest.approx(0.2) and m["sync"] == pytest.approx(0.03)
    assert m["tokens_per_step"] == pytest.approx(6000)
    assert m["tokens_per_s"] == pytest.approx(3000)  # per step 6000/2, 7000/1, 5000/3
    # 6·P·T / time/train per step: 6e6·6000/0.6, 6e6·7000/0.4, 6e6·5000/0.8 -> 60, 105, 37.5 GFLOP/s
    assert m["train_gflops"] == pytest.approx(60.0) and m["skipped_updates"] == 0
    assert m["logprob_gflops"] == pytest.approx(2e6 * 6000 / 0.2 / 1e9)  # 2·P·T / time/old_logprob
    write_metrics(path, [record(s, 10.0 * s, 100, rollout=1.0, train=1.0) for s in range(1, 5)])  # TRL: no sync
    assert bench.step_medians(str(path), 3, 4, 1)["sync"] is None
    write_metrics(path, [record(s, 10.0 * s, 100, rollout=1.0, experience=0.25) for s in range(1, 5)])
    assert bench.step_medians(str(path), 3, 4, 1)["reward"] == 0.25  # ours: scoring in rollout, then experience


def test_skipped_updates_are_not_counted_as_training(tmp_path):
    """Ours skips a mini-batch whose groups carry no reward signal: half the tokens trained, or none."""
    path = tmp_path / "metrics.jsonl"
    recs = [record(s, float(s), 6000, rollout=1.0, old_logprob=0.2, train=0.6) for s in range(1, 5)]
    recs[2]["train/skipped_updates"], recs[3]["train/skipped_updates"] = 1.0, 2.0  # steps 3 and 4
    write_metrics(path, recs)
    m = bench.step_medians(str(path), 3, 4, params=1_000_000)
    assert m["train_gflops"] == pytest.approx(0.5 * 6e6 * 6000 / 0.6 / 1e9)  # step 4 trained nothing: left out
    assert m["skipped_updates"] == 3.0
    recs[2]["train/skipped_updates"] = 2.0
    write_metrics(path, recs)
    assert bench.step_medians(str(path), 3, 4, 1_000_000)["train_gflops"] is None


def test_step_medians_names_missing_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, [record(s, float(s), 100, train=1.0) for s in (1, 2, 3)])
    with pytest.raises(ValueError, match=r"no record for step\(s\) \[4, 5\]"):
        bench.step_medians(str(path), 3, 5, 1)
    with pytest.raises(ValueError, match="need 2 <= first"):
        bench.step_medians(str(path), 1, 3, 1)


def test_matmul_params_counts_every_linear_of_a_qwen2():
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=64, vocab_size=376, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(Qwen2Config(**cfg))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert bench.matmul_params(cfg) == linear == 2 * (4 * 256 * 64 * 2 + 2 * 256 * 64 * 2 + 3 * 256 * 512) + 256 * 376


def test_model_flops_formula():
    assert bench.model_flops(1_000_000, 8000, backward=True) == 6 * 1_000_000 * 8000
    assert bench.model_flops(1_000_000, 8000, backward=False) == 2 * 1_000_000 * 8000


def test_table_rows_and_ratios():
    base = dict(rollout=0.3, reward=0.02, old_logprob=0.2, train=0.6, sync=None, tokens_per_s=6400.0,
                train_gflops=80.0, logprob_gflops=40.0)
    trl = bench.with_ratio({"label": "TRL", "s_per_step": 1.25, **base}, trl_s_per_step=1.25)
    ours = bench.with_ratio({"label": "ours", "s_per_step": 1.0, **dict(base, sync=0.01)}, 1.25)
    assert ours["ratio_to_trl"] == pytest.approx(0.8) and trl["ratio_to_trl"] == pytest.approx(1.0)
    failed = {"label": "ours, TP 2", "error": "exit 1: boom"}
    table = bench.format_table([trl, ours, failed], peak_gflops=160.0).splitlines()
    assert len({line.count("|") for line in table}) == 1  # every row has every column
    assert table[2] == "| TRL | 1.25 | 0.30 | 0.02 | 0.20 | 0.60 | – | 1.00 | 6400 | 80.0 (50 %) | 40.0 (25 %) |"
    assert table[3].startswith("| ours | 1.00 |") and "| 0.01 | 0.80 |" in table[3]
    assert table[4].startswith("| ours, TP 2 | failed: exit 1: boom |")
    alone = bench.with_ratio({"label": "ours", "s_per_step": 1.0, **dict(base, train_gflops=None)}, None)
    assert alone["ratio_to_trl"] is None  # no TRL in this run
    assert alone and bench.format_table([alone], None).endswith("| – | 6400 | – | 40.0 |")


def test_passes_combine_into_medians_and_paired_ratios():
    def row(label, s, train, sync=0.02, skipped=0.0):
        return {"label": label, "s_per_step": s, "train": train, "sync": sync, "skipped_updates": skipped}

    passes = [bench.results({"trl": row("TRL", 1.4, 0.9, sync=None), "ours": row("ours", 1.0, 0.6, skipped=1.0)}),
              bench.results({"trl": row("TRL", 1.0, 0.7, sync=None), "ours": row("ours", 0.9, 0.5)}),
              bench.results({"trl": row("TRL", 1.2, 0.8, sync=None), "ours": row("ours", 1.2, 0.7)})]
    combined = bench.combine_passes(passes)
    ours, trl = combined["ours"], combined["trl"]
    assert (ours["s_per_step"], ours["train"], ours["sync"]) == (1.0, 0.6, 0.02) and trl["sync"] is None
    # the paired ratios are 1.0/1.4, 0.9/1.0, 1.2/1.2: their median (0.9), not 1.0 / 1.2 of the medians
    assert ours["ratio_to_trl"] == pytest.approx(0.9) and trl["ratio_to_trl"] == 1.0
    assert ours["skipped_updates"] == 1.0
    failed = bench.combine_passes(passes[:1] + [{"trl": passes[1]["trl"], "ours": {"label": "ours", "error": "x"}}])
    assert failed["ours"] == {"label": "ours", "error": "x"} and failed["trl"]["s_per_step"] == 1.2
    assert bench.rotated(["a", "b", "c"], 0) == ["a", "b", "c"] and bench.rotated(["a", "b", "c"], 4) == ["b", "c", "a"]


def test_workload_overrides_are_a_valid_config(tmp_path):
    from megatron_simko.config import load_config

    for name, system in bench.SYSTEMS.items():
        if name == "trl":
            continue
        cfg = load_config(bench.QUICKSTART_CONFIG, bench.our_overrides(system, "m", str(tmp_path), 12)).validate()
        assert (cfg.parallel.tensor_parallel, cfg.rollout.backend) == (system.processes, system.backend)
        assert cfg.data.prompts_per_step // cfg.train.mini_batch_size == bench.UPDATES_PER_STEP
        assert (cfg.rollout.n_samples, cfg.rollout.max_response_length, cfg.loss.mode) == (8, 32, "grpo")
        assert cfg.data.validation is None and cfg.train.validate_every == 0


@pytest.mark.parametrize("argv,needle", [
    (["--systems", "trl,deepspeed"], "--systems 'trl,deepspeed': give distinct names from trl, tp1_transformers"),
    (["--systems", "tp1_vllm", "--trl-python", "/x/python"],
     "error: --trl-python applies to the trl system only (add trl to --systems)"),
    (["--steps", "2"], "--steps 2: the medians start at step 3"),
    (["--threads", "3"], "--threads 3: must be >= 1 and divisible by every chosen system's process count"),
    (["--repeats", "0"], "--repeats 0: give at least 1"),
    (["--sys", "trl"], "unrecognized arguments: --sys"),
])
def test_command_line_refusals(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err
    assert bench.parse_args(["--systems", "tp1_vllm,trl", "--trl-python", "/x/python"]).systems == ["tp1_vllm", "trl"]


@pytest.mark.slow
def test_ours_reduced_run_reports_phases(tiny_model, tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "benchmarks/rl_step_bench.py", "--systems", "tp1_transformers", "--steps",
                           "3", "--repeats", "1", "--model-dir", tiny_model, "--work-dir", str(tmp_path / "work"), "--out",
                           str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    row = result["systems"]["tp1_transformers"]
    for key in ("s_per_step", "rollout", "reward", "old_logprob", "train", "sync", "tokens_per_s", "train_gflops",
                "logprob_gflops"):
        assert row[key] > 0, (key, row)
    assert row["ratio_to_trl"] is None  # TRL not in this run
    assert row["tokens_per_step"] > 16 * 8 * 20  # 128 sequences of a ~30-token prompt plus the response
    assert len(result["passes"]) == 1 and result["passes"][0]["tp1_transformers"] == row  # one pass: its own row
    assert result["peak_gflops_per_pass"][0] > 0 and result["matmul_params"] > 1_000_000
    assert "| ours, TP 1, transformers backend |" in proc.stdout
