"""The Triton backend (losses/triton_kernels.py) against the torch backend it replaces.

Correctness runs in Triton's CPU interpreter at TP 1 and 2 (real gloo groups): one launch per TP size runs
every case of tests/loss_triton_worker.py; the tests below report its per-case verdicts. Also here: backend
selection and its errors, and that the kernels compile for a Hopper GPU (sm_90) with the installed Triton —
code generation and ptxas only, no GPU needed.
"""
import inspect

import pytest
import torch

import loss_dist_worker
import loss_triton_worker as worker
from megatron_simko.config import ConfigError, config_from_dict
from megatron_simko.losses import SimKOConfig, token_statistics
from megatron_simko.losses import triton_kernels as tk

needs_triton = pytest.mark.skipif(tk.triton is None, reason="triton is not installed (requirements/cpu.lock.txt)")


@pytest.fixture(scope="module", params=(1, 2), ids=lambda tp: f"tp{tp}")
def tp_results(request, tmp_path_factory):
    tp = request.param
    out = str(tmp_path_factory.mktemp(f"triton_tp{tp}"))
    return tp, loss_dist_worker.launch(tp, out, timeout=600.0, script=worker.__file__,
                                       env={"TRITON_INTERPRET": "1"})


@needs_triton
@pytest.mark.parametrize("case", list(worker.CASES))
def test_triton_matches_torch_backend(tp_results, case):
    tp, results = tp_results
    failures = results.get(case)
    assert failures is not None, f"TP={tp}: case {case} did not run"
    assert not failures, f"TP={tp} case {case}:\n" + "\n".join(failures)


def test_backend_selection():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert tk.resolve_backend("auto", cpu, 3) == "torch"
    assert tk.resolve_backend("torch", cuda, 3) == "torch"
    assert tk.resolve_backend("auto", cuda, 3) == ("torch" if tk.triton is None else "triton")
    assert tk.resolve_backend("auto", cuda, tk.MAX_TOP_K + 1) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        tk.resolve_backend("cuda", cpu, 3)
    if not tk.interpreted():  # CPU tensors without the interpreter (or without triton): a clear error
        with pytest.raises(ValueError, match="TRITON_INTERPRET|triton package"):
            token_statistics(torch.zeros(1, 2, 8), torch.zeros(1, 2, dtype=torch.long), 2, backend="triton")
    if tk.triton is not None:
        with pytest.raises(ValueError, match="top_k <= 8"):
            tk.resolve_backend("triton", cuda, 9)
    assert SimKOConfig().backend == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        SimKOConfig(backend="fast")
    assert config_from_dict({}, ["loss.backend=torch"]).loss.backend == "torch"
    with pytest.raises(ConfigError, match="backend"):
        config_from_dict({}, ["loss.backend=cuda"])


@needs_triton
def test_kernels_compile_for_hopper():
    """Code generation through ptxas for sm_90 (bf16 logits, K = 8, the GPU's tile) with this Triton."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if tk.interpreted():
        pytest.skip("the kernels were decorated for the interpreter in this process")
    ptr = dict(row_stride="i64", grad_row_stride="i64", n_real="i32", n_cols="i32", start="i32", inv_t="fp32",
               logits_ptr="*bf16", grad_ptr="*bf16", targets_ptr="*i64", ids_ptr="*i64", partials_ptr="*fp64")
    cases = [(tk._local_partials_kernel, dict(K=8, KP=8, BLOCK=tk.MAX_BLOCK)),
             (tk._softmax_gradient_kernel, dict(M=9, MP=16, HAS_ENTROPY=True, BLOCK=tk.MAX_BLOCK))]
    for kernel, constexprs in cases:
        names = inspect.signature(kernel.fn).parameters
        signature = {n: "constexpr" if n in constexprs else ptr.get(n, "*fp32") for n in names}
        compiled = tk.triton.compile(ASTSource(kernel, signature=signature, constexprs=constexprs),
                                     target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
        assert compiled.asm.get("cubin"), f"{kernel.fn.__name__}: no cubin"


@needs_triton
def test_logits_loads_are_128_bit_when_the_padded_width_is_a_multiple_of_16():
    """Issue 20 item 8: loads are masked on the logits' (padded) width n_cols, not on the real width n_real.
    Triton specialises integer arguments divisible by 16; with Megatron's padded vocabulary n_cols is, while
    n_real (the last TP shard's real rows, or 4099) is not. Compiled for sm_90 as Triton specialises at launch
    (pointers, row strides and n_cols divisible by 16; n_real not): the PTX must load the logits with 128-bit
    vector loads (ld.global.v4) in both kernels, and the backward must store the gradient the same way."""
    import re

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if tk.interpreted():
        pytest.skip("the kernels were decorated for the interpreter in this process")
    ptr = dict(row_stride="i64", grad_row_stride="i64", n_real="i32", n_cols="i32", start="i32", inv_t="fp32",
               logits_ptr="*bf16", grad_ptr="*bf16", targets_ptr="*i64", ids_ptr="*i64", partials_ptr="*fp64")
    aligned = ("logits_ptr", "grad_ptr", "row_stride", "grad_row_stride", "n_cols")
    cases = [(tk._local_partials_kernel, dict(K=3, KP=4, BLOCK=tk.MAX_BLOCK), "ld"),
             (tk._softmax_gradient_kernel, dict(M=4, MP=4, HAS_ENTROPY=False, BLOCK=tk.MAX_BLOCK), "st")]
    for kernel, constexprs, also in cases:
        names = list(inspect.signature(kernel.fn).parameters)
        signature = {n: "constexpr" if n in constexprs else ptr.get(n, "*fp32") for n in names}
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned if n in names}
        ptx = tk.triton.compile(ASTSource(kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                                target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8)).asm["ptx"]
        assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", ptx), f"{kernel.fn.__name__}: no 128-bit logits load"
        if also == "st":
            assert re.search(r"st\.global(\.\w+)*\.v4\.b32", ptx), f"{kernel.fn.__name__}: no 128-bit gradient store"


@needs_triton
@pytest.mark.slow
def test_parallel_equivalence_tool_with_triton_backend(tmp_path, monkeypatch):
    """tools/check_parallel_equivalence.py --loss backend=triton (interpreted; with an entropy bonus): TP2×PP2 ≡ one device."""
    from test_parallel_equivalence import REQUIRED_ROWS, run_tool

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rows, table = run_tool(tmp_path, "--tp", "2", "--pp", "2", "--loss", "backend=triton", "--loss", "entropy_coef=0.01")
    assert REQUIRED_ROWS <= set(rows) and all(r["passed"] for r in rows.values()), table
