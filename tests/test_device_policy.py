"""The loop's device policy (megatron_simko/parallel/devices.py), on CPU.

Every function that combines trainer-side tensors with rollout-side ones is run with the trainer side on the
``meta`` device and the rollout side on the CPU. A meta tensor refuses to meet a CPU tensor in one operation
exactly as a CUDA tensor does (checked first, so these tests cannot pass vacuously): a forgotten move fails
here instead of at the first GPU step. The values are checked separately on the CPU against independent
formulas (masked_select / boolean indexing, which the implementations avoid).
"""
import math
import socket

import pytest
import torch
import torch.distributed as dist

from megatron_simko.experience import build_experience
from megatron_simko.metrics import token_metrics, token_sums
from megatron_simko.parallel.devices import all_reduce, check_same_device, collective_device
from megatron_simko.rollout import RolloutResult, RolloutSample, logprob_mismatch, truncated_importance_weights
from megatron_simko.rollout.consistency import mismatch_sums
from megatron_simko.trainer.batch import RLBatch
from megatron_simko.trainer.token_stats import PerTokenStats

META = torch.device("meta")


def _results():
    return [RolloutResult(0, [5, 6, 7], [RolloutSample([1, 2], [-0.5, -1.0], "length"),
                                         RolloutSample([3], [-0.25], "stop")]),
            RolloutResult(1, [8], [RolloutSample([9, 9, 9], [-1.0, -2.0, -3.0], "length"),
                                   RolloutSample([4, 4], [-0.1, -0.2], "stop")])]


def _stats(B, S, K, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    st = PerTokenStats(target_logprob=-torch.rand(B, S, generator=g), entropy=torch.rand(B, S, generator=g),
                       topk_logprob=-torch.rand(B, S, K, generator=g).sort(dim=-1).values,
                       topk_ids=torch.randint(0, 50, (B, S, K), generator=g), is_rank1=torch.rand(B, S, generator=g) > 0.5)
    return PerTokenStats(*(t.to(device) for t in st.fields()))


def test_meta_mixes_with_cpu_like_cuda():
    """The premise: meta + CPU raises (as CUDA + CPU does); a 0-dim CPU scalar is allowed (as on CUDA)."""
    with pytest.raises(RuntimeError, match="device"):
        torch.zeros(2, 3, device=META) - torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="device"):
        torch.where(torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 3, device=META), 0.0)
    assert (torch.zeros(2, device=META) + torch.tensor(1.0)).device == META


def test_build_experience_moves_every_field_to_the_trainer_device():
    cpu = build_experience(_results(), [1.0, 0.0, 0.0, 1.0], pad_id=0)
    moved = build_experience(_results(), [1.0, 0.0, 0.0, 1.0], pad_id=0, device=META)
    for name in ("tokens", "loss_mask", "old_logprob", "advantages", "rollout_logprob", "lengths", "indices"):
        assert getattr(cpu, name).device.type == "cpu"
        assert getattr(moved, name).device == META, name
        assert getattr(moved, name).shape == getattr(cpu, name).shape and getattr(moved, name).dtype == getattr(cpu, name).dtype
    assert torch.equal(cpu.to("cpu").tokens, cpu.tokens)


def test_rlbatch_refuses_mixed_devices():
    b = build_experience(_results(), [1.0, 0.0, 0.0, 1.0], pad_id=0)
    with pytest.raises(ValueError, match=r"rollout_logprob on meta"):
        RLBatch(tokens=b.tokens, loss_mask=b.loss_mask, old_logprob=b.old_logprob, advantages=b.advantages,
                rollout_logprob=b.rollout_logprob.to(META))
    with pytest.raises(ValueError, match="different devices"):
        check_same_device("x", a=torch.zeros(1), b=torch.zeros(1, device=META))


def test_mismatch_and_tis_compute_on_the_trainer_device():
    B, S = 4, 6
    g = torch.Generator().manual_seed(1)
    trainer, rollout = -torch.rand(B, S, generator=g), -torch.rand(B, S, generator=g)
    mask = torch.rand(B, S, generator=g) > 0.4
    sums, biggest = mismatch_sums(trainer.to(META), rollout, mask)  # rollout side on the CPU
    assert sums.device == META and biggest.device == META and sums.shape == (3,)
    w = truncated_importance_weights(trainer.to(META), rollout, 2.0, mask)
    assert w.device == META and w.shape == (B, S)

    # values, against an independent formula (masked_select over the CPU tensors)
    delta = (trainer.double() - rollout.double()).masked_select(mask)
    m = logprob_mismatch(trainer, rollout, mask)
    assert m["mismatch/tokens"] == delta.numel()
    assert m["mismatch/mean_abs"] == pytest.approx(float(delta.abs().mean()), rel=1e-12)
    assert m["mismatch/max_abs"] == pytest.approx(float(delta.abs().max()), rel=1e-12)
    assert m["mismatch/mean_signed"] == pytest.approx(float(delta.mean()), rel=1e-12)
    assert m["mismatch/token_mult_prob_error"] == pytest.approx(math.exp(float(delta.abs().mean())), rel=1e-12)
    ref_w = torch.where(mask, torch.exp(trainer - rollout).clamp(max=2.0), 0.0)
    assert torch.allclose(truncated_importance_weights(trainer, rollout, 2.0, mask), ref_w, rtol=0, atol=0)


def test_token_metrics_compute_on_the_trainer_device():
    B, S, K = 3, 5, 3
    mask = torch.rand(B, S, generator=torch.Generator().manual_seed(2)) > 0.3
    assert token_sums(_stats(B, S, K, META), mask).device == META  # mask (rollout side) on the CPU

    st = _stats(B, S, K, "cpu")
    out = token_metrics(st, mask)
    n = int(mask.sum())
    assert out["entropy/mean"] == pytest.approx(float(st.entropy[mask].double().sum()) / n, rel=1e-12)
    assert out["tokens/rank1_fraction"] == pytest.approx(float((st.is_rank1 & mask).sum()) / n, rel=1e-12)
    for k in range(K):
        assert out[f"lambda/{k + 1}"] == pytest.approx(float(st.topk_logprob[..., k][mask].double().mean()), rel=1e-12)


@pytest.fixture
def gloo_world():
    """A one-rank gloo process group on a free port, destroyed afterwards."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_collectives_run_on_the_backend_device(gloo_world):
    assert collective_device() == torch.device("cpu")  # gloo -> CPU (NCCL -> this rank's GPU)
    t = torch.tensor([1.0, 5.0])
    out = all_reduce(t, op="max")
    assert torch.equal(out, t) and out is not t and out.device == t.device
    st = _stats(2, 4, 2, "cpu")
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert token_metrics(st, mask, group=dist.group.WORLD) == token_metrics(st, mask)
    with pytest.raises(ValueError, match="op must be"):
        all_reduce(t, op="avg")


def test_all_reduce_without_process_group_is_a_copy():
    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    t = torch.arange(3.0)
    out = all_reduce(t)
    assert torch.equal(out, t) and out is not t
    assert not dist.is_initialized()
