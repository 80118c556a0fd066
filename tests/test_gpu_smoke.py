"""tools/gpu_smoke.sh: the GPU run's model is what the issue asks for (checked on the meta device, no weights),
and the reduced CPU mode of the same script passes all its checks (slow: ≈ 2 min on 2 cores)."""
import os
import subprocess
import sys

import pytest
import torch

from megatron_simko.smoke import build, stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_mode_model_has_qwen25_vocabulary_and_a_few_hundred_million_parameters():
    from transformers import Qwen2ForCausalLM

    config = build.model_config("gpu")
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    assert config.vocab_size == 151936 and model.get_input_embeddings().weight.shape[0] == 151936
    assert 2e8 <= n <= 5e8, n
    assert config.hidden_size // config.num_attention_heads == config.head_dim == 64
    assert build.MODES["gpu"]["dtype"] == "bf16"


@pytest.mark.slow
def test_cpu_mode_passes_every_check(tmp_path):
    proc = subprocess.run(["bash", "tools/gpu_smoke.sh", "--mode", "cpu", "--out-dir", str(tmp_path / "smoke")],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "== gpu_smoke (cpu): passed" in out and "[FAIL]" not in out
    for needle in ("rollout s", "tokens/s", "peak GiB", "|Δlogp| mean", "resumes from step 2",
                   "offline export == live export", "== pre-flight: torch", "loss backend", "[train_1]",
                   "prompts of different lengths", "summary.json"):
        assert needle in out, needle
    print(out[out.index("== per step"):])


def test_a_hung_stage_is_killed_at_its_limit_and_its_output_streamed(tmp_path, capsys):
    """Per-stage limits: the stage's whole process group is killed (exit 124), what it printed before is both
    streamed to stdout as it came and kept in its log; an in-process stage raises StageTimeout."""
    import time

    log = tmp_path / "hang.log"
    code = "import subprocess, sys, time; print('started', flush=True); " \
           "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    t0 = time.perf_counter()
    rc, seconds, out = stages.run([sys.executable, "-c", code], str(log), timeout=3)
    assert rc == 124 and seconds < 20 and time.perf_counter() - t0 < 20
    assert "started" in log.read_text() and "killed after its 3 s stage limit" in out
    assert "[hang] started" in capsys.readouterr().out
    with pytest.raises(stages.StageTimeout):
        stages.in_process(1, time.sleep, 5)


def test_summary_is_written_under_out(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("OUT", str(tmp_path / "device_out"))
    paths = stages.write_summary(str(tmp_path / "smoke"), {"passed": True, "checks": []})
    assert paths == [str(tmp_path / "smoke" / "summary.json"), str(tmp_path / "device_out" / "gpu_smoke_summary.json")]
    assert all(json.load(open(p))["passed"] for p in paths)


def test_preflight_reports_versions_and_prompts_vary_in_length():
    versions, missing = stages.preflight()
    assert not missing and versions["torch"] and versions["megatron.core"] and versions["math_verify"]
    assert len({len(r["prompt"]) for r in build.sum_examples(16, 0)}) > 1
