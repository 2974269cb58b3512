"""Tests of jackpot.core.divergences: k1/k2/k3, ESS, mismatch metrics, exact KL / TV, p'_inf.

Vectorised ≡ float64 loops (tests/reference.py); hand-worked numbers; properties (k3 >= 0, KL >= 0,
Pinsker, KL(p_tgt||p'_inf) <= KL(p_tgt||p_inf) through post_rejection_logp); edges; bad input.
"""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jackpot.core.divergences import (
    effective_sample_size,
    exact_kl,
    kl_estimators,
    mismatch_metrics,
    post_rejection_logp,
    total_variation,
)

INF = math.inf
DTYPES = [torch.float32, torch.float64]
LEAD_SHAPES = [(), (5,), (2, 3)]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(actual: torch.Tensor, expected, dtype) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64).reshape(actual.shape)
    torch.testing.assert_close(actual.double(), expected, **TOL[dtype])


def sampled(seed: int, dtype, shape=(4, 6)):
    g = gen(seed)
    tgt = (torch.rand(shape, generator=g, dtype=torch.float64) * 0.95 + 0.05).log().to(dtype)
    roll = (torch.rand(shape, generator=g, dtype=torch.float64) * 0.95 + 0.05).log().to(dtype)
    mask = (torch.rand(shape, generator=g) < 0.8).to(dtype)
    mask[:, 0] = 1.0
    return tgt, roll, mask


# --------------------------------------------------------------------------------------------------
# vectorised == reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_estimators_and_ess_match_reference(dtype):
    tgt, roll, mask = sampled(1, dtype)
    got = kl_estimators(tgt, roll, mask)
    for k, v in ref.kl_estimators_ref(tgt, roll, mask).items():
        close(got[k], v, dtype)
    w = (tgt - roll).exp()
    close(effective_sample_size(w, mask), ref.ess_ref(w, mask), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mismatch_metrics_match_reference(dtype):
    tgt, roll, mask = sampled(2, dtype)
    got = mismatch_metrics(tgt, roll, mask, low=0.5, high=2.0)
    expected = ref.mismatch_ref(tgt, roll, mask, low=0.5, high=2.0)
    assert set(got) == set(expected)
    for k, v in expected.items():
        close(got[k], v, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", LEAD_SHAPES)
@pytest.mark.parametrize("lam", [0.5, 1.0, 3.0])
def test_exact_kl_tv_and_post_rejection_match_reference(dtype, lead, lam):
    g = gen(3)
    p = ref.make_logp(g, (*lead, 11), dtype=dtype, zero_frac=0.2)
    q = ref.make_logp(g, (*lead, 11), dtype=dtype, zero_frac=0.2)
    p_rows, q_rows = ref.rows(p), ref.rows(q)
    probs = lambda row: [ref.exp(v) for v in row]  # noqa: E731
    close(
        exact_kl(p, q), [ref.kl_probs(probs(a), probs(b)) for a, b in zip(p_rows, q_rows, strict=True)], dtype
    )  # may be +inf
    close(
        total_variation(p, q),
        [ref.tv_probs(probs(a), probs(b)) for a, b in zip(p_rows, q_rows, strict=True)],
        dtype,
    )
    post = post_rejection_logp(p, q, lam)
    assert post.shape == p.shape
    close(post.exp(), [ref.post_rejection_row(a, b, lam) for a, b in zip(p_rows, q_rows, strict=True)], dtype)


# --------------------------------------------------------------------------------------------------
# hand-worked cases
# --------------------------------------------------------------------------------------------------
def test_hand_kl_estimators_and_ess():
    # two tokens with rho = p_other/p_sample = (2, 0.5): log rho = (+l, -l), l = log 2 = 0.6931472
    # k1 = mean(-log rho) = 0;  k2 = mean(l^2/2) = 0.2402265;  k3 = mean((2-1-l), (.5-1+l)) = (0.3068528
    # + 0.1931472)/2 = 0.25
    sample = torch.tensor([[math.log(0.25), math.log(0.5)]], dtype=torch.float64)
    other = torch.tensor([[math.log(0.5), math.log(0.25)]], dtype=torch.float64)
    out = kl_estimators(other, sample, torch.ones(1, 2))
    assert out["kl_k1"].item() == pytest.approx(0.0, abs=1e-15)
    assert out["kl_k2"].item() == pytest.approx(0.5 * math.log(2) ** 2, rel=1e-12)
    assert out["kl_k3"].item() == pytest.approx(0.25, rel=1e-12)
    # ESS of weights (2, 0.5): (2.5)^2 / (2 * 4.25) = 6.25/8.5 = 0.7352941; uniform -> 1; one nonzero -> 1/n
    assert effective_sample_size(torch.tensor([2.0, 0.5]), torch.ones(2)).item() == pytest.approx(6.25 / 8.5)
    assert effective_sample_size(torch.full((7,), 3.0), torch.ones(7)).item() == pytest.approx(1.0)
    assert effective_sample_size(torch.tensor([0.0, 0.0, 5.0, 0.0]), torch.ones(4)).item() == pytest.approx(
        0.25
    )
    # masked-out weights do not count: (2, 0.5, [99]) -> same as (2, 0.5)
    assert effective_sample_size(
        torch.tensor([2.0, 0.5, 99.0]), torch.tensor([1.0, 1.0, 0.0])
    ).item() == pytest.approx(6.25 / 8.5)


def test_hand_exact_kl_tv_post_rejection():
    # p = (.2, .3, .5), q = (.5, .3, .2): KL(p||q) = .2 log .4 + .5 log 2.5 = 0.2748872
    # TV = .5 (.3 + 0 + .3) = 0.3
    p = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64).log()
    q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).log()
    assert exact_kl(p, q).item() == pytest.approx(0.2 * math.log(0.4) + 0.5 * math.log(2.5), rel=1e-12)
    assert total_variation(p, q).item() == pytest.approx(0.3, rel=1e-12)
    # OBRS of q toward p with lam = 1: p' = (.2, .3, .2)/.7
    torch.testing.assert_close(
        post_rejection_logp(p, q, 1.0).exp(), torch.tensor([0.2, 0.3, 0.2], dtype=torch.float64) / 0.7
    )
    # q = 0 < p: KL = +inf; p = 0: the term is 0
    assert exact_kl(torch.tensor([0.0, -INF]), torch.tensor([-INF, 0.0])).item() == INF
    assert exact_kl(
        torch.tensor([0.0, -INF]), torch.tensor([math.log(0.5), math.log(0.5)])
    ).item() == pytest.approx(math.log(2))


