"""loss.lam_form: "ratio" (the paper's v3 / CaSP pseudo-code) against a literal transcription of that pseudo-code,
and where it differs from "advantage" (the released code, SIMKO_SPEC.md).

The transcription below is written from v3's description only (SIMKO_SPEC.md, last section), on the full
vocabulary with plain torch.softmax and autograd, in the pseudo-code's own order: per-token ratio, top-N label
smoothing of the positive ratio at gated tokens, `ratio[adv < 0 & is_top1 & w] *= λ`, then the PPO clip. It
shares no code with losses/simko.py or losses/reference.py.
"""
import torch

from loss_dist_worker import BASE, FP32_TOL, make_inputs
from megatron_simko.losses import SimKOConfig, simko_loss
from megatron_simko.losses.reference import reference_simko_loss


def casp_v3_pseudocode_loss(logits, targets, old_log_prob, adv, response_mask, *, alpha, lam, top_n, q,
                            eps_low, eps_high, temperature=1.0):
    """v3's loss, literally: the token-mean of max(−adv·ratio, −adv·clip(ratio)) after the two modifications."""
    B, L, V = logits.shape
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, L, V]
    log_probs = torch.log(probs)
    log_prob = log_probs.gather(-1, targets[..., None])[..., 0]  # [B, L]
    entropy = -(probs * log_probs).sum(-1).detach()
    top_ids = torch.topk(logits.detach().float(), top_n, dim=-1).indices  # [B, L, N]
    top_log_prob = log_probs.gather(-1, top_ids)  # [B, L, N]
    is_top1 = targets == top_ids[..., 0]
    if adv.dim() == 1:
        adv = adv[:, None].expand(B, L)
    adv = torch.where(response_mask, adv, torch.zeros_like(adv))
    old = torch.where(response_mask, old_log_prob, torch.zeros_like(old_log_prob))
    log_prob = torch.where(response_mask, log_prob, torch.zeros_like(log_prob))

    # the entropy gate τ_q: per response, tokens strictly above the q-quantile of its response entropies
    w = torch.zeros(B, L, dtype=torch.bool)
    for i in range(B):
        tokens = [t for t in range(L) if response_mask[i, t]]
        if tokens:
            threshold = torch.quantile(entropy[i, tokens], q)
            for t in tokens:
                w[i, t] = bool(entropy[i, t] > threshold)

    ratio = torch.exp(log_prob - old)
    # γ⁺: at gated positive tokens, (1 − α)·ratio + α/N · Σ_n sg(ratio / ratio_n)·ratio_n; the candidates' old
    # log-probs cancel in value and gradient, so ratio_n = π(c_n) / 1 is as good as any.
    ratio_n = torch.exp(top_log_prob)
    smoothed = (1 - alpha) * ratio + alpha / top_n * ((ratio[..., None] / ratio_n).detach() * ratio_n).sum(-1)
    ratio = torch.where((adv > 0) & w, smoothed, ratio)
    # γ⁻: ratio[adv < 0 & is_top1 & w] *= λ
    ratio = torch.where((adv < 0) & is_top1 & w, lam * ratio, ratio)

    pg_losses = -adv * ratio
    pg_losses_clipped = -adv * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = torch.maximum(pg_losses, pg_losses_clipped)
    return (per_token * response_mask).sum() / response_mask.sum()


def _spread_lambda_ratios(logits, targets, old, adv, mask, lam, temperature=1.0, eps_low=0.2):
    """old log-probs with the λ-tokens' ratios r cycling through the three regions of the clip: both forms clip
    (r = 0.5 at λ > 1), exactly one does (r between 1 − ε and (1 − ε)/λ), neither (r = 1.2, 0.95 at λ > 1)."""
    _, aux = reference_simko_loss(logits, targets, old, adv, mask, temperature=temperature)
    lam_tok = aux["lam_applied"]
    between = ((1 - eps_low) + (1 - eps_low) / lam) / 2
    cycle = torch.tensor([between, 1.2, 0.5, between, 0.95])
    r = cycle[torch.arange(int(lam_tok.sum())) % len(cycle)]
    old = old.clone()
    old[lam_tok] = aux["logp"].detach()[lam_tok] - torch.log(r)
    return old


def _ours(logits, targets, old, adv, mask, cfg, temperature=1.0):
    x = logits.clone().requires_grad_()
    loss, metrics = simko_loss(x, targets, old, adv, mask, cfg, temperature=temperature)
    loss.backward()
    return loss.detach(), x.grad, metrics


