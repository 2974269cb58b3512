"""Tests of jackpot.core.obrs: OBRS acceptance, Z, KL, top-k + kappa, lambda for a budget.

Layers (STYLE.md §9): vectorised ≡ the float64 loops of tests/reference.py; hand-worked cases;
hypothesis properties (the KL theorem, monotonicity, budgets); edges; bad input.
"""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jackpot.core.obrs import (
    acceptance_prob,
    batch_lambda,
    kappa,
    lambda_for_budget,
    normalizer,
    normalizer_from_logits,
    obrs_kl_from_logits,
    topk_normalizer,
)

INF = math.inf
DTYPES = [torch.float32, torch.float64]
LEAD_SHAPES = [(), (5,), (2, 3), (2, 1, 3)]
V = 17
CHUNKS = [1, 4, 7, 17, 64]  # 4 and 7 do not divide V = 17; 64 > V
# float64: 1e-6 relative is asked for, we get ~1e-12; float32 carries ~1e-7 per op over V terms.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}
PROPS = settings(max_examples=40, deadline=None)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(actual: torch.Tensor, expected, dtype: torch.dtype) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64).reshape(actual.shape)
    torch.testing.assert_close(actual.double(), expected, **TOL[dtype])


def pair(seed: int, shape, dtype, zero_frac: float = 0.2):
    g = gen(seed)
    return (
        ref.make_logp(g, shape, dtype=dtype, zero_frac=zero_frac),
        ref.make_logp(g, shape, dtype=dtype, zero_frac=zero_frac),
    )