# --------------------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------------------
logits = st.lists(st.floats(-6.0, 6.0, allow_nan=False), min_size=2, max_size=10)


@settings(max_examples=40, deadline=None)
@given(logits, st.data(), st.floats(1e-2, 1e2))
def test_property_divergence_inequalities(t, data, lam):
    i = data.draw(st.lists(st.floats(-6.0, 6.0, allow_nan=False), min_size=len(t), max_size=len(t)))
    p = torch.log_softmax(torch.tensor(t, dtype=torch.float64), -1)
    q = torch.log_softmax(torch.tensor(i, dtype=torch.float64), -1)
    kl, tv = exact_kl(p, q).item(), total_variation(p, q).item()
    assert kl >= -1e-12 and 0.0 <= tv <= 1.0 + 1e-12
    assert tv <= math.sqrt(max(kl, 0.0) / 2) + 1e-9  # Pinsker (kl may round to -1e-17)
    assert abs(exact_kl(p, p).item()) < 1e-12 and total_variation(p, p).item() == 0.0
    # the OBRS theorem through the explicit post-rejection distribution
    assert exact_kl(p, post_rejection_logp(p, q, lam)).item() <= kl + 1e-12
    # k3 is non-negative per token (up to rounding: (rho - 1) - log rho at rho = 1 + 2e-16)
    k3 = kl_estimators(p.unsqueeze(0), q.unsqueeze(0), torch.ones(1, len(t)))["kl_k3"].item()
    assert k3 >= -1e-15


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.just(0.0), st.floats(1e-150, 100.0)), min_size=1, max_size=20))  # w^2 > tiny
def test_property_ess_in_unit_interval(ws):
    w = torch.tensor(ws, dtype=torch.float64)
    ess = effective_sample_size(w, torch.ones_like(w)).item()
    if w.sum() > 0:
        assert 1.0 / len(ws) - 1e-12 <= ess <= 1.0 + 1e-12