def test_ratio_form_equals_the_v3_pseudocode():
    """Loss and every logit gradient at 1e-6 (fp32), on fixtures where λ·r crosses 1 − ε_low."""
    checked_crossing = 0
    for seed, alpha, lam, T, adv_kind in ((0, 0.3, 1.1, 1.0, "BL"), (1, 0.01, 1.05, 0.7, "B"),
                                          (2, 0.5, 1.3, 1.0, "BL")):
        logits, targets, old, adv, mask, _ = make_inputs({**BASE, "adv": adv_kind, "temperature": T}, seed)
        old = _spread_lambda_ratios(logits, targets, old, adv, mask, lam, T)
        cfg = SimKOConfig(alpha=alpha, lam=lam, lam_form="ratio", clip_high=0.28)
        loss, grad, metrics = _ours(logits, targets, old, adv, mask, cfg, T)
        x = logits.clone().requires_grad_()
        expected = casp_v3_pseudocode_loss(x, targets, old, adv, mask, alpha=alpha, lam=lam, top_n=3, q=0.8,
                                           eps_low=0.2, eps_high=0.28, temperature=T)
        expected.backward()
        torch.testing.assert_close(loss, expected.detach(), **FP32_TOL)
        torch.testing.assert_close(grad, x.grad, **FP32_TOL)
        # and the reference that the vocab-parallel tests compare against agrees with it too
        ref, _ = reference_simko_loss(logits, targets, old, adv, mask, alpha=alpha, lam=lam, lam_form="ratio",
                                      clip_high=0.28, temperature=T)
        torch.testing.assert_close(ref, expected.detach(), **FP32_TOL)
        assert metrics["lam_fraction"] > 0
        _, aux = reference_simko_loss(logits, targets, old, adv, mask, alpha=alpha, lam=lam, temperature=T)
        r = aux["r"]
        checked_crossing += int((aux["lam_applied"] & (r < 0.8) & (lam * r >= 0.8)).sum())
    assert checked_crossing > 0, "fixture: no λ-token where the two forms differ"


def test_the_two_forms_differ_only_where_the_clip_is_active():
    """Per token (each logit row's gradient is its own token's; w is a detached gate): identical gradients
    except at λ-tokens with r < 1 − ε_low; the loss differs by exactly Σ over λ-tokens with λ·r < 1 − ε_low of
    (λ − 1)·|A|·(1 − ε_low) / N (both clipped, the advantage form's value λ times larger)."""
    eps = 0.2
    for seed, lam in ((0, 1.1), (4, 1.5), (5, 0.8)):
        logits, targets, old, adv, mask, _ = make_inputs({**BASE, "adv": "BL", "B": 12}, seed)
        old = _spread_lambda_ratios(logits, targets, old, adv, mask, lam)
        results = {form: _ours(logits, targets, old, adv, mask, SimKOConfig(alpha=0.3, lam=lam, lam_form=form))
                   for form in ("advantage", "ratio")}
        _, aux = reference_simko_loss(logits, targets, old, adv, mask, alpha=0.3, lam=lam)
        r, A = aux["r"].detach(), torch.where(mask, adv, 0.0)
        lam_tok = aux["lam_applied"]
        differ = lam_tok & (torch.minimum(r, lam * r) < 1 - eps)  # the clip is active in at least one form
        (loss_a, grad_a, _), (loss_r, grad_r, _) = results["advantage"], results["ratio"]
        assert differ.any() and (lam_tok & ~differ).any()
        same = ~differ
        # outside: the same per-token math up to float association (λ·A)·r vs A·(λ·r)
        torch.testing.assert_close(grad_a[same], grad_r[same], **FP32_TOL)
        row_differs = (grad_a - grad_r).abs().amax(-1) > 1e-5
        one_clipped = lam_tok & (torch.minimum(r, lam * r) < 1 - eps) & (torch.maximum(r, lam * r) >= 1 - eps)
        assert torch.equal(row_differs, one_clipped), "gradients must differ exactly where one form clips"
        both_clipped = lam_tok & (torch.maximum(r, lam * r) < 1 - eps)
        n = mask.sum()
        expected_gap = ((lam - 1) * A.abs() * (1 - eps) * both_clipped).sum() / n
        # the tokens clipped in one form only: advantage form λ|A|(1 − ε) or λ|A|r vs ratio form |A|λr or |A|(1 − ε)
        only_a = one_clipped & (r < 1 - eps)
        only_r = one_clipped & (lam * r < 1 - eps)
        expected_gap += ((lam * A.abs() * (1 - eps) - A.abs() * lam * r) * only_a).sum() / n
        expected_gap += ((lam * A.abs() * r - A.abs() * (1 - eps)) * only_r).sum() / n
        torch.testing.assert_close(loss_a - loss_r, expected_gap, rtol=1e-5, atol=1e-6)


def test_lam_form_is_validated():
    import pytest

    with pytest.raises(ValueError, match="lam_form must be one of"):
        SimKOConfig(lam_form="logit")
