"""SimKO semantics (SIMKO_SPEC.md), exact GRPO equivalence, chunking, metrics and input validation (one process)."""
import math

import pytest
import torch

from loss_dist_worker import BASE, FP32_TOL, make_inputs
from megatron_simko.losses import SimKOConfig, merge_metrics, simko_loss, token_statistics
from megatron_simko.losses.covariance import covariance_selection, top_covariance_tokens
from megatron_simko.losses.reference import reference_simko_loss
from megatron_simko.losses.simko import high_entropy_mask, simko_gamma


def run(logits, targets, old, adv, mask, cfg, **kw):
    x = logits.clone().requires_grad_()
    loss, metrics = simko_loss(x, targets, old, adv, mask, cfg, **kw)
    loss.backward()
    return loss.detach(), x.grad, metrics


def inputs(seed=0, **over):
    logits, targets, old, adv, mask, old_topk = make_inputs({**BASE, **over}, seed)
    return logits, targets, old, adv, mask


def test_gamma_value_is_r_and_gradient_is_spec():
    """γ == r in value; ∂γ/∂logp = r(1 − αw), ∂γ/∂log π(c_k) = r αw / K."""
    g = torch.Generator().manual_seed(1)
    logp = (-torch.rand(6, generator=g) * 3).requires_grad_()
    topk = (-torch.rand(6, 3, generator=g) * 3).requires_grad_()
    old = -torch.rand(6, generator=g) * 3
    alpha_w = torch.tensor([0.0, 0.3, 0.3, 0.0, 1.0, 0.01])
    gamma = simko_gamma(logp, topk, old, alpha_w)
    r = torch.exp(logp.detach() - old)
    assert torch.equal(gamma.detach(), r)
    gamma.sum().backward()
    torch.testing.assert_close(logp.grad, r * (1 - alpha_w), rtol=1e-6, atol=0)
    torch.testing.assert_close(topk.grad, (r * alpha_w / 3)[:, None].expand(6, 3), rtol=1e-6, atol=0)


def test_literal_gamma_value_is_r_and_old_topk_cancels():
    """The reference's literal γ (with r_k = π(c_k)/π_old(c_k)) has value r, and arbitrary π_old(c_k) change
    neither loss nor gradient; our implementation, which never sees π_old(c_k), matches both."""
    logits, targets, old, adv, mask = inputs(seed=3, adv="BL")
    cfg = SimKOConfig(alpha=0.5, lam=2.0)
    results = []
    for scale in (0.0, 5.0):
        old_topk = torch.randn(*targets.shape, 3, generator=torch.Generator().manual_seed(7)) * scale
        x = logits.clone().requires_grad_()
        loss, aux = reference_simko_loss(x, targets, old, adv, mask, alpha=0.5, lam=2.0, old_topk_logprob=old_topk)
        loss.backward()
        torch.testing.assert_close(aux["gamma"].detach(), aux["r"].detach(), rtol=1e-6, atol=0)
        results.append((loss.detach(), x.grad))
    torch.testing.assert_close(results[0], results[1], **FP32_TOL)
    ours_loss, ours_grad, _ = run(logits, targets, old, adv, mask, cfg)
    torch.testing.assert_close((ours_loss, ours_grad), results[1], **FP32_TOL)