# --------------------------------------------------------------------------------------------------
# edges
# --------------------------------------------------------------------------------------------------
def test_neg_inf_logprobs_give_no_nan():
    tgt, roll, mask = sampled(4, torch.float64)
    mask[0, -2:] = 0.0
    tgt[0, -2:], roll[0, -2:] = -INF, -INF  # padding stored as -inf in both
    roll[1, -1] = -INF  # padding with -inf in the rollout only
    mask[1, -1] = 0.0
    tgt[2, 1] = -INF  # p_tgt = 0 at a sampled token
    for out in (kl_estimators(tgt, roll, mask), mismatch_metrics(tgt, roll, mask)):
        for k, v in out.items():
            assert not v.isnan().any(), k
    p = torch.tensor([[0.0, -INF, -1.0, -INF], [-INF, 0.0, -INF, -2.0]], dtype=torch.float64)
    q = torch.tensor([[-INF, -0.5, -1.0, -INF], [-1.0, -INF, -INF, -2.0]], dtype=torch.float64)
    p, q = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    for out in (exact_kl(p, q), exact_kl(q, p), total_variation(p, q), post_rejection_logp(p, q, 0.7)):
        assert not out.isnan().any()


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
def test_bad_input_raises_value_error_naming_the_argument():
    tgt, roll, mask = sampled(5, torch.float64)
    nan_lp = tgt.clone()
    nan_lp[0, 0] = math.nan
    with pytest.raises(ValueError, match="shape mismatch"):
        kl_estimators(tgt, roll[:, :3], mask)
    with pytest.raises(ValueError, match="shape mismatch"):
        mismatch_metrics(tgt, roll, mask[:2])
    with pytest.raises(ValueError, match="shape mismatch"):
        effective_sample_size(tgt, mask[:, :2])
    with pytest.raises(ValueError, match="shape mismatch"):
        exact_kl(tgt, roll[:2])
    with pytest.raises(ValueError, match="shape mismatch"):
        total_variation(tgt, roll[:, :1])
    with pytest.raises(ValueError, match="shape mismatch"):
        post_rejection_logp(tgt, roll[0], 1.0)  # would broadcast silently
    with pytest.raises(ValueError, match="other_logp contains NaN"):
        kl_estimators(nan_lp, roll, mask)
    with pytest.raises(ValueError, match="sample_logp contains NaN"):
        kl_estimators(tgt, nan_lp, mask)
    with pytest.raises(ValueError, match="p_logp contains NaN"):
        exact_kl(nan_lp, roll)
    with pytest.raises(ValueError, match="q_logp contains NaN"):
        total_variation(tgt, nan_lp)
    with pytest.raises(ValueError, match="target_logp contains NaN"):
        post_rejection_logp(nan_lp, roll, 1.0)
    for lam in (0.0, -1.0, math.nan, INF):
        with pytest.raises(ValueError, match="lam"):
            post_rejection_logp(tgt, roll, lam)


# --------------------------------------------------------------------------------------------------
# agreement with verl's rollout_corr metrics (rollout_corr_helper.compute_offpolicy_metrics)
# --------------------------------------------------------------------------------------------------
def test_chi2_seq_clamps_the_sequence_sum_not_each_token():
    # log r = [+30, -25]: the sequence sum is 5, so chi2_seq = e^10 - 1 (verl); clamping each token to
    # +-20 first would give a sum of 0 and chi2_seq = 0.
    tgt = torch.tensor([[-1.0, -30.0]], dtype=torch.float64)
    roll = torch.tensor([[-31.0, -5.0]], dtype=torch.float64)
    got = mismatch_metrics(tgt, roll, torch.ones(1, 2, dtype=torch.float64))
    assert got["chi2_seq"].item() == pytest.approx(math.exp(10.0) - 1.0, rel=1e-12)


def test_chi2_seq_with_a_zero_target_probability_token_is_minus_one():
    tgt = torch.tensor([[-INF, -1.0]], dtype=torch.float64)
    roll = torch.tensor([[-2.0, -1.0]], dtype=torch.float64)
    got = mismatch_metrics(tgt, roll, torch.ones(1, 2, dtype=torch.float64))
    assert got["chi2_seq"].item() == pytest.approx(-1.0, abs=1e-12)


def test_ess_ignores_nan_and_inf_at_masked_out_positions():
    w = torch.tensor([[1.0, 2.0, math.nan, math.inf]], dtype=torch.float64)
    m = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    # (1 + 2)^2 / (2 * (1 + 4)) = 0.9
    assert effective_sample_size(w, m).item() == pytest.approx(0.9, rel=1e-12)


def test_log_ppl_diff_has_verls_sign_and_ppl_ratio_is_its_exponential():
    # rollout mean log-prob -1, target mean log-prob -2: verl's log_ppl_diff = -1 - (-2) = +1
    tgt = torch.tensor([[-2.0, -2.0]], dtype=torch.float64)
    roll = torch.tensor([[-0.5, -1.5]], dtype=torch.float64)
    got = mismatch_metrics(tgt, roll, torch.ones(1, 2, dtype=torch.float64))
    assert got["log_ppl_diff"].item() == pytest.approx(1.0, rel=1e-12)
    assert got["log_ppl_abs_diff"].item() == pytest.approx(1.0, rel=1e-12)
    assert got["ppl_ratio"].item() == pytest.approx(math.e, rel=1e-12)  # target ppl e^2 over rollout ppl e^1
