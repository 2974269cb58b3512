"""Tests of jackpot.core.losses (PPO per token, aggregation, distillation KL) and core.advantages.

Vectorised ≡ float64 loops (tests/reference.py); hand-worked numbers; the aggregation invariants
(token-mean vs token-mean-all differ by the acceptance rate; 1×8 ≡ 8×1 micro-batching); the chunked
distillation KL ≡ the unchunked reference for several chunk sizes, and gradcheck of its custom backward.
"""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch

from jackpot.core.advantages import group_advantages
from jackpot.core.head import Head, kl_from_hidden
from jackpot.core.losses import AGGREGATIONS, aggregate, distill_kl_at, loss_denominator, ppo_token_loss

INF = math.inf
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}
MODES = list(AGGREGATIONS)
V = 13
CHUNKS = [1, 4, 5, 13, 100]  # 4, 5 do not divide 13; 100 > V


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(actual: torch.Tensor, expected, dtype) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64).reshape(actual.shape)
    torch.testing.assert_close(actual.double(), expected, **TOL[dtype])


# --------------------------------------------------------------------------------------------------
# PPO per token
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("eps", "eps_high"), [(0.2, None), (0.2, 0.28), (0.1, 0.5), (None, None)])
@pytest.mark.parametrize("adv_per_token", [True, False])
@pytest.mark.parametrize("dual_clip", [None, 1.5])
def test_ppo_token_loss_matches_reference(dtype, eps, eps_high, adv_per_token, dual_clip):
    g = gen(1)
    old_lp = (torch.rand(4, 6, generator=g, dtype=torch.float64) * 0.9 + 0.05).log().to(dtype)
    new_lp = (
        (old_lp.double() + 0.6 * torch.randn(4, 6, generator=g, dtype=torch.float64)).clamp_max(0).to(dtype)
    )
    adv = torch.randn((4, 6) if adv_per_token else (4,), generator=g, dtype=torch.float64).to(dtype)
    loss, diag = ppo_token_loss(new_lp, old_lp, adv, clip_eps=eps, clip_eps_high=eps_high, dual_clip=dual_clip)
    adv_full = adv if adv_per_token else adv.unsqueeze(-1).expand(4, 6)
    high = eps if eps_high is None else eps_high
    expected = [
        [ref.ppo_loss_token(n, r, a, eps, high, dual_clip) for n, r, a in zip(nr, rr, ar, strict=True)]
        for nr, rr, ar in zip(ref.rows(new_lp), ref.rows(old_lp), ref.rows(adv_full), strict=True)
    ]
    close(loss, expected, dtype)
    close(diag["ratio"], (new_lp.double() - old_lp.double()).exp(), dtype)
    assert not diag["ratio"].requires_grad and not diag["clipped"].requires_grad


def test_ppo_gradient_flows_only_through_unclipped_tokens():
    # d loss / d log p_new = -ratio * A where the unclipped term is active, 0 where the clip binds
    g = gen(2)
    old_lp = torch.full((2, 8), math.log(0.3), dtype=torch.float64, requires_grad=True)
    new_lp = (old_lp.detach() + 0.5 * torch.randn(2, 8, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(2, 8, generator=g, dtype=torch.float64)
    loss, diag = ppo_token_loss(new_lp, old_lp, adv, clip_eps=0.2)
    loss.sum().backward()
    ratio = (new_lp - old_lp).detach().exp()
    expected = torch.where(diag["clipped"] > 0, torch.zeros_like(ratio), -ratio * adv)
    torch.testing.assert_close(new_lp.grad, expected)
    assert old_lp.grad is None  # p_old is a constant
    assert 0 < diag["clipped"].sum() < diag["clipped"].numel()


def test_hand_ppo():
    # ratio 1.5, eps 0.2: A = +1 -> -min(1.5, 1.2) = -1.2 (clipped); A = -1 -> -min(-1.5, -1.2) = 1.5
    # ratio 0.5: A = +1 -> -min(0.5, 0.8) = -0.5; A = -1 -> -min(-0.5, -0.8) = 0.8 (clipped)
    new = torch.tensor([[math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5)]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=torch.float64)
    loss, diag = ppo_token_loss(new, torch.zeros_like(new), adv, clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 1.5, -0.5, 0.8]], dtype=torch.float64))
    torch.testing.assert_close(diag["clipped"], torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64))
    # asymmetric clip (eps_low .2, eps_high .6): ratio 1.5 with A = +1 is inside [0.8, 1.6] -> -1.5
    loss, _ = ppo_token_loss(new, torch.zeros_like(new), adv, clip_eps=0.2, clip_eps_high=0.6)
    assert loss[0, 0].item() == pytest.approx(-1.5)
    # no clip: -ratio * A = (-1.5, 1.5, -0.5, 0.5)
    loss, _ = ppo_token_loss(new, torch.zeros_like(new), adv, clip_eps=None)
    torch.testing.assert_close(loss, torch.tensor([[-1.5, 1.5, -0.5, 0.5]], dtype=torch.float64))