def test_alpha0_lam1_is_exactly_grpo():
    for seed, T in ((0, 1.0), (1, 0.7)):
        logits, targets, old, adv, mask = inputs(seed=seed, adv="BL", vocab_size=59, pad_logit=10.0)
        a = run(logits, targets, old, adv, mask, SimKOConfig(mode="simko", alpha=0.0, lam=1.0, chunk_tokens=7),
                temperature=T, vocab_size=59)
        b = run(logits, targets, old, adv, mask, SimKOConfig(mode="grpo", alpha=0.5, lam=3.0, chunk_tokens=7),
                temperature=T, vocab_size=59)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_lambda_acts_only_on_rank1_high_entropy_negative_tokens():
    """Changing λ changes the gradient rows of exactly the tokens with A < 0, w = 1 and y_t = argmax z."""
    logits, targets, _, _, mask = inputs(seed=5, L=40)
    adv = torch.randn(targets.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # r = 1: no clipping, so λ is visible on every token it touches
        old = token_statistics(logits, targets, 3, mask=mask).target_logprob
    ent = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    w = torch.zeros_like(mask)
    for i in range(mask.shape[0]):
        if mask[i].any():
            w[i] = (ent[i] > torch.quantile(ent[i][mask[i]], 0.8)) & mask[i]
    rank1, neg = targets == logits.argmax(-1), (adv < 0) & mask
    expected = neg & w & rank1
    for near_miss in (neg & w & ~rank1, neg & ~w & rank1, (adv > 0) & mask & w & rank1):
        assert near_miss.any(), "fixture must contain tokens meeting two of the three conditions"
    assert expected.any()
    _, g1, m1 = run(logits, targets, old, adv, mask, SimKOConfig(alpha=0.0, lam=1.0))
    _, g3, m3 = run(logits, targets, old, adv, mask, SimKOConfig(alpha=0.0, lam=3.0))
    changed = (g1 != g3).any(-1)
    assert torch.equal(changed, expected)
    torch.testing.assert_close(g3[expected], 3 * g1[expected], rtol=1e-5, atol=1e-7)
    assert m3["lam_fraction"] == expected.sum().item() / mask.sum().item()


def test_tau_gates_per_response():
    """Two responses with very different entropy scales each get their own top 20% (τ = 0.8)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 20, 64, generator=g)
    logits[0] *= 6.0  # peaked: low entropy everywhere
    logits[1] *= 0.2  # flat: high entropy everywhere
    targets = torch.randint(0, 64, (2, 20), generator=g)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 10:] = False  # 10 valid tokens: q at position 0.8·9 = 7.2 → 2 tokens strictly above
    ent = token_statistics(logits, targets, 3, mask=mask).entropy
    assert ent[0].max() < ent[1][mask[1]].min()  # a global threshold would pick only response 1
    w = high_entropy_mask(ent, mask, 0.8)
    assert w.sum(1).tolist() == [4, 2]
    assert not w[1, 10:].any()
    for i in range(2):
        valid = ent[i][mask[i]]
        assert torch.equal(w[i][mask[i]], valid > torch.quantile(valid, 0.8))
    adv = torch.tensor([1.0, 1.0])
    _, _, metrics = run(logits, targets, torch.zeros(2, 20), adv, mask, SimKOConfig())
    assert metrics["high_entropy_fraction"] == pytest.approx(6 / 30)


def test_chunking_and_no_grad_path():
    logits, targets, old, adv, mask = inputs(seed=2, top_k=4)
    full = run(logits, targets, old, adv, mask, SimKOConfig(top_k=4, alpha=0.3))
    chunked = run(logits, targets, old, adv, mask, SimKOConfig(top_k=4, alpha=0.3, chunk_tokens=7))
    torch.testing.assert_close(full[:2], chunked[:2], rtol=1e-7, atol=1e-9)
    x = logits.clone().requires_grad_()
    with_graph = token_statistics(x, targets, 4, mask=mask)
    with torch.no_grad():
        no_graph = token_statistics(x, targets, 4, mask=mask, chunk_tokens=3)
    assert with_graph.target_logprob.grad_fn is not None and no_graph.target_logprob.grad_fn is None
    for a, b in zip(with_graph, no_graph):
        assert torch.equal(a.detach(), b)


def test_bf16_single_device_gradient_dtype():
    logits, targets, old, adv, mask = inputs(seed=4, dtype="bf16")
    loss, grad, _ = run(logits, targets, old, adv, mask, SimKOConfig(alpha=0.3))
    assert grad.dtype == torch.bfloat16 and loss.dtype == torch.float32


def test_token_normalizer_and_merge_metrics_over_micro_batches():
    """Splitting the batch by responses: Σ micro losses (shared normaliser) == full token mean; merged
    metrics == full-batch metrics (q_i is per response, so it is unaffected by the split)."""
    logits, targets, old, adv, mask = inputs(seed=6, adv="BL")
    cfg = SimKOConfig(alpha=0.3, lam=2.0)
    full_loss, full_grad, full_metrics = run(logits, targets, old, adv, mask, cfg)
    n = float(mask.sum())
    parts = [slice(0, 2), slice(2, 5)]
    micro = [run(logits[s], targets[s], old[s], adv[s], mask[s], cfg, token_normalizer=n) for s in parts]
    torch.testing.assert_close(sum(m[0] for m in micro), full_loss, **FP32_TOL)
    torch.testing.assert_close(torch.cat([m[1] for m in micro]), full_grad, **FP32_TOL)
    merged = merge_metrics(m[2] for m in micro)
    assert set(merged) == set(full_metrics) - {"loss"}
    for key, value in merged.items():
        assert value == pytest.approx(full_metrics[key], rel=1e-6, abs=1e-7), key
    assert full_metrics["pg_loss"] == pytest.approx(full_metrics["loss"], rel=1e-6)


def test_entropy_gradient_alone_matches_autograd():
    """∂H/∂z_j = −π_j (log π_j + H), /T for the logits, from the entropy output alone (no β terms), with padding
    rows, temperature and chunking; against autograd of −Σ p log p over the real vocabulary."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 7, 40, generator=g) * 2
    targets = torch.randint(0, 35, (3, 7), generator=g)
    weights = torch.randn(3, 7, generator=g)
    x = logits.clone().requires_grad_()
    (token_statistics(x, targets, 2, None, 0.7, 35, chunk_tokens=4).entropy * weights).sum().backward()
    y = logits.clone().requires_grad_()
    logp = torch.log_softmax(y[..., :35] / 0.7, -1)
    (-(logp.exp() * logp).sum(-1) * weights).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, **FP32_TOL)
    assert not x.grad[..., 35:].any()