# --------------------------------------------------------------------------------------------------
# vectorised == reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", LEAD_SHAPES)
@pytest.mark.parametrize("lam", [0.3, 1.0, 4.0])
def test_acceptance_and_normalizer_match_reference(dtype, lead, lam):
    tgt, inf = pair(1, (*lead, V), dtype)
    a = acceptance_prob(tgt, inf, lam)
    assert a.shape == tgt.shape and a.dtype == dtype
    expected_a = [
        [ref.acceptance(lt, li, lam) for lt, li in zip(rt, ri, strict=True)]
        for rt, ri in zip(ref.rows(tgt), ref.rows(inf), strict=True)
    ]
    close(a, expected_a, dtype)
    z = normalizer(tgt, inf, lam)
    assert z.shape == tgt.shape[:-1]
    close(z, [ref.z_row(rt, ri, lam) for rt, ri in zip(ref.rows(tgt), ref.rows(inf), strict=True)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_normalizer_with_per_state_lambda_tensor(dtype):
    tgt, inf = pair(2, (3, 4, V), dtype)
    lam = torch.rand(3, 4, 1, generator=gen(3), dtype=dtype) * 3 + 0.1
    z = normalizer(tgt, inf, lam)
    expected = [
        ref.z_row(rt, ri, lv) for rt, ri, lv in zip(ref.rows(tgt), ref.rows(inf), ref.flat(lam), strict=True)
    ]
    close(z, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", LEAD_SHAPES)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_z_and_kl_from_logits_match_reference(dtype, lead, chunk):
    g = gen(4)
    t_logits = ref.make_logits(g, (*lead, V), dtype=dtype, zero_frac=0.1)
    r_logits = ref.make_logits(g, (*lead, V), dtype=dtype, zero_frac=0.1)
    lam = 1.7
    t_rows = [ref.log_softmax(row) for row in ref.rows(t_logits)]
    r_rows = [ref.log_softmax(row) for row in ref.rows(r_logits)]
    expected = [ref.obrs_kl_row(rt, ri, lam) for rt, ri in zip(t_rows, r_rows, strict=True)]

    z = normalizer_from_logits(t_logits, r_logits, lam, chunk_size=chunk)
    assert z.shape == t_logits.shape[:-1] and z.dtype == dtype
    close(z, [e[0] for e in expected], dtype)

    z2, kl_before, kl_after = obrs_kl_from_logits(t_logits, r_logits, lam, chunk_size=chunk)
    close(z2, [e[0] for e in expected], dtype)
    close(kl_before, [e[1] for e in expected], dtype)  # +inf where p_tgt has mass outside supp p_inf
    close(kl_after, [e[2] for e in expected], dtype)


def test_chunked_paths_upcast_bfloat16_chunk_by_chunk():
    g = gen(5)
    t_logits = ref.make_logits(g, (3, 40)).to(torch.bfloat16)
    r_logits = ref.make_logits(g, (3, 40)).to(torch.bfloat16)
    t_rows = [ref.log_softmax(row) for row in ref.rows(t_logits)]
    r_rows = [ref.log_softmax(row) for row in ref.rows(r_logits)]
    z = normalizer_from_logits(t_logits, r_logits, 1.0, chunk_size=16)
    assert z.dtype == torch.float32  # half precision is computed (and returned) in float32
    close(z, [ref.z_row(a, b, 1.0) for a, b in zip(t_rows, r_rows, strict=True)], torch.float32)
    _, kl_before, kl_after = obrs_kl_from_logits(t_logits, r_logits, 1.0, chunk_size=16)
    close(
        kl_before, [ref.obrs_kl_row(a, b, 1.0)[1] for a, b in zip(t_rows, r_rows, strict=True)], torch.float32
    )
    close(
        kl_after, [ref.obrs_kl_row(a, b, 1.0)[2] for a, b in zip(t_rows, r_rows, strict=True)], torch.float32
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", LEAD_SHAPES)
@pytest.mark.parametrize("budget", [0.05, 0.3, 0.7, 0.95, 1.0])
def test_lambda_for_budget_matches_bisection(dtype, lead, budget):
    tgt, inf = pair(6, (*lead, V), dtype)
    lam = lambda_for_budget(tgt, inf, budget)
    assert lam.shape == tgt.shape[:-1] and lam.dtype == dtype
    expected = [
        ref.lambda_bisect_row(rt, ri, budget) for rt, ri in zip(ref.rows(tgt), ref.rows(inf), strict=True)
    ]
    torch.testing.assert_close(
        lam.double(), torch.tensor(expected, dtype=torch.float64).reshape(lam.shape), rtol=1e-6, atol=0.0
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("budget", [0.1, 0.5, 0.9, 1.0])
def test_batch_lambda_matches_bisection(dtype, budget):
    g = gen(7)
    log_r = (torch.randn(4, 9, generator=g, dtype=torch.float64) * 1.5).to(dtype)
    log_r[0, 3] = -INF  # p_tgt = 0 at a sampled token
    mask = (torch.rand(4, 9, generator=g) < 0.8).float()
    lam = batch_lambda(log_r, mask, budget)
    assert lam.dim() == 0 and lam.dtype == dtype
    ratios = [math.exp(v) for v, m in zip(ref.flat(log_r), ref.flat(mask), strict=True) if m > 0]
    torch.testing.assert_close(
        lam.double(),
        torch.tensor(ref.batch_lambda_bisect(ratios, budget), dtype=torch.float64),
        rtol=1e-6,
        atol=0.0,
    )


def _topk_inputs(seed: int, lead, vocab: int, k: int, dtype, scale: float = 2.0):
    g = gen(seed)
    tgt = ref.make_logp(g, (*lead, vocab), dtype=dtype, scale=scale)
    inf = ref.make_logp(g, (*lead, vocab), dtype=dtype, scale=scale)
    r_lp, r_ids = inf.topk(k, dim=-1)
    t_lp, t_ids = tgt.topk(k, dim=-1)
    return (
        tgt,
        inf,
        dict(
            rollout_topk_ids=r_ids,
            rollout_topk_logp=r_lp,
            target_logp_at_rollout_topk=tgt.gather(-1, r_ids),
            target_topk_ids=t_ids,
            target_topk_logp=t_lp,
            rollout_logp_at_target_topk=inf.gather(-1, t_ids),
        ),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", LEAD_SHAPES)
def test_topk_normalizer_matches_loop_over_the_union(dtype, lead):
    tgt, inf, kw = _topk_inputs(8, lead, 30, 5, dtype)
    lam = 0.8
    z_union = topk_normalizer(**kw, lam=lam)
    kw_rollout_only = {
        k: kw[k] for k in ("rollout_topk_ids", "rollout_topk_logp", "target_logp_at_rollout_topk")
    }
    z_rollout = topk_normalizer(**kw_rollout_only, lam=lam)
    exp_union, exp_rollout = [], []
    for rt, ri, rid, tid in zip(
        ref.rows(tgt),
        ref.rows(inf),
        ref.rows(kw["rollout_topk_ids"]),
        ref.rows(kw["target_topk_ids"]),
        strict=True,
    ):
        union = {int(i) for i in rid} | {int(i) for i in tid}
        exp_union.append(sum(min(ref.exp(ri[i]), ref.exp(rt[i]) / lam) for i in union))
        exp_rollout.append(sum(min(ref.exp(ri[int(i)]), ref.exp(rt[int(i)]) / lam) for i in rid))
    close(z_union, exp_union, dtype)
    close(z_rollout, exp_rollout, dtype)


def test_kappa_matches_loop_and_is_clamped_at_one():
    g = gen(9)
    a = torch.rand(3, 6, generator=g, dtype=torch.float64)
    z = torch.rand(3, 6, generator=g, dtype=torch.float64) * 0.5
    m = (torch.rand(3, 6, generator=g) < 0.7).float()
    sa = sum(x for x, mm in zip(ref.flat(a), ref.flat(m), strict=True) if mm > 0)
    sz = sum(x for x, mm in zip(ref.flat(z), ref.flat(m), strict=True) if mm > 0)
    torch.testing.assert_close(kappa(a, z, m), torch.tensor(max(sa / sz, 1.0), dtype=torch.float64))
    # Z_approx above the acceptance (cannot happen for an under-estimate): kappa clamps to 1
    assert kappa(torch.full((2, 2), 0.3), torch.full((2, 2), 0.6), torch.ones(2, 2)).item() == 1.0


# --------------------------------------------------------------------------------------------------
# hand-worked cases
# --------------------------------------------------------------------------------------------------
# p_inf = (0.5, 0.3, 0.2), p_tgt = (0.2, 0.3, 0.5)  =>  r = p_tgt/p_inf = (0.4, 1, 2.5)
P_INF = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).log()
P_TGT = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64).log()


def test_hand_3_token_acceptance_and_z():
    # lam = 1: a = min(1, r) = (0.4, 1, 1); Z = min(.5,.2) + min(.3,.3) + min(.2,.5) = .2 + .3 + .2 = 0.7
    torch.testing.assert_close(
        acceptance_prob(P_TGT, P_INF, 1.0), torch.tensor([0.4, 1.0, 1.0], dtype=torch.float64)
    )
    torch.testing.assert_close(normalizer(P_TGT, P_INF, 1.0), torch.tensor(0.7, dtype=torch.float64))
    # Z is the expected acceptance: sum p_inf * a = .5*.4 + .3*1 + .2*1 = 0.7
    # lam = 2: a = min(1, r/2) = (0.2, 0.5, 1); Z = min(.5,.1) + min(.3,.15) + min(.2,.25) = 0.45
    torch.testing.assert_close(
        acceptance_prob(P_TGT, P_INF, 2.0), torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)
    )
    torch.testing.assert_close(normalizer(P_TGT, P_INF, 2.0), torch.tensor(0.45, dtype=torch.float64))


def test_hand_3_token_kl_before_and_after():
    # KL(p_tgt||p_inf) = .2 log .4 + .3 log 1 + .5 log 2.5 = -0.1832581 + 0.4581454 = 0.2748872
    # lam = 1: p'_inf = (.2, .3, .2)/.7;  closed form log Z + E_tgt[log max(r, 1)] = log .7 + .5 log 2.5
    #        = -0.3566749 + 0.4581454 = 0.1014704  (and directly: .5 log .7 + .5 log(2.5*.7) = the same)
    z, before, after = obrs_kl_from_logits(P_TGT, P_INF, 1.0, chunk_size=2)
    torch.testing.assert_close(z, torch.tensor(0.7, dtype=torch.float64))
    torch.testing.assert_close(
        before, torch.tensor(0.2 * math.log(0.4) + 0.5 * math.log(2.5), dtype=torch.float64)
    )
    torch.testing.assert_close(after, torch.tensor(math.log(0.7) + 0.5 * math.log(2.5), dtype=torch.float64))
    assert abs(after.item() - 0.1014704) < 1e-7 and abs(before.item() - 0.2748872) < 1e-7


@pytest.mark.parametrize(
    ("budget", "lam"),
    [
        # sorted r: 0.4 (q=.5, p=.2), 1 (q=.3, p=.3), 2.5 (q=.2, p=.5); P = (.2, .5, 1), Q = (.5, .8, 1)
        # A_k = P_k/r_k + 1 - Q_k = (1.0, 0.7, 0.4)
        (1.0, 0.4),  # k* = 1: lam = .2/(1 - 1 + .5) = 0.4 = r_min
        (0.7, 1.0),  # k* = 2: lam = .5/(.7 - 1 + .8) = 1;     Z(1) = 0.7
        (0.5, 5.0 / 3.0),  # k* = 2: lam = .5/(.5 - .2) = 5/3;      Z = .12 + .18 + .2 = 0.5
        (0.4, 2.5),  # k* = 3: lam = 1/.4 = 2.5;              Z = .08 + .12 + .2 = 0.4
        (0.2, 5.0),  # k* = 3: lam = 1/.2 = 5;                Z = .04 + .06 + .1 = 0.2
    ],
)
def test_hand_3_token_lambda_for_budget(budget, lam):
    got = lambda_for_budget(P_TGT, P_INF, budget)
    torch.testing.assert_close(got, torch.tensor(lam, dtype=torch.float64), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(
        normalizer(P_TGT, P_INF, got.item()), torch.tensor(budget, dtype=torch.float64)
    )


def test_hand_batch_lambda():
    # ratios (0.5, 1, 2, 4), budget 0.75. At lam = 1: mean(.5, 1, 1, 1) = .875;
    # at lam = 2: mean(.25, .5, 1, 1) = .6875;
    # on [1, 2]: (0.5/lam + 1/lam + 2)/4 = 0.75  =>  1.5/lam = 1  =>  lam = 1.5
    log_r = torch.tensor([[0.5, 1.0], [2.0, 4.0]], dtype=torch.float64).log()
    lam = batch_lambda(log_r, torch.ones(2, 2), 0.75)
    torch.testing.assert_close(lam, torch.tensor(1.5, dtype=torch.float64), rtol=1e-12, atol=0.0)
    # a masked token does not count: ratios (0.5, 1, 2) with budget 0.75: on [1, 2]: (1.5/lam + 1)/3 = .75
    # => lam = 1.2
    lam = batch_lambda(log_r, torch.tensor([[1.0, 1.0], [1.0, 0.0]]), 0.75)
    torch.testing.assert_close(lam, torch.tensor(1.2, dtype=torch.float64), rtol=1e-12, atol=0.0)


def test_hand_topk_and_kappa():
    # V = 4: p_inf = (.4, .3, .2, .1), p_tgt = (.1, .2, .3, .4), lam = 1; top-2 of p_inf = {0, 1},
    # top-2 of p_tgt = {3, 2}. Rollout set only: min(.4,.1) + min(.3,.2) = 0.3. Union (all four tokens,
    # p_inf known on the target's top-k): 0.3 + min(.2,.3) + min(.1,.4) = 0.6 = exact Z.
    inf = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64).log()
    tgt = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64).log()
    r_ids, t_ids = torch.tensor([0, 1]), torch.tensor([3, 2])
    base = dict(rollout_topk_ids=r_ids, rollout_topk_logp=inf[r_ids], target_logp_at_rollout_topk=tgt[r_ids])
    torch.testing.assert_close(topk_normalizer(**base, lam=1.0), torch.tensor(0.3, dtype=torch.float64))
    full = topk_normalizer(
        **base,
        lam=1.0,
        target_topk_ids=t_ids,
        target_topk_logp=tgt[t_ids],
        rollout_logp_at_target_topk=inf[t_ids],
    )
    torch.testing.assert_close(full, torch.tensor(0.6, dtype=torch.float64))
    # an id in both top-k sets is counted once: target top-2 = {3, 0} adds only token 3 (+0.1) -> 0.4
    t_ids = torch.tensor([3, 0])
    dup = topk_normalizer(
        **base,
        lam=1.0,
        target_topk_ids=t_ids,
        target_topk_logp=tgt[t_ids],
        rollout_logp_at_target_topk=inf[t_ids],
    )
    torch.testing.assert_close(dup, torch.tensor(0.4, dtype=torch.float64))
    # kappa: mean acceptance 0.6, mean Z_approx 0.3 -> kappa = 2 (one state, one token)
    assert kappa(torch.tensor([[0.6]]), torch.tensor([[0.3]]), torch.ones(1, 1)).item() == pytest.approx(2.0)


# --------------------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------------------
logit_lists = st.lists(st.floats(-6.0, 6.0, allow_nan=False), min_size=2, max_size=10)
lams = st.floats(1e-2, 1e2, allow_nan=False)
budgets = st.floats(1e-3, 1.0, allow_nan=False)


@st.composite
def dist_pairs(draw, allow_zeros: bool = True):
    """(log p_tgt, log p_inf) of one state, float64, supports overlapping on token 0."""
    t = draw(logit_lists)
    n = len(t)
    i = draw(st.lists(st.floats(-6.0, 6.0, allow_nan=False), min_size=n, max_size=n))
    if allow_zeros:
        zt = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        zi = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        t = [-INF if z and k > 0 else v for k, (v, z) in enumerate(zip(t, zt, strict=True))]
        i = [-INF if z and k > 0 else v for k, (v, z) in enumerate(zip(i, zi, strict=True))]
    t, i = torch.tensor(t, dtype=torch.float64), torch.tensor(i, dtype=torch.float64)
    return torch.log_softmax(t, -1), torch.log_softmax(i, -1)


@PROPS
@given(dist_pairs(allow_zeros=False), lams)
def test_property_kl_theorem(pq, lam):
    """KL(p_tgt || p'_inf) <= KL(p_tgt || p_inf) for every lam; equality when lam <= r_min."""
    tgt, inf = pq
    _, before, after = obrs_kl_from_logits(tgt, inf, lam, chunk_size=3)
    assert after.item() <= before.item() + 1e-12
    r_min = (tgt - inf).exp().min().item()
    if lam <= r_min:
        assert after.item() == pytest.approx(before.item(), abs=1e-12)


@PROPS
@given(dist_pairs(), lams, lams)
def test_property_kl_after_and_acceptance_non_increasing_in_lambda(pq, lam1, lam2):
    tgt, inf = pq
    lo, hi = min(lam1, lam2), max(lam1, lam2)
    assert (acceptance_prob(tgt, inf, hi) <= acceptance_prob(tgt, inf, lo)).all()
    assert normalizer(tgt, inf, hi).item() <= normalizer(tgt, inf, lo).item() + 1e-15
    _, before, kl_lo = obrs_kl_from_logits(tgt, inf, lo)
    _, _, kl_hi = obrs_kl_from_logits(tgt, inf, hi)
    assert not math.isnan(kl_lo.item()) and not math.isnan(kl_hi.item())
    if math.isfinite(before.item()):
        assert kl_hi.item() <= kl_lo.item() + 1e-12 <= before.item() + 2e-12


@PROPS
@given(dist_pairs(), budgets)
def test_property_lambda_for_budget_hits_budget_and_agrees_with_bisection(pq, budget):
    tgt, inf = pq
    lam = lambda_for_budget(tgt, inf, budget).item()
    t_row, i_row = ref.rows(tgt)[0], ref.rows(inf)[0]
    reachable = ref.z_row(t_row, i_row, ref.r_min_row(t_row, i_row))  # = p_inf(supp p_tgt)
    assert abs(ref.z_row(t_row, i_row, lam) - min(budget, reachable)) <= 1e-6
    assert lam == pytest.approx(ref.lambda_bisect_row(t_row, i_row, budget), rel=1e-6)


@PROPS
@given(
    st.lists(st.one_of(st.floats(-5.0, 5.0, allow_nan=False), st.just(-INF)), min_size=1, max_size=30),
    st.data(),
    budgets,
)
def test_property_batch_lambda_hits_budget(log_r, data, budget):
    mask = data.draw(st.lists(st.booleans(), min_size=len(log_r), max_size=len(log_r)))
    mask[0] = True
    log_r[0] = data.draw(st.floats(-5.0, 5.0))  # at least one counted token with p_tgt > 0
    lr, m = torch.tensor(log_r, dtype=torch.float64), torch.tensor(mask, dtype=torch.float64)
    lam = batch_lambda(lr, m, budget).item()
    ratios = [math.exp(v) for v, k in zip(log_r, mask, strict=True) if k]
    reachable = sum(1 for r in ratios if r > 0) / len(ratios)
    assert abs(ref.batch_acceptance(ratios, lam) - min(budget, reachable)) <= 1e-6
    assert lam == pytest.approx(ref.batch_lambda_bisect(ratios, budget), rel=1e-6)


@PROPS
@given(dist_pairs(), budgets, budgets)
def test_property_larger_budget_never_lowers_acceptance(pq, b1, b2):
    tgt, inf = pq
    lo, hi = min(b1, b2), max(b1, b2)
    lam_lo, lam_hi = lambda_for_budget(tgt, inf, lo), lambda_for_budget(tgt, inf, hi)
    assert lam_hi.item() <= lam_lo.item() * (1 + 1e-12)
    assert (acceptance_prob(tgt, inf, lam_hi) >= acceptance_prob(tgt, inf, lam_lo) - 1e-12).all()
    assert normalizer(tgt, inf, lam_hi).item() >= normalizer(tgt, inf, lam_lo).item() - 1e-12
    # the batch version too, on the ratios of the tokens p_inf can propose, seen as sampled tokens
    proposable = inf > -INF
    lr = (tgt - inf)[proposable].reshape(1, -1)
    m = torch.ones_like(lr)
    blo, bhi = batch_lambda(lr, m, lo), batch_lambda(lr, m, hi)
    assert bhi.item() <= blo.item() * (1 + 1e-12)
    a_lo, a_hi = ((lr - blo.log()).clamp_max(0).exp(), (lr - bhi.log()).clamp_max(0).exp())
    assert (a_hi >= a_lo - 1e-12).all()


@PROPS
@given(logit_lists, st.sampled_from(DTYPES))
def test_property_identical_models_accept_everything(logits, dtype):
    lp = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1).to(dtype)
    assert (acceptance_prob(lp, lp, 1.0) == 1.0).all()
    assert normalizer(lp, lp, 1.0).item() == pytest.approx(1.0, abs=1e-6)
    lam = lambda_for_budget(lp, lp, 1.0)  # budget 1: r_min = 1
    assert lam.item() == 1.0
    assert (acceptance_prob(lp, lp, lam) == 1.0).all()
    assert batch_lambda(torch.zeros(3, 4, dtype=dtype), torch.ones(3, 4), 1.0).item() == 1.0


@PROPS
@given(st.integers(0, 10_000), lams)
def test_property_topk_z_never_exceeds_exact_z(seed, lam):
    tgt, inf, kw = _topk_inputs(seed, (3,), 12, 3, torch.float64)
    exact = normalizer(tgt, inf, lam)
    assert (topk_normalizer(**kw, lam=lam) <= exact + 1e-12).all()
    rollout_only = {
        k: kw[k] for k in ("rollout_topk_ids", "rollout_topk_logp", "target_logp_at_rollout_topk")
    }
    assert (topk_normalizer(**rollout_only, lam=lam) <= topk_normalizer(**kw, lam=lam) + 1e-12).all()


@pytest.mark.parametrize("union", [True, False])
def test_kappa_corrected_topk_z_close_to_exact_on_peaked_distributions(union):
    """Peaked states (V = 200, k = 20, probabilities decaying geometrically by e^-0.5 per rank, so p_inf
    mass outside its top-20 is < 1e-4): kappa * Z_approx is within 1e-3 of the exact Z at every state.

    Z_approx <= Z <= Z_approx + (p_inf mass outside V_k), so the error is bounded by the tail mass; the
    test first checks that the tail is small (< 1e-3), then the corrected estimate. kappa takes
    E_x[a] = Z per state as the acceptance (its expectation); a sampled-acceptance check is below.
    """
    g = gen(10)
    base = -0.5 * torch.rand(8, 16, 200, generator=g).argsort(-1).double()  # a random token order per state
    tgt = torch.log_softmax(base + 0.3 * torch.randn(base.shape, generator=g, dtype=torch.float64), -1)
    inf = torch.log_softmax(base + 0.3 * torch.randn(base.shape, generator=g, dtype=torch.float64), -1)
    r_lp, r_ids = inf.topk(20, -1)
    t_lp, t_ids = tgt.topk(20, -1)
    kw = dict(
        rollout_topk_ids=r_ids, rollout_topk_logp=r_lp, target_logp_at_rollout_topk=tgt.gather(-1, r_ids)
    )
    if union:
        kw.update(
            target_topk_ids=t_ids, target_topk_logp=t_lp, rollout_logp_at_target_topk=inf.gather(-1, t_ids)
        )
    exact = normalizer(tgt, inf, 1.0)
    z_approx = topk_normalizer(**kw, lam=1.0)
    assert (exact - z_approx).max() < 1e-3 and (exact - z_approx).min() >= -1e-12
    m = torch.ones_like(exact)
    k = kappa(exact, z_approx, m)
    assert k.item() >= 1.0
    assert (k * z_approx - exact).abs().max().item() < 1e-3
    # batch means agree exactly after the correction
    assert (k * z_approx).mean().item() == pytest.approx(exact.mean().item(), rel=1e-12)
    # with the acceptance of one sampled token per state (the update-phase estimate): 128 states,
    # a in [0,1] so the mean's std <= 0.5/sqrt(128) = 0.044 in absolute terms; allow 0.15 relative.
    x = torch.multinomial(inf.exp().reshape(-1, 200), 1, generator=g).reshape(8, 16, 1)
    a = acceptance_prob(tgt.gather(-1, x), inf.gather(-1, x), 1.0).squeeze(-1)
    ks = kappa(a, z_approx, m)
    assert (ks * z_approx).mean().item() == pytest.approx(exact.mean().item(), rel=0.15)


# --------------------------------------------------------------------------------------------------
# edges
# --------------------------------------------------------------------------------------------------
def test_budget_one_returns_r_min_and_accepts_everything():
    tgt, inf = pair(11, (4, V), torch.float64, zero_frac=0.0)
    lam = lambda_for_budget(tgt, inf, 1.0)
    torch.testing.assert_close(lam, (tgt - inf).exp().min(-1).values, rtol=1e-12, atol=0.0)
    assert (acceptance_prob(tgt, inf, lam.unsqueeze(-1)) == 1.0).all()
    torch.testing.assert_close(normalizer(tgt, inf, lam.unsqueeze(-1)), torch.ones(4, dtype=torch.float64))


def test_unreachable_budget_with_target_zeros_returns_r_min():
    # p_tgt = (0, .5, .5), p_inf = (.5, .25, .25): acceptance can be at most p_inf(supp p_tgt) = 0.5.
    # Budgets above return r_min over both-positive tokens = .5/.25 = 2, whose Z = 0 + .25 + .25 = 0.5.
    tgt = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64).log()
    inf = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64).log()
    for budget in (0.5, 0.8, 1.0):
        lam = lambda_for_budget(tgt, inf, budget)
        assert lam.item() == pytest.approx(2.0, rel=1e-12)
        assert normalizer(tgt, inf, lam.item()).item() == pytest.approx(0.5, rel=1e-12)
        torch.testing.assert_close(
            acceptance_prob(tgt, inf, lam.item()), torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
        )
    # a reachable budget below it: on [2, inf) Z = 1/lam  =>  budget 0.25 gives lam = 4
    assert lambda_for_budget(tgt, inf, 0.25).item() == pytest.approx(4.0, rel=1e-12)
    # batch version: ratios (0, 2, 2) as sampled tokens; mean acceptance at most 2/3
    lam = batch_lambda(
        torch.tensor([-INF, math.log(2.0), math.log(2.0)], dtype=torch.float64), torch.ones(3), 0.9
    )
    assert lam.item() == pytest.approx(2.0, rel=1e-12)


