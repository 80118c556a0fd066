"""TP1 ≡ TP2 ≡ PP2 ≡ TP2×PP2 ≡ DP2 (≡ PP2 interleaved), on CPU with gloo and real torchrun launches.

Each case is a run of tools/check_parallel_equivalence.py's harness (megatron_simko/parallel/equivalence.py): a
single-device reference on rank 0, then the parallel layout, comparing per-token log-probs, entropy, top-K ids
and log-probs, the SimKO loss, every gradient (slice by slice), the gradient norm and the parameters after one
Adam step (fp32, 1e-6; see the harness for the error measure and the one argued exception, megatron's fp32
grad-norm accumulation at 1e-5). The cases of one world size share one torchrun launch
(tests/parallel_equivalence_worker.py: each case's reference and parallel phase exactly as the tool runs them),
so the module pays two process starts instead of sixteen; the tool's own command line is launched by
tests/test_loss_triton.py (``run_tool``).
"""
import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "check_parallel_equivalence.py")
WORKER = os.path.join(ROOT, "tests", "parallel_equivalence_worker.py")

REQUIRED_ROWS = {"token log-prob", "entropy", "top-K log-probs", "top-K ids, rank-1 flags (mismatches)",
                 "SimKO loss", "gradients", "grad norm (float64 recomputation)", "params after one Adam step"}


def run_tool(tmp_path, *argv):
    out = tmp_path / "result.json"
    r = subprocess.run([sys.executable, TOOL, *argv, "--json", str(out)], capture_output=True, text=True,
                       timeout=420, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    table = r.stdout[r.stdout.find("parallel equivalence"):]
    assert r.returncode == 0, f"exit {r.returncode}\n{table}\n{r.stderr[-3000:]}"
    result = json.loads(out.read_text())
    assert result["ok"] and not result["missing"], table
    return {row["quantity"]: row for row in result["rows"]}, table


COV = ["--loss", "kl_cov_ratio=0.2", "--loss", "clip_cov_ratio=0.2", "--loss", "clip_cov_lb=0.0"]  # select several
UNTIED = "UNTIED"  # replaced by --model-config <DEFAULT_MODEL untied> at launch
CASES = {  # test id: the tool's arguments
    "tp2": ["--tp", "2", "--pp", "1"],
    "pp2": ["--tp", "1", "--pp", "2"],
    "tp2xpp2": ["--tp", "2", "--pp", "2"],
    # DP2 with token-budget micro-batches: the two DP ranks pack their halves into 2 and 3 micro-batches, so
    # this also checks the DP agreement on the count and that the loss does not depend on the packing.
    "dp2-token-budget": ["--tp", "1", "--pp", "1", "--dp", "2", "--max-tokens", "24"],
    "pp2-interleaved": ["--tp", "1", "--pp", "2", "--vpp", "2"],
    "tp2xpp2-kl_cov": ["--tp", "2", "--pp", "2", "--loss", "mode=kl_cov", *COV],
    "tp2xpp2-clip_cov-entropy_bonus": ["--tp", "2", "--pp", "2", "--loss", "mode=clip_cov", "--loss",
                                       "entropy_coef=0.05", *COV],
    "tp2xpp2-entropy_adv": ["--tp", "2", "--pp", "2", "--loss", "mode=entropy_adv"],
    "tp2xpp2-simko-entropy_bonus": ["--tp", "2", "--pp", "2", "--loss", "entropy_coef=0.1"],
    # DP2 + token-budget packing vs one device with equal splits: the covariance selection is over the whole
    # mini-batch, so neither the DP share nor the micro-batch split may change the chosen tokens.
    "dp2-token-budget-kl_cov": ["--tp", "1", "--pp", "1", "--dp", "2", "--max-tokens", "24", "--loss", "mode=kl_cov",
                                *COV],
    "dp2-token-budget-clip_cov": ["--tp", "1", "--pp", "1", "--dp", "2", "--max-tokens", "24", "--loss",
                                  "mode=clip_cov", *COV],
    "dp2-distributed-optimizer": ["--tp", "1", "--pp", "1", "--dp", "2", "--distributed-optimizer"],
    "tp2-bf16": ["--tp", "2", "--pp", "1", "--dtype", "bf16"],
    "fused-tied": ["--tp", "2", "--pp", "2", "--loss", "fused_linear=true"],
    "fused-tied-entropy_bonus-chunked": ["--tp", "2", "--pp", "2", "--loss", "fused_linear=true", "--loss",
                                         "entropy_coef=0.1", "--loss", "fused_chunk_tokens=5"],
    "fused-tied-kl_cov": ["--tp", "2", "--pp", "2", "--loss", "fused_linear=true", "--loss", "mode=kl_cov", "--loss",
                          "kl_cov_ratio=0.1"],
    "fused-untied": ["--tp", "2", "--pp", "2", "--loss", "fused_linear=true", UNTIED],
    # bf16 (Float16Module: the hidden states come back upcast and are cast to the weight's dtype again)
    "fused-tp2-bf16": ["--tp", "2", "--pp", "1", "--dtype", "bf16", "--loss", "fused_linear=true"],
}


def world_of(argv) -> int:
    value = lambda flag: int(argv[argv.index(flag) + 1]) if flag in argv else 1  # noqa: E731
    return value("--tp") * value("--pp") * value("--dp")


def launch(tmp, world: int) -> dict:
    """Every case of this world size in one torchrun launch: {case id: (rows by quantity, table text)}."""
    from megatron_simko.parallel.equivalence import DEFAULT_MODEL

    ids = [c for c, argv in CASES.items() if world_of(argv) == world]
    untied = tmp / "untied_config.json"
    untied.write_text(json.dumps({**DEFAULT_MODEL, "tie_word_embeddings": False}))
    cases = tmp / "cases.json"
    cases.write_text(json.dumps([[a for x in CASES[c] for a in (["--model-config", str(untied)] if x == UNTIED
                                                                   else [x])] for c in ids]))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
                        f"--master-port={port}", WORKER, "--cases", str(cases), "--dir", str(tmp)],
                       capture_output=True, text=True, timeout=900, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}"
    out = {}
    for i, c in enumerate(ids):
        result = json.loads((tmp / f"case_{i}.json").read_text())
        table = "\n".join([result["title"]] + [f"{row['quantity']:40s} {row['max_err']:13.3e} {row['tolerance']:10.1e} "
                                                f"{row['compared']:9d}  {'PASS' if row['passed'] else 'FAIL'}"
                                                for row in result["rows"]] + [f"missing: {result['missing']}"])
        assert result["ok"] and not result["missing"], table
        out[c] = ({row["quantity"]: row for row in result["rows"]}, table)
    return out


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    """case id -> (rows, table); each world size's launch runs on first use (a failed launch fails its cases)."""
    launched = {}

    def result(case):
        world = world_of(CASES[case])
        if world not in launched:
            try:
                launched[world] = launch(tmp_path_factory.mktemp(f"equivalence_world{world}"), world)
            except AssertionError as e:
                launched[world] = str(e)
        if isinstance(launched[world], str):
            pytest.fail(launched[world])
        return launched[world][case]

    return result


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tp2", "pp2", "tp2xpp2", "dp2-token-budget", "pp2-interleaved"])
def test_layout_equals_single_device_fp32(equivalence, case):
    rows, table = equivalence(case)
    assert REQUIRED_ROWS <= set(rows), table
    for name, row in rows.items():
        assert row["passed"] and row["compared"] > 0, table
        if name != "grad norm (megatron clip_grads, fp32)":  # 1e-5, argued in the tool
            assert row["tolerance"] <= 1e-6, table


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tp2xpp2-kl_cov", "tp2xpp2-clip_cov-entropy_bonus", "tp2xpp2-entropy_adv",
                                  "tp2xpp2-simko-entropy_bonus", "dp2-token-budget-kl_cov",
                                  "dp2-token-budget-clip_cov"])