def test_hand_dual_clip():
    # verl's clip_ratio_c: for A < 0 the loss is at most -c * A. Ratios (4, 4, 0.5), A = (-1, +1, -1), eps 0.2:
    # PPO gives (4, -1.2, 0.8); with c = 3 the first is capped at 3 (and its gradient is 0), the others keep.
    new = torch.tensor([[math.log(4.0), math.log(4.0), math.log(0.5)]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[-1.0, 1.0, -1.0]], dtype=torch.float64)
    loss, diag = ppo_token_loss(new, torch.zeros_like(new), adv, clip_eps=0.2, dual_clip=3.0)
    torch.testing.assert_close(loss, torch.tensor([[3.0, -1.2, 0.8]], dtype=torch.float64))
    torch.testing.assert_close(diag["clipped_lower"], torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))
    loss.sum().backward()
    assert new.grad[0, 0].item() == 0.0
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_token_loss(new, torch.zeros_like(new), adv, dual_clip=1.0)


# --------------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------------
def _agg_inputs(seed: int, B: int = 8, T: int = 6, dtype=torch.float64):
    g = gen(seed)
    loss = torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)
    response = (torch.rand(B, T, generator=g) < 0.8).to(dtype)
    response[:, 0] = 1.0
    accept = (torch.rand(B, T, generator=g) < 0.6).to(dtype)
    return loss, response * accept, response


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm_len", [None, 10])
@pytest.mark.parametrize("fractional", [False, True])
def test_aggregate_matches_reference(dtype, mode, norm_len, fractional):
    loss, keep, resp = _agg_inputs(3, dtype=dtype)
    if fractional:  # the expected-mask ablation keeps a fraction a of each token
        keep = keep * torch.rand(keep.shape, generator=gen(9), dtype=torch.float64).to(dtype)
    got = aggregate(loss, keep, mode, response_mask=resp, norm_len=norm_len)
    expected = ref.aggregate_ref(
        ref.rows(loss), ref.rows(keep), mode, response_mask=ref.rows(resp), norm_len=norm_len
    )
    close(got, expected, dtype)


def test_hand_aggregate():
    # loss ((1, 2, 3), (4, 5, 6)); response ((1,1,1),(1,1,0)); keep ((1,0,1),(0,1,0)) -> kept losses 1, 3, 5
    # token-mean = 9/3 = 3;  token-mean-all = 9/5 = 1.8;  seq-mean-token-mean = ((1+3)/2 + 5/1)/2 = 3.5
    # seq-sum-norm = 9/(2*3) = 1.5, with norm_len 9: 9/18 = 0.5
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    resp = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    keep = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    assert aggregate(loss, keep, "token-mean").item() == pytest.approx(3.0)
    assert aggregate(loss, keep, "token-mean-all", response_mask=resp).item() == pytest.approx(1.8)
    assert aggregate(loss, keep, "seq-mean-token-mean").item() == pytest.approx(3.5)
    assert aggregate(loss, keep, "seq-sum-norm").item() == pytest.approx(1.5)
    assert aggregate(loss, keep, "seq-sum-norm", norm_len=9).item() == pytest.approx(0.5)
    assert aggregate(loss, keep, "token-mean", denominator=6.0).item() == pytest.approx(1.5)
    # verl's token-sum = 9 and seq-mean-token-sum = 9 / 2
    assert aggregate(loss, keep, "token-sum").item() == pytest.approx(9.0)
    assert aggregate(loss, keep, "seq-mean-token-sum").item() == pytest.approx(4.5)


