"""Issue 20 item 7: the trainer keeps the logits whole and shifts the targets (trainer/step.py ``_shifted``).

The loss, its logit gradient, the metrics and the forward-only statistics must equal the sliced form
``logits[:, :-1]`` against ``tokens[:, 1:]`` that the trainer used before (1e-6, fp32), in every mode, b > 1.
"""
import pytest
import torch

from megatron_simko.losses import SimKOConfig, simko_loss, token_statistics
from megatron_simko.losses.simko import MODES
from megatron_simko.trainer.schedule import shift_left


def batch(seed=0, b=3, s=9, V=37):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, s, V, generator=g) * 2
    tokens = torch.randint(0, V, (b, s), generator=g)
    old = -torch.rand(b, s, generator=g) * 3
    adv = torch.randn(b, s, generator=g)
    mask = torch.rand(b, s, generator=g) > 0.3
    mask[:, 0] = False  # index 0 is never a response token (batch.py)
    cov = torch.rand(b, s, generator=g) > 0.7
    return logits, tokens, old, adv, mask, cov


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("entropy_coef", [0.0, 0.05])
def test_whole_logits_with_shifted_targets_equal_sliced_logits(mode, entropy_coef):
    logits, tokens, old, adv, mask, cov = batch()
    cfg = SimKOConfig(mode=mode, top_k=3, alpha=0.3, lam=1.5, entropy_coef=entropy_coef, chunk_tokens=5)
    kw = dict(temperature=0.7, token_normalizer=11.0)

    x_old = logits.clone().requires_grad_()
    loss_old, m_old = simko_loss(x_old[:, :-1], tokens[:, 1:], old[:, 1:], adv[:, 1:], mask[:, 1:], cfg,
                                 cov_selected=cov[:, 1:], **kw)
    loss_old.backward()

    x_new = logits.clone().requires_grad_()
    loss_new, m_new = simko_loss(x_new, shift_left(tokens, 0), shift_left(old, 0.0), shift_left(adv, 0.0),
                                 shift_left(mask, False), cfg, cov_selected=shift_left(cov, False), **kw)
    loss_new.backward()

    torch.testing.assert_close(loss_new, loss_old, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x_new.grad, x_old.grad, rtol=1e-6, atol=1e-7)
    assert m_new.keys() == m_old.keys()
    for k in m_old:
        assert m_new[k] == pytest.approx(m_old[k], rel=1e-6, abs=1e-7), k


def test_forward_only_statistics_agree():
    logits, tokens, *_ = batch(seed=1)
    old = token_statistics(logits[:, :-1], tokens[:, 1:], 3, temperature=1.3)
    new = token_statistics(logits, shift_left(tokens, 0), 3, temperature=1.3)
    for a, b in zip(old, new):
        assert torch.equal(b[:, :-1], a)