def test_neg_inf_logprobs_give_no_nan():
    # rows with zeros in p_tgt only, in p_inf only, in both at the same token, and partial overlap
    inf_ = -INF
    tgt_logits = torch.tensor(
        [[0.0, inf_, 1.0, 0.5], [0.0, 1.0, inf_, 0.5], [0.0, inf_, 0.3, inf_]], dtype=torch.float64
    )
    inf_logits = torch.tensor(
        [[0.0, 0.2, inf_, 0.5], [0.0, inf_, 2.0, 0.5], [0.5, inf_, inf_, 1.0]], dtype=torch.float64
    )
    tgt, inf = torch.log_softmax(tgt_logits, -1), torch.log_softmax(inf_logits, -1)
    for lam in (0.5, 1.0, 3.0):
        a = acceptance_prob(tgt, inf, lam)
        assert not a.isnan().any() and ((a >= 0) & (a <= 1)).all()
        for out in (
            normalizer(tgt, inf, lam),
            normalizer_from_logits(tgt_logits, inf_logits, lam, chunk_size=3),
            *obrs_kl_from_logits(tgt_logits, inf_logits, lam, chunk_size=3),
        ):
            assert not out.isnan().any()
    lam = lambda_for_budget(tgt, inf, 0.6)
    assert torch.isfinite(lam).all() and (lam > 0).all()
    # p_tgt mass outside supp p_inf: KL is +inf before and after (p'_inf has the same support as p_inf)
    _, before, after = obrs_kl_from_logits(tgt_logits, inf_logits, 1.0)
    assert before[0].item() == INF and after[0].item() == INF