def test_entropy_bonus_lowers_the_loss_by_coef_times_mean_entropy():
    logits, targets, old, adv, mask = inputs(seed=8, adv="BL")
    base_loss, base_grad, base_m = run(logits, targets, old, adv, mask, SimKOConfig(alpha=0.3))
    loss, grad, m = run(logits, targets, old, adv, mask, SimKOConfig(alpha=0.3, entropy_coef=0.1))
    assert loss.item() == pytest.approx(base_loss.item() - 0.1 * m["entropy_mean"], rel=1e-6)
    assert m["pg_loss"] == base_m["pg_loss"] and m["high_entropy_fraction"] == base_m["high_entropy_fraction"]
    assert not torch.equal(grad, base_grad)  # the bonus reaches the logits (SimKO's gate w stays detached)


@pytest.mark.parametrize("mode", ["kl_cov", "clip_cov"])
def test_covariance_selection_carried_into_micro_batches(mode):
    """The trainer's path: one selection over the whole batch, passed to each micro-batch (shared normaliser),
    gives exactly the single call's loss and gradient — the split does not change which tokens are chosen."""
    logits, targets, old, adv, mask = inputs(seed=9, adv="BL")
    cfg = SimKOConfig(mode=mode, kl_cov_ratio=0.1, clip_cov_ratio=0.1, clip_cov_lb=0.2, clip_cov_ub=3.0)
    full_loss, full_grad, full_m = run(logits, targets, old, adv, mask, cfg, selection_seed=3)
    with torch.no_grad():
        logp = token_statistics(logits, targets, 3, mask=mask).target_logprob
    sel = covariance_selection(mode, torch.where(mask, adv, 0.0), torch.where(mask, logp, 0.0),
                               torch.where(mask, old, 0.0), mask, cfg, seed=3)
    assert sel.sum() >= 2 and full_m["cov_selected_fraction"] == sel.sum().item() / mask.sum().item()
    n = float(mask.sum())
    parts = [slice(0, 1), slice(1, 4), slice(4, 5)]
    micro = [run(logits[s], targets[s], old[s], adv[s], mask[s], cfg, token_normalizer=n, cov_selected=sel[s])
             for s in parts]
    torch.testing.assert_close(sum(m[0] for m in micro), full_loss, **FP32_TOL)
    torch.testing.assert_close(torch.cat([m[1] for m in micro]), full_grad, **FP32_TOL)


def test_kl_cov_ties_go_to_the_earlier_token():
    cov = torch.tensor([[0.5, 2.0, 2.0, 0.1], [2.0, 2.0, 3.0, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, True], [False, True, True, True]])
    # valid tokens in row-major order: 0.5, 2.0, 2.0, 0.1, 2.0 (row 1, col 1), 3.0, -1.0 → k = 3: 3.0 then the
    # two earliest 2.0s
    chosen = top_covariance_tokens(cov, mask, 3 / 7)
    assert chosen.tolist() == [[False, True, True, False], [False, False, True, False]]


