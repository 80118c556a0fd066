"""Logits parity of converted checkpoints with transformers (fp32, max |diff| <= 1e-5) under torchrun + gloo.

Three launches in all (each costs seconds of process start and megatron import):
  * the CLI verifier on a tied Qwen2 at TP2×PP2: bitwise round trips at TP1 and TP2×PP2, logits at TP1 and at
    TP2×PP2, the latter also from the TP1 checkpoint (re-split on load) and straight from the HF directory;
  * one TP2×PP2 launch checking an untied Qwen2 (rope_theta 1e6) and a Llama with llama3 RoPE scaling, each
    loaded from checkpoints converted at other layouts and from HF directly.
"""
import re
import subprocess
import sys

import pytest

from megatron_simko.checkpoint import convert
from megatron_simko.checkpoint.verify import LOGITS_TOLERANCE, run_logits_worker, save_reference
from test_convert_checkpoint import CLI, make_hf_model

pytestmark = pytest.mark.slow


def test_cli_verify_qwen2_tied_tp2_pp2(tmp_path):
    hf = make_hf_model("qwen2_tied", str(tmp_path / "hf"))
    r = subprocess.run([sys.executable, CLI, "verify", "--hf-dir", hf, "--tp", "2", "--pp", "2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    print(r.stdout)
    assert "verify: PASS" in r.stdout and "MISMATCH" not in r.stdout
    lines = r.stdout.splitlines()
    row = re.compile(r"logits vs transformers \(fp32\)\s+(tp=\d pp=\d)")
    layouts = [m.group(1) for m in map(row.match, lines) if m]
    assert layouts == ["tp=1 pp=1"] + ["tp=2 pp=2"] * 3
    assert sum("bitwise identical" in ln for ln in lines) == 2


def test_load_at_other_layouts_untied_qwen2_and_llama3(tmp_path):
    checks, refs, expect = [], [], []
    for kind, layouts in [("qwen2_untied", [(1, 2), (2, 1)]), ("llama", [(1, 1), (2, 2)])]:
        hf = make_hf_model(kind, str(tmp_path / kind))
        ref = str(tmp_path / f"{kind}_ref.pt")
        save_reference(hf, ref)
        for t, p in layouts:
            meg = str(tmp_path / f"{kind}_tp{t}_pp{p}")
            convert.hf_to_megatron(hf, meg, t, p, progress=False)
            checks.append(f"native:{meg}")
            refs.append(ref)
            expect.append((kind, t, p))
        checks.append(f"hf:{hf}")
        refs.append(ref)
        expect.append((kind, "hf", "hf"))
    results = run_logits_worker(2, 2, checks, refs, str(tmp_path / "result.json"))
    assert [(r["source_tp"], r["source_pp"]) for r in results] == [(t, p) for _, t, p in expect]
    for r, e in zip(results, expect):
        assert r["max_abs_diff"] <= LOGITS_TOLERANCE, (e, r)  # NaN (a parameter left unloaded) fails too