@pytest.mark.parametrize("seed", range(5))
def test_token_mean_and_token_mean_all_differ_exactly_by_the_acceptance_rate(seed):
    loss, keep, resp = _agg_inputs(seed)
    accept_rate = keep.sum() / resp.sum()
    kept_mean = aggregate(loss, keep, "token-mean", response_mask=resp)
    all_mean = aggregate(loss, keep, "token-mean-all", response_mask=resp)
    torch.testing.assert_close(all_mean, kept_mean * accept_rate, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("micro", [1, 2, 4])
def test_micro_batches_with_the_global_denominator_sum_to_the_full_batch_loss(mode, micro):
    """1×8 ≡ 8×1 (and 2×4, 4×2): summing micro-batch losses aggregated with the mini-batch's denominator
    gives the full-batch loss and the same gradient."""
    loss, keep, resp = _agg_inputs(4)
    T = loss.shape[1]
    global_denominator = {
        "token-mean": keep.sum(),
        "token-mean-all": resp.sum(),
        "token-sum": 1.0,
        "seq-mean-token-mean": loss.shape[0],
        "seq-mean-token-sum": loss.shape[0],
        "seq-sum-norm": loss.shape[0] * T,
    }[mode]
    torch.testing.assert_close(loss_denominator(keep, mode, response_mask=resp),
                               torch.as_tensor(global_denominator, dtype=keep.dtype))
    x_full = loss.clone().requires_grad_()
    full = aggregate(x_full, keep, mode, response_mask=resp)
    full.backward()
    x_micro = loss.clone().requires_grad_()
    total = 0.0
    for rows in torch.arange(loss.shape[0]).split(micro):
        part = aggregate(
            x_micro[rows], keep[rows], mode, response_mask=resp[rows], denominator=global_denominator
        )
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(total, full.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(x_micro.grad, x_full.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("mode", MODES)
def test_masked_out_entries_never_leak_into_the_loss(mode):
    """A NaN/inf in the per-token loss at a token outside `keep` (padding, a rejected token) must not
    reach the aggregated loss or its gradient, in every mode."""
    loss, keep, resp = _agg_inputs(5)
    poisoned = loss.clone()
    poisoned[keep == 0] = math.nan
    poisoned[(keep == 0) & (resp == 0)] = INF
    expected = aggregate(loss, keep, mode, response_mask=resp)
    x = poisoned.clone().requires_grad_()
    got = aggregate(x, keep, mode, response_mask=resp)
    torch.testing.assert_close(got, expected)
    got.backward()
    assert not x.grad.isnan().any()


# --------------------------------------------------------------------------------------------------
# distillation KL: the sparse estimators (distill_kl_at); the exact one is the chunked head's (test_head.py)
# --------------------------------------------------------------------------------------------------
def _at(log_ps, ids):
    return log_ps.gather(-1, ids[..., None])[..., 0] if ids.dim() == log_ps.dim() - 1 else log_ps.gather(-1, ids)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_distill_sampled_expected_gradient_is_the_named_direction(direction):
    """E_{x ~ p_inf}[grad of the sampled estimator] = grad of the exact KL in that direction (no truncation).

    The expectation is taken exactly, by enumerating every token x with probability p_inf(x); p_inf is a
    third distribution, neither student nor teacher, so the importance weights are exercised.
    """
    g = gen(11)
    student = ref.make_logits(g, (1, 1, V), dtype=torch.float64)
    teacher_logits = ref.make_logits(g, (1, 1, V), dtype=torch.float64)
    behaviour_lp = ref.make_logp(g, (1, 1, V), dtype=torch.float64)
    teacher_lp = teacher_logits.log_softmax(-1)
    s = student.clone().requires_grad_(True)
    ref.distill_kl(s, teacher_logits, direction=direction).sum().backward()
    exact_grad = s.grad.clone()
    ids = torch.arange(V).view(1, V)  # every token, one position each
    s = student.expand(1, V, V).clone().requires_grad_(True)
    kl = distill_kl_at(_at(torch.log_softmax(s, -1), ids), direction=direction, estimator="sampled",
                       teacher_logp=teacher_lp[0, 0][ids], rollout_logp=behaviour_lp[0, 0][ids], is_cap=1e12)
    p_inf = behaviour_lp[0, 0].exp()
    expected_value = (kl * p_inf).sum()
    expected_value.backward()
    close(s.grad.sum(1, keepdim=True), exact_grad[0, 0], torch.float64)
    exact_value = ref.distill_kl(student, teacher_logits, direction=direction)
    close(expected_value.detach().view(1), exact_value.view(1), torch.float64)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_distill_topk_and_sampled_match_reference(direction, dtype):
    g = gen(10)
    B, T, K = 2, 3, 4
    student = ref.make_logits(g, (B, T, V), dtype=dtype)
    teacher_lp = ref.make_logp(g, (B, T, V), dtype=dtype)
    behaviour_lp = ref.make_logp(g, (B, T, V), dtype=dtype)
    t_lp, t_ids = teacher_lp.topk(K, -1)
    log_ps = torch.log_softmax(student, -1)
    kl_topk = distill_kl_at(_at(log_ps, t_ids), direction=direction, estimator="topk", teacher_logp=t_lp)
    x = torch.randint(0, V, (B, T), generator=g)
    kl_s = distill_kl_at(_at(log_ps, x), direction=direction, estimator="sampled", teacher_logp=_at(teacher_lp, x),
                         rollout_logp=_at(behaviour_lp, x), is_cap=1.5)
    exp_topk, exp_s = [], []
    for s_row, t_row, b_row, ids, xi in zip(
        ref.rows(student),
        ref.rows(teacher_lp),
        ref.rows(behaviour_lp),
        ref.rows(t_ids),
        ref.flat(x),
        strict=True,
    ):
        ls = ref.log_softmax(s_row)
        terms = []
        for i in (int(v) for v in ids):
            lt, lsi = t_row[i], ls[i]
            terms.append(math.exp(lt) * (lt - lsi) if direction == "forward" else math.exp(lsi) * (lsi - lt))
        exp_topk.append(sum(terms))
        xi = int(xi)
        log_rho = t_row[xi] - ls[xi]
        if direction == "reverse":  # min(p_s/p_inf, cap) * k3, k3 = (rho - 1) - log rho, rho = p_t/p_s
            exp_s.append(min(math.exp(ls[xi] - b_row[xi]), 1.5) * (math.exp(log_rho) - 1.0 - log_rho))
        else:  # min(p_t/p_inf, cap) * (log p_t - log p_s)
            exp_s.append(min(math.exp(t_row[xi] - b_row[xi]), 1.5) * log_rho)
    close(kl_topk, exp_topk, dtype)
    close(kl_s, exp_s, dtype)


def test_hand_distill_full():
    # V = 2: p_teacher = (.5, .5), p_student = (.8, .2) (logits log .8, log .2), the chunked head's exact KL
    # forward KL(p_t || p_s) = .5 log(.5/.8) + .5 log(.5/.2) = .5 (log .625 + log 2.5) = .5 log 1.5625
    #                        = 0.2231436
    # reverse KL(p_s || p_t) = .8 log 1.6 + .2 log .4 = 0.3760085 - 0.1832581 = 0.1927504
    one = torch.ones(1, 1, dtype=torch.float64)
    s = Head(one, torch.tensor([[math.log(0.8)], [math.log(0.2)]], dtype=torch.float64))
    t = Head(one, torch.zeros(2, 1, dtype=torch.float64))
    assert kl_from_hidden(s, t).item() == pytest.approx(0.5 * math.log(1.5625), rel=1e-12)
    assert kl_from_hidden(s, t, reverse=True).item() == pytest.approx(0.8 * math.log(1.6) + 0.2 * math.log(0.4),
                                                                      rel=1e-12)
    assert kl_from_hidden(t, t, chunk=1).abs().item() < 1e-15  # identical -> 0


# --------------------------------------------------------------------------------------------------
# advantages
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["grpo", "drgrpo", "rloo"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [2, 5])
def test_group_advantages_match_reference(mode, dtype, group):
    g = gen(11)
    rewards = torch.randn(4, group, generator=g, dtype=torch.float64).to(dtype)
    rewards[3] = 0.7  # a group with equal rewards
    got = group_advantages(rewards, mode=mode, eps=1e-6)
    close(got, ref.group_advantages_ref(ref.rows(rewards), mode, 1e-6), dtype)
    assert (got[3] == 0).all()


def test_hand_group_advantages():
    # rewards (1, 0, 0, 1): mean .5, unbiased std sqrt(4 * .25 / 3) = 0.5773503
    # grpo: +-.5/.5773503 = +-0.8660254; drgrpo: +-.5; rloo: 1 - 1/3 = 2/3, 0 - 2/3 = -2/3
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    s = 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(
        group_advantages(r, mode="grpo", eps=0.0), torch.tensor([[s, -s, -s, s]], dtype=torch.float64)
    )
    torch.testing.assert_close(
        group_advantages(r, mode="drgrpo"), torch.tensor([[0.5, -0.5, -0.5, 0.5]], dtype=torch.float64)
    )
    torch.testing.assert_close(
        group_advantages(r, mode="rloo"), torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3]], dtype=torch.float64)
    )


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
def test_bad_input_raises_value_error_naming_the_argument():
    lp = torch.full((2, 3), -1.0)
    nan_lp = lp.clone()
    nan_lp[0, 0] = math.nan
    with pytest.raises(ValueError, match="shape mismatch"):
        ppo_token_loss(lp, lp[:, :2], torch.zeros(2, 3))
    with pytest.raises(ValueError, match="shape mismatch"):
        ppo_token_loss(lp, lp, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="new_logp contains NaN"):
        ppo_token_loss(nan_lp, lp, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="old_logp contains NaN"):
        ppo_token_loss(lp, nan_lp, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="loss aggregation must be one of"):
        aggregate(lp, torch.ones(2, 3), "mean")
    with pytest.raises(ValueError, match="shape mismatch"):
        aggregate(lp, torch.ones(2, 2))
    with pytest.raises(ValueError, match="shape mismatch"):
        aggregate(lp, torch.ones(2, 3), "token-mean-all", response_mask=torch.ones(3, 2))
    with pytest.raises(ValueError, match="direction must be one of"):
        distill_kl_at(lp, direction="both", teacher_logp=lp)
    with pytest.raises(ValueError, match="estimator must be 'topk' or 'sampled'"):
        distill_kl_at(lp, estimator="full", teacher_logp=lp)
    with pytest.raises(ValueError, match="needs rollout_logp"):
        distill_kl_at(lp, estimator="sampled", teacher_logp=lp)
    with pytest.raises(ValueError, match="shape mismatch"):
        distill_kl_at(lp, estimator="topk", teacher_logp=lp[:, :2])
    with pytest.raises(ValueError, match="mode must be one of"):
        group_advantages(torch.zeros(2, 4), mode="ppo")
    with pytest.raises(ValueError, match="rewards contains NaN"):
        group_advantages(torch.tensor([[0.0, math.nan]]))
    with pytest.raises(ValueError, match="rewards must be"):
        group_advantages(torch.zeros(8))
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_advantages(torch.zeros(3, 1))