def test_entropy_adv_shapes_positive_and_negative_advantages_upward_without_flipping():
    logits, targets, old, adv, mask = inputs(seed=10, adv="BL")
    _, aux = reference_simko_loss(logits, targets, old, adv, mask, mode="entropy_adv")
    A = torch.where(mask, adv, 0.0)
    shaped = aux["advantages"]
    assert torch.equal(torch.sign(shaped[A != 0]), torch.sign(A[A != 0]))
    assert (shaped >= A).all() and ((shaped - A) <= A.abs() / 2 + 1e-7).all()


def test_empty_mask_gives_zero_loss_and_gradient():
    logits, targets, old, adv, mask = inputs()
    loss, grad, metrics = run(logits, targets, old, adv, torch.zeros_like(mask), SimKOConfig())
    assert loss.item() == 0.0 and not grad.any() and metrics["num_tokens"] == 0.0
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("field, value", [
    ("mode", "ppo"), ("top_k", 0), ("top_k", 2.0), ("alpha", -0.1), ("alpha", 1.5), ("lam", 0.0),
    ("tau", 1.2), ("clip_low", -0.1), ("clip_high", -1.0), ("chunk_tokens", 0), ("entropy_coef", -0.1),
    ("entropy_coef", float("nan")), ("kl_cov_ratio", 0.0), ("clip_cov_ratio", 1.5), ("kl_cov_coef", -1.0),
    ("clip_cov_lb", 6.0), ("entropy_adv_alpha", -0.4), ("entropy_adv_kappa", 0.0)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SimKOConfig(**{field: value})


def _target_out_of_range(targets, mask):
    targets, mask = targets.clone(), mask.clone()
    targets[0, 0], mask[0, 0] = 64, True
    return dict(targets=targets, mask=mask)


BAD_INPUTS = {  # expected message fragment: (input overrides from the valid inputs, keyword arguments)
    "targets shape": (lambda t, m, o, a, l: dict(targets=t[:, :-1]), {}),
    "old_logprob shape": (lambda t, m, o, a, l: dict(old=o[:, :-1]), {}),
    "advantages must be": (lambda t, m, o, a, l: dict(adv=a[:-1]), {}),
    "mask dtype": (lambda t, m, o, a, l: dict(mask=m.float()), {}),
    "targets dtype": (lambda t, m, o, a, l: dict(targets=t.int()), {}),
    "logits dtype": (lambda t, m, o, a, l: dict(logits=l.double()), {}),
    "logits must be": (lambda t, m, o, a, l: dict(logits=l[0]), {}),
    "target id out of range": (lambda t, m, o, a, l: _target_out_of_range(t, m), {}),
    "larger than the real vocabulary": (lambda *_: {}, dict(vocab_size=2)),
    "tp_group": (lambda *_: {}, dict(vocab_size=65)),
    "token_normalizer": (lambda *_: {}, dict(token_normalizer=0.0)),
    "cov_selected must be": (lambda *_: {}, dict(cov_selected=torch.ones(5, 3, dtype=torch.bool))),
    "temperature": (lambda *_: {}, dict(temperature=0.0)),
}


@pytest.mark.parametrize("message", list(BAD_INPUTS))
def test_input_errors_name_the_problem(message):
    logits, targets, old, adv, mask = inputs()
    build, kw = BAD_INPUTS[message]
    args = {**dict(logits=logits, targets=targets, old=old, adv=adv, mask=mask),
            **build(targets, mask, old, adv, logits)}
    with pytest.raises(ValueError, match=message):
        cfg = SimKOConfig(mode="kl_cov") if "cov_selected" in kw else SimKOConfig()
        simko_loss(args["logits"], args["targets"], args["old"], args["adv"], args["mask"], cfg, **kw)


def test_out_of_range_target_is_fine_where_masked_out():
    logits, targets, old, adv, mask = inputs()
    targets = targets.clone()
    targets[~mask] = -100  # e.g. an ignore index at padding positions
    loss, _, _ = run(logits, targets, old, adv, mask, SimKOConfig())
    assert torch.isfinite(loss)