def test_exploration_baselines_equal_single_device(equivalence, case):
    rows, table = equivalence(case)
    assert REQUIRED_ROWS <= set(rows), table
    if "mode=kl_cov" in CASES[case] or "mode=clip_cov" in CASES[case]:
        assert rows["covariance-selected tokens (count diff)"]["compared"] >= 2, table
    for name, row in rows.items():
        assert row["passed"] and row["compared"] > 0, table
        if name != "grad norm (megatron clip_grads, fp32)":
            assert row["tolerance"] <= 1e-6, table


@pytest.mark.slow
def test_distributed_optimizer_dp2_params_after_step(equivalence):
    """Reduce-scatter + sharded Adam + all-gather gives the single-device parameters (gradients are sharded,
    so only the step's result is compared)."""
    rows, table = equivalence("dp2-distributed-optimizer")
    assert rows["params after one Adam step"]["passed"], table
    assert rows["SimKO loss"]["passed"], table


@pytest.mark.slow
def test_bf16_within_stated_tolerances(equivalence):
    rows, table = equivalence("tp2-bf16")
    assert REQUIRED_ROWS <= set(rows) and all(r["passed"] for r in rows.values()), table


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tied", "tied-entropy_bonus-chunked", "tied-kl_cov", "untied"])
def test_fused_linear_equals_single_device_logits(equivalence, case):
    """loss.fused_linear at TP2×PP2 (statistics from hidden states, no logits; models/output_head.py) against the
    single-device logits path, fp32 1e-6: statistics, loss, every gradient, the Adam step."""
    rows, table = equivalence(f"fused-{case}")
    assert REQUIRED_ROWS <= set(rows), table
    for name, row in rows.items():
        assert row["passed"] and row["compared"] > 0, table
        if name != "grad norm (megatron clip_grads, fp32)":
            assert row["tolerance"] <= 1e-6, table


@pytest.mark.slow
def test_fused_linear_bf16_within_stated_tolerances(equivalence):
    """bf16 (Float16Module: the hidden states come back upcast and are cast to the weight's dtype again)."""
    rows, table = equivalence("fused-tp2-bf16")
    assert REQUIRED_ROWS <= set(rows) and all(r["passed"] for r in rows.values()), table
