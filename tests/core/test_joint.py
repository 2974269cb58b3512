"""jackpot.core.joint: the rollout model's loss (paper eq. 8) from two heads equals the same terms formed from
full (B, T, V) float64 logits with jackpot.core.losses, value and gradient, for every estimator and direction;
the teacher gets no gradient; a term that is off is absent."""

from __future__ import annotations

import pytest
import torch
from reference import distill_kl

from jackpot.core.head import Head, logprobs_at
from jackpot.core.joint import rollout_model_loss
from jackpot.core.losses import aggregate, ppo_token_loss

B, T, D, V = 3, 4, 6, 17


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    student = [torch.randn(B * T, D, **f64).requires_grad_(), torch.randn(V, D, **f64).requires_grad_(),
               (0.3 * torch.randn(V, **f64)).requires_grad_()]
    teacher = [torch.randn(B * T, D, **f64).requires_grad_(), torch.randn(V, D, **f64).requires_grad_(), None]
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 2:] = 0
    logits_s = (student[0] @ student[1].T + student[2]).reshape(B, T, V) / 0.8
    own = torch.log_softmax(logits_s.detach(), -1).gather(-1, ids[..., None])[..., 0]
    old = (own + 0.3 * torch.randn(B, T, **f64)).clamp_max(0.0)  # p_omega_old: the clip binds on some tokens
    rollout = (old + 0.2 * torch.randn(B, T, **f64)).clamp_max(0.0)  # p_inf: IS weights != 1, some capped
    adv = torch.randn(B, **f64)
    return student, teacher, ids, mask, old, rollout, adv


def _reference(student, teacher, ids, mask, old, rollout, adv, *, ppo, coef, direction, estimator, k, denominator):
    logits_s = (student[0] @ student[1].T + student[2]).reshape(B, T, V) / 0.8
    logits_t = (teacher[0] @ teacher[1].T).reshape(B, T, V).detach() / 0.8
    logp = torch.log_softmax(logits_s, -1).gather(-1, ids[..., None])[..., 0]
    total, terms = torch.zeros((), dtype=torch.float64), {}
    if ppo:
        tok, _ = ppo_token_loss(logp, old, adv, clip_eps=0.2, clip_eps_high=0.3, dual_clip=3.0)
        w = (old - rollout).exp().clamp_max(1.5)
        terms["rollout_model/ppo_loss"] = aggregate(tok * w, mask, "token-mean", denominator=denominator)
        total = total + terms["rollout_model/ppo_loss"]
    if coef > 0:
        lt = torch.log_softmax(logits_t, -1)
        top = lt.topk(k, -1)
        kl = distill_kl(logits_s, logits_t, direction=direction, estimator=estimator, teacher_topk_ids=top.indices,
                        teacher_topk_logp=top.values, sampled_ids=ids, teacher_sampled_logp=lt.gather(
                            -1, ids[..., None])[..., 0], rollout_sampled_logp=rollout, is_cap=1.5)
        terms["rollout_model/distill_kl"] = aggregate(kl, mask, "token-mean", denominator=denominator)
        total = total + coef * terms["rollout_model/distill_kl"]
    return total, terms, lt.gather(-1, ids[..., None])[..., 0] if coef > 0 else None


@pytest.mark.parametrize("estimator", ["full", "topk", "sampled"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("ppo, coef", [(True, 0.7), (False, 1.0), (True, 0.0)])
@pytest.mark.parametrize("chunk", [5, 100])
def test_rollout_model_loss_equals_the_full_logits_terms(estimator, direction, ppo, coef, chunk):
    student, teacher, ids, mask, old, rollout, adv = _case()
    denominator = torch.tensor(13.0, dtype=torch.float64)  # a mini-batch's, larger than this micro-batch's 10
    ref, terms, teacher_logp = _reference(student, teacher, ids, mask, old, rollout, adv, ppo=ppo, coef=coef,
                                          direction=direction, estimator=estimator, k=5, denominator=denominator)
    got = rollout_model_loss(Head(*student, 0.8), Head(*teacher, 0.8), ids, mask, adv, old, rollout,
                             teacher_logp=teacher_logp, ppo=ppo, distill_coef=coef, direction=direction,
                             estimator=estimator, topk=5, clip_eps=0.2, clip_eps_high=0.3, dual_clip=3.0,
                             is_cap=1.5, denominator=denominator, chunk=chunk)
    torch.testing.assert_close(got.loss, ref, rtol=1e-12, atol=1e-14)
    assert got.metrics().keys() == terms.keys()
    for key, value in terms.items():
        torch.testing.assert_close(got.metrics()[key], value.detach(), rtol=1e-12, atol=1e-14)
        assert not got.metrics()[key].requires_grad
    # the policy is the teacher: no gradient reaches it
    assert torch.autograd.grad(got.loss, teacher[:2], retain_graph=True, allow_unused=True) == (None, None)
    for a, r in zip(torch.autograd.grad(got.loss, student), torch.autograd.grad(ref, student), strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-13)


def test_sampled_distillation_reads_the_teachers_log_probs_from_its_head():
    """estimator='sampled' without teacher_logp: the policy's log-probs at the sampled tokens come from the
    teacher's head (the same pass), giving the loss that passing them gives."""
    student, teacher, ids, mask, old, rollout, adv = _case()
    t_logp = logprobs_at(Head(*teacher), ids.reshape(-1)).reshape(ids.shape).detach()
    got = rollout_model_loss(Head(*student), Head(*teacher), ids, mask, adv, old, rollout, estimator="sampled")
    ref = rollout_model_loss(Head(*student), Head(*teacher), ids, mask, adv, old, rollout, estimator="sampled",
                             teacher_logp=t_logp)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="response positions"):
        rollout_model_loss(Head(*student), Head(*teacher), ids[:, :2], mask[:, :2], adv, old[:, :2], rollout[:, :2])