def test_token_with_zero_rollout_mass_gets_acceptance_one():
    """acceptance_prob docstring: 'A token with p_inf = 0 gets a = 1 (never proposed)' — for every lam,
    whether or not p_tgt is 0 there too."""
    tgt = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64).log()
    inf = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64).log()
    for lam in (0.5, 1.0, 4.0):
        a = acceptance_prob(tgt, inf, lam)
        assert a[1].item() == 1.0 and a[2].item() == 1.0


def test_kl_after_obrs_is_inf_not_nan_for_disjoint_supports():
    """No token has both masses: Z = 0, nothing is ever accepted, and no distribution on supp p_inf is
    within finite KL of p_tgt, so both KLs are +inf (not NaN)."""
    t = torch.tensor([[0.0, -INF]], dtype=torch.float64)
    r = torch.tensor([[-INF, 0.0]], dtype=torch.float64)
    z, before, after = obrs_kl_from_logits(t, r, 1.0)
    assert z.item() == 0.0 and before.item() == INF and after.item() == INF


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
def test_bad_input_raises_value_error_naming_the_argument():
    tgt, inf = pair(12, (2, 5), torch.float64, zero_frac=0.0)
    nan_lp = tgt.clone()
    nan_lp[0, 1] = math.nan
    with pytest.raises(ValueError, match="shape mismatch"):
        acceptance_prob(tgt, inf[:, :4], 1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        normalizer(tgt, inf[:1], 1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        lambda_for_budget(tgt, inf[:, :3], 0.5)
    with pytest.raises(ValueError, match="shape mismatch"):
        normalizer_from_logits(tgt, inf[:, :3], 1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        batch_lambda(tgt, torch.ones(2, 4), 0.5)
    with pytest.raises(ValueError, match="shape mismatch"):
        kappa(torch.ones(2, 3), torch.ones(2, 3), torch.ones(3, 2))
    with pytest.raises(ValueError, match="target_logp contains NaN"):
        acceptance_prob(nan_lp, inf, 1.0)
    with pytest.raises(ValueError, match="rollout_logp contains NaN"):
        normalizer(tgt, nan_lp, 1.0)
    with pytest.raises(ValueError, match="target_logits contains NaN"):
        obrs_kl_from_logits(nan_lp, inf, 1.0)
    with pytest.raises(ValueError, match="log_ratio contains NaN"):
        batch_lambda(nan_lp, torch.ones(2, 5), 0.5)
    with pytest.raises(ValueError, match="target_logp"):
        normalizer(torch.zeros(2, 5, dtype=torch.long), inf, 1.0)
    with pytest.raises(ValueError, match=r"\+inf"):
        normalizer(tgt, torch.full_like(inf, INF), 1.0)
    for lam in (0.0, -1.0, math.nan, INF, torch.tensor([1.0, 0.0])):
        with pytest.raises(ValueError, match="lam"):
            acceptance_prob(tgt, inf, lam)
        with pytest.raises(ValueError, match="lam"):
            normalizer_from_logits(tgt, inf, lam)
    with pytest.raises(ValueError, match="lam"):
        topk_normalizer(torch.zeros(2, 1, dtype=torch.long), tgt[:, :1], inf[:, :1], 0.0)
    for budget in (0.0, -0.1, 1.0001, math.nan, 2):
        with pytest.raises(ValueError, match="budget"):
            lambda_for_budget(tgt, inf, budget)
        with pytest.raises(ValueError, match="budget"):
            batch_lambda(tgt, torch.ones(2, 5), budget)
    for chunk in (0, -3):
        with pytest.raises(ValueError, match="chunk_size"):
            normalizer_from_logits(tgt, inf, 1.0, chunk_size=chunk)
        with pytest.raises(ValueError, match="chunk_size"):
            obrs_kl_from_logits(tgt, inf, 1.0, chunk_size=chunk)
    with pytest.raises(ValueError, match="mask"):
        batch_lambda(tgt, torch.zeros(2, 5), 0.5)
    with pytest.raises(ValueError, match="rollout_logp_at_target_topk needs"):
        topk_normalizer(
            torch.zeros(2, 1, dtype=torch.long),
            tgt[:, :1],
            inf[:, :1],
            1.0,
            rollout_logp_at_target_topk=inf[:, :1],
        )
