"""Tests of jackpot.core.corrections: none / TIS / IcePop / Jackpot behind one interface.

Vectorised ≡ the per-token loops of tests/reference.py (Algorithm 1 with the METHOD.md decisions),
hand-worked weights, properties (identical models ⇒ weight 1 and every token accepted), the Jackpot
mask's consistency and frequency, the target="new" importance weight, edges and bad input.
"""

from __future__ import annotations

import itertools
import math

import pytest
import reference as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jackpot.core.corrections import (
    CORRECTIONS,
    CorrectionInputs,
    apply_correction,
    batch_jackpot,
    icepop,
    jackpot,
    tis,
)
from jackpot.core.obrs import normalizer

INF = math.inf
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sampled_logp(g, shape, dtype=torch.float64):
    """Log-probabilities of sampled tokens: log U(0.02, 1)."""
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 0.98 + 0.02).log().to(dtype)


def batch(seed: int, dtype=torch.float64, shape=(4, 7), with_new: bool = True, with_z: bool = False):
    g = gen(seed)
    mask = (torch.rand(shape, generator=g) < 0.85).to(dtype)
    mask[0, -2:] = 0.0  # some padding
    mask[1, 0] = 1.0
    return CorrectionInputs(
        rollout_logp=sampled_logp(g, shape, dtype),
        old_logp=sampled_logp(g, shape, dtype),
        mask=mask,
        new_logp=sampled_logp(g, shape, dtype) if with_new else None,
        uniforms=torch.rand(shape, generator=g, dtype=torch.float64).to(dtype),
        z=(torch.rand(shape, generator=g, dtype=torch.float64) * 0.8 + 0.2).to(dtype) if with_z else None,
    )


def jp(inp: CorrectionInputs, **kw):
    """jackpot() with the per-state Z and the mask kind that the inputs carry: inputs.z -> 'exact'
    (else the batch's mean acceptance), inputs.uniforms -> sampled mask (else the expected mask)."""
    kw.setdefault("z", "exact" if inp.z is not None else "batch")
    kw.setdefault("sampled_mask", inp.uniforms is not None)
    return jackpot(inp, **kw)


def close(actual: torch.Tensor, expected, dtype) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64).reshape(actual.shape)
    torch.testing.assert_close(actual.double(), expected, **TOL[dtype])


def as_lists(inp: CorrectionInputs) -> dict:
    out = dict(
        rollout_logp=ref.rows(inp.rollout_logp), old_logp=ref.rows(inp.old_logp), mask=ref.rows(inp.mask)
    )
    for name in ("new_logp", "uniforms", "z"):
        v = getattr(inp, name)
        out[name] = None if v is None else ref.rows(v)
    return out


# --------------------------------------------------------------------------------------------------
# vectorised == reference
# --------------------------------------------------------------------------------------------------
JACKPOT_CASES = list(
    itertools.product(
        ["old", "new"],  # target
        ["fixed", "z", "budget"],  # how lam and Z are set
        [True, False],  # sampled mask (uniforms) or expected mask
        [(None, None), (1.5, None), (None, 0.8), (1.2, 1.1)],  # (c1, c2)
    )
)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("target", "zmode", "sampled", "clips"), JACKPOT_CASES)
def test_jackpot_matches_reference(dtype, target, zmode, sampled, clips):
    inp = batch(1, dtype, with_z=zmode == "z")
    if not sampled:
        inp = CorrectionInputs(inp.rollout_logp, inp.old_logp, inp.mask, new_logp=inp.new_logp, z=inp.z)
    c1, c2 = clips
    kw = dict(target=target, c1=c1, c2=c2)
    kw.update(dict(budget=0.6) if zmode == "budget" else dict(lam=0.7))
    res = jp(inp, **kw)
    w, keep, lam = ref.jackpot_row_major(**as_lists(inp), **kw)
    assert (
        res.weights.shape == inp.mask.shape and res.weights.dtype == dtype and not res.weights.requires_grad
    )
    close(res.weights, w, dtype)
    if sampled:
        assert torch.equal(res.mask.double(), torch.tensor(keep, dtype=torch.float64))
    else:  # the expected mask: the acceptance probability of each response token
        close(res.mask, keep, dtype)
    close(res.stats["obrs/lambda"], lam, dtype)
    n = inp.mask.sum()
    assert res.stats["obrs/accept_rate"].item() == pytest.approx((res.mask.sum() / n).item(), rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
@pytest.mark.parametrize("cap", [0.9, 2.0, 50.0])
def test_tis_matches_reference(dtype, level, cap):
    inp = batch(2, dtype, shape=(3, 5))
    res = tis(inp, cap=cap, level=level)
    w, keep = ref.tis_ref(
        ref.rows(inp.rollout_logp), ref.rows(inp.old_logp), ref.rows(inp.mask), cap=cap, level=level
    )
    close(res.weights, w, dtype)
    assert torch.equal(res.mask.double(), torch.tensor(keep, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
@pytest.mark.parametrize(("low", "high"), [(0.5, 2.0), (0.1, 10.0), (0.9, 1.1)])
def test_icepop_matches_reference(dtype, level, low, high):
    inp = batch(3, dtype, shape=(6, 4))
    res = icepop(inp, low=low, high=high, level=level)
    w, keep = ref.icepop_ref(
        ref.rows(inp.rollout_logp),
        ref.rows(inp.old_logp),
        ref.rows(inp.mask),
        low=low,
        high=high,
        level=level,
    )
    close(res.weights, w, dtype)
    assert torch.equal(res.mask.double(), torch.tensor(keep, dtype=torch.float64))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("none", {}),
        ("tis", dict(cap=1.5, level="geometric")),
        ("icepop", dict(low=0.4, high=3.0)),
        ("jackpot", dict(lam=0.9, c1=2.0, z="batch")),
        ("jackpot", dict(budget=0.5, target="new", c2=1.5)),
    ],
)
def test_apply_correction_dispatches_through_the_table(name, kwargs):
    inp = batch(4)
    via_table = apply_correction(name, inp, **kwargs)
    direct = CORRECTIONS[name].fn(inp, **kwargs)
    assert torch.equal(via_table.weights, direct.weights) and torch.equal(via_table.mask, direct.mask)
    assert via_table.weights.shape == inp.mask.shape and via_table.mask.shape == inp.mask.shape
    assert all(v.dim() == 0 for v in via_table.stats.values())


def test_none_keeps_every_response_token_with_weight_one():
    inp = batch(5)
    res = apply_correction("none", inp)
    assert torch.equal(res.mask, inp.mask) and (res.weights == 1).all()


# --------------------------------------------------------------------------------------------------
# hand-worked cases
# --------------------------------------------------------------------------------------------------
def test_hand_jackpot_weights_with_exact_z():
    # One state, p_inf = (.5, .3, .2), p_tgt = p_old = (.2, .3, .5), lam = 1 -> Z = 0.7 (test_core_obrs).
    # Two sampled tokens at this state: x = 2 (r = 2.5) and x = 0 (r = 0.4).
    #   x = 2: a = min(1, 2.5) = 1;  w = Z max(1, 2.5) = 1.75 = p_tgt/p'_inf = .5 / (.2/.7)
    #   x = 0: a = 0.4;              w = Z max(1, 0.4) = 0.70 = .2 / (.2/.7)
    # u = (0.99, 0.39): token 0 kept (0.99 < 1), token 1 kept (0.39 < 0.4). c1 = 1.5 clips 1.75 -> 1.5.
    inp = CorrectionInputs(
        rollout_logp=torch.tensor([[0.2, 0.5]], dtype=torch.float64).log(),
        old_logp=torch.tensor([[0.5, 0.2]], dtype=torch.float64).log(),
        mask=torch.ones(1, 2, dtype=torch.float64),
        uniforms=torch.tensor([[0.99, 0.39]], dtype=torch.float64),
        z=torch.full((1, 2), 0.7, dtype=torch.float64),
    )
    res = jp(inp, lam=1.0)
    torch.testing.assert_close(res.weights, torch.tensor([[1.75, 0.7]], dtype=torch.float64))
    torch.testing.assert_close(res.mask, torch.ones(1, 2, dtype=torch.float64))
    torch.testing.assert_close(res.stats["obrs/accept_prob_mean"], torch.tensor(0.7, dtype=torch.float64))
    torch.testing.assert_close(
        jp(inp, lam=1.0, c1=1.5).weights, torch.tensor([[1.5, 0.7]], dtype=torch.float64)
    )
    # u = 0.41 for the second token rejects it (0.41 >= 0.4)
    inp2 = CorrectionInputs(
        inp.rollout_logp,
        inp.old_logp,
        inp.mask,
        z=inp.z,
        uniforms=torch.tensor([[0.5, 0.41]], dtype=torch.float64),
    )
    torch.testing.assert_close(jp(inp2, lam=1.0).mask, torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    # expected-mask ablation: the same weights (1.75, 0.7), each token kept by its acceptance (1, 0.4)
    inp3 = CorrectionInputs(inp.rollout_logp, inp.old_logp, inp.mask, z=inp.z)
    res3 = jp(inp3, lam=1.0)
    torch.testing.assert_close(res3.weights, torch.tensor([[1.75, 0.7]], dtype=torch.float64))
    torch.testing.assert_close(res3.mask, torch.tensor([[1.0, 0.4]], dtype=torch.float64))


def test_hand_jackpot_budget_mode():
    # sampled-token ratios (0.5, 1, 2, 4) with budget 0.75 -> lam = 1.5 (test_core_obrs: hand batch lambda);
    # Z = budget = 0.75; w = .75 * max(1.5, r) = (1.125, 1.125, 1.5, 3.0)
    # a = min(1, r/1.5) = (1/3, 2/3, 1, 1)
    # no uniforms -> the expected mask: keep a = (1/3, 2/3, 1, 1), weights w unchanged
    inp = CorrectionInputs(
        rollout_logp=torch.full((1, 4), 0.25, dtype=torch.float64).log(),
        old_logp=(torch.tensor([[0.5, 1.0, 2.0, 4.0]], dtype=torch.float64) * 0.25).log(),
        mask=torch.ones(1, 4, dtype=torch.float64),
    )
    res = jp(inp, budget=0.75)
    torch.testing.assert_close(res.stats["obrs/lambda"], torch.tensor(1.5, dtype=torch.float64))
    torch.testing.assert_close(res.weights, torch.tensor([[1.125, 1.125, 1.5, 3.0]], dtype=torch.float64))
    torch.testing.assert_close(res.mask, torch.tensor([[1 / 3, 2 / 3, 1.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(res.stats["obrs/accept_prob_mean"], torch.tensor(0.75, dtype=torch.float64))


def test_hand_tis_and_icepop_levels():
    # one sequence, ratios p_old/p_inf = (4, 0.25, 2) on its three response tokens, a padded 4th token.
    # token: TIS cap 2 -> (2, .25, 2); sequence: prod = 2 -> min(2, 2) = 2; geometric: 2^(1/3) = 1.259921
    # IcePop [0.5, 2] at token level: 4 > 2 and 0.25 < 0.5 are masked -> keep (0, 0, 1), weights (0, 0, 2)
    inp = CorrectionInputs(
        rollout_logp=torch.full((1, 4), 0.25, dtype=torch.float64).log(),
        old_logp=(torch.tensor([[4.0, 0.25, 2.0, 3.0]], dtype=torch.float64) * 0.25).log(),
        mask=torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64),
    )
    t = tis(inp, cap=2.0, level="token")
    torch.testing.assert_close(t.weights[0, :3], torch.tensor([2.0, 0.25, 2.0], dtype=torch.float64))
    torch.testing.assert_close(t.mask, inp.mask)
    torch.testing.assert_close(
        tis(inp, cap=2.0, level="sequence").weights[0, :3], torch.full((3,), 2.0, dtype=torch.float64)
    )
    torch.testing.assert_close(
        tis(inp, cap=3.0, level="sequence").weights[0, :3], torch.full((3,), 2.0, dtype=torch.float64)
    )
    torch.testing.assert_close(
        tis(inp, cap=2.0, level="geometric").weights[0, :3],
        torch.full((3,), 2.0 ** (1 / 3), dtype=torch.float64),
    )
    ip = icepop(inp, low=0.5, high=2.0, level="token")
    torch.testing.assert_close(ip.mask, torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(ip.weights, torch.tensor([[0.0, 0.0, 2.0, 0.0]], dtype=torch.float64))
    # statistics over the 3 response tokens: 2 of 3 masked; mean log-ratio (log 4 + log .25 + log 2) / 3
    torch.testing.assert_close(ip.stats["icepop/masked_frac"].double(), torch.tensor(2 / 3, dtype=torch.float64))
    torch.testing.assert_close(
        ip.stats["icepop/log_ratio_mean"].double(), torch.tensor(math.log(2.0) / 3, dtype=torch.float64)
    )
    # sequence level: ratio 2 in [0.5, 2] -> every response token kept with weight 2; [0.5, 1.5] masks all
    ip = icepop(inp, low=0.5, high=2.0, level="sequence")
    torch.testing.assert_close(ip.mask, inp.mask)
    torch.testing.assert_close(ip.weights, torch.tensor([[2.0, 2.0, 2.0, 0.0]], dtype=torch.float64))
    assert icepop(inp, low=0.5, high=1.5, level="sequence").mask.sum().item() == 0.0


# --------------------------------------------------------------------------------------------------
# properties and invariants
# --------------------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(DTYPES), st.sampled_from(["old", "new"]))
def test_property_identical_models_accept_every_token_with_weight_one(seed, dtype, target):
    g = gen(seed)
    lp = sampled_logp(g, (3, 6), dtype)
    mask = (torch.rand(3, 6, generator=g) < 0.8).to(dtype)
    mask[0, 0] = 1.0
    u = torch.rand(3, 6, generator=g, dtype=torch.float64).to(dtype) * 0.999999
    inp = CorrectionInputs(lp, lp.clone(), mask, new_logp=lp.clone(), uniforms=u)
    inp_z = CorrectionInputs(lp, lp.clone(), mask, new_logp=lp.clone(), uniforms=u, z=torch.ones_like(lp))
    for res in (
        jp(inp, lam=1.0, target=target),
        jp(inp_z, lam=1.0, target=target),
        jp(inp, budget=1.0, target=target),
        jp(inp, lam=1.0, target=target, c1=1.0, c2=1.0),
    ):
        assert torch.equal(res.mask, mask)
        assert (res.weights[mask > 0] == 1.0).all()
        assert res.stats["obrs/accept_rate"].item() == 1.0
    for res in (tis(inp, level="sequence"), icepop(inp, level="geometric")):
        assert torch.equal(res.mask, mask) and (res.weights[mask > 0] == 1.0).all()


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.05, 0.95), st.floats(0.05, 0.95))
def test_property_larger_budget_never_lowers_jackpot_acceptance(seed, b1, b2):
    inp = batch(seed)
    lo, hi = min(b1, b2), max(b1, b2)
    r_lo, r_hi = jp(inp, budget=lo), jp(inp, budget=hi)
    assert r_hi.stats["obrs/accept_prob_mean"].item() >= r_lo.stats["obrs/accept_prob_mean"].item() - 1e-12
    assert (r_hi.mask >= r_lo.mask).all()  # the same uniforms: a token kept at the lower budget stays kept
    assert r_lo.stats["obrs/accept_prob_mean"].item() == pytest.approx(lo, abs=1e-6)  # budget hit


def test_jackpot_mask_is_reproducible_and_its_frequency_matches_the_acceptance():
    """Same uniforms ⇒ the same mask on every call (and across mini-batches as p_new moves, the mask
    only changes where a crosses u). On 200,000 tokens the accept frequency equals mean a within
    0.006 = 5 sigma (sigma <= 0.5/sqrt(200000) = 0.0011)."""
    g = gen(6)
    shape = (400, 500)
    inp = CorrectionInputs(
        rollout_logp=sampled_logp(g, shape),
        old_logp=sampled_logp(g, shape),
        mask=torch.ones(shape, dtype=torch.float64),
        new_logp=sampled_logp(g, shape),
        uniforms=torch.rand(shape, generator=g, dtype=torch.float64),
    )
    for kw in (dict(lam=1.0), dict(lam=3.0, target="new"), dict(budget=0.4)):
        first, second = jp(inp, **kw), jp(inp, **kw)
        assert torch.equal(first.mask, second.mask) and torch.equal(first.weights, second.weights)
        freq = first.stats["obrs/accept_rate"].item()
        assert freq == pytest.approx(first.stats["obrs/accept_prob_mean"].item(), abs=0.006)
        assert 0.05 < freq < 0.95  # a non-trivial rate, so the check has teeth
    # p_new moves a little: with the same uniforms, a token whose a did not change keeps its mask value
    moved = CorrectionInputs(
        inp.rollout_logp,
        inp.old_logp,
        inp.mask,
        uniforms=inp.uniforms,
        new_logp=(inp.new_logp + 0.01 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp_max(0.0),
    )
    a_before = (inp.new_logp - inp.rollout_logp - math.log(3.0)).clamp_max(0).exp()
    a_after = (moved.new_logp - moved.rollout_logp - math.log(3.0)).clamp_max(0).exp()
    m_before = jp(inp, lam=3.0, target="new").mask
    m_after = jp(moved, lam=3.0, target="new").mask
    u = inp.uniforms
    same_side = (u < a_before) == (u < a_after)
    assert torch.equal(m_before[same_side], m_after[same_side])
    assert 0 < (m_before != m_after).sum() < 0.01 * m_before.numel()


@pytest.mark.parametrize("target", ["old", "new"])
@pytest.mark.parametrize("lam", [0.5, 1.0, 2.5])
def test_jackpot_total_weight_is_the_importance_weight_against_p_prime(target, lam):
    """METHOD.md §4: the weight of an accepted token is p_tgt/p'_inf = Z max(lam, r); with p_tgt = p_new
    the loss weight rho = w * p_old/p_new multiplies PPO's ratio p_new/p_old, so the total gradient
    weight rho * p_new/p_old is the importance weight p_new/p'_inf. Checked against p'_inf built from the
    full distributions (unclipped, exact per-state Z passed in)."""
    g = gen(7)
    B, T, V = 3, 5, 11
    p_inf = ref.make_logp(g, (B, T, V))
    p_old = ref.make_logp(g, (B, T, V))
    p_new = torch.log_softmax(p_old + 0.5 * torch.randn((B, T, V), generator=g, dtype=torch.float64), -1)
    x = torch.multinomial(p_inf.exp().reshape(-1, V), 1, generator=g).reshape(B, T, 1)
    p_tgt = p_old if target == "old" else p_new
    at = lambda lp: lp.gather(-1, x).squeeze(-1)  # noqa: E731
    inp = CorrectionInputs(
        rollout_logp=at(p_inf),
        old_logp=at(p_old),
        new_logp=at(p_new),
        mask=torch.ones(B, T, dtype=torch.float64),
        z=normalizer(p_tgt, p_inf, lam),
        uniforms=torch.rand(B, T, generator=g, dtype=torch.float64),
    )  # sampled mask: w not scaled by a
    res = jp(inp, lam=lam, target=target)
    total = res.weights * (at(p_new) - at(p_old)).exp()  # rho * PPO ratio
    expected = []
    for (b, t), xi in zip(itertools.product(range(B), range(T)), x.reshape(-1).tolist(), strict=True):
        p_prime = ref.post_rejection_row(p_tgt[b, t].tolist(), p_inf[b, t].tolist(), lam)
        p_new_x = math.exp(p_new[b, t, xi].item())
        p_tgt_x = math.exp(p_tgt[b, t, xi].item())
        # target new: the total weight is p_new/p'_inf; target old: rho = w = p_old/p'_inf
        expected.append(
            p_new_x / p_prime[xi]
            if target == "new"
            else p_tgt_x / p_prime[xi] * p_new_x / math.exp(p_old[b, t, xi].item())
        )
    torch.testing.assert_close(
        total, torch.tensor(expected, dtype=torch.float64).reshape(B, T), rtol=1e-10, atol=0
    )


# --------------------------------------------------------------------------------------------------
# edges
# --------------------------------------------------------------------------------------------------
def test_neg_inf_logprobs_give_no_nan_in_weights_masks_or_stats():
    g = gen(8)
    inp = batch(8)
    roll, refl, new = inp.rollout_logp.clone(), inp.old_logp.clone(), inp.new_logp.clone()
    roll[0, -2:], refl[0, -2:], new[0, -2:] = -INF, -INF, -INF  # padding: every log-prob -inf
    refl[1, 1], new[1, 1] = -INF, -INF  # p_tgt = 0 at a sampled token
    refl[2, 2] = -INF  # p_old = 0 < p_new
    new[3, 3] = -INF  # p_new = 0 < p_old
    roll[3, 4] = -INF  # p_inf = 0 at a response token (cannot be sampled)
    roll[2, 3] = -INF  # ... and one in a row that also holds a p_old = 0 token: sequence ratio 0 * inf
    inp = CorrectionInputs(
        roll, refl, inp.mask, new_logp=new, uniforms=torch.rand(roll.shape, generator=g, dtype=torch.float64)
    )
    results = [apply_correction("none", inp)]
    for level in ("token", "sequence", "geometric"):
        results += [tis(inp, level=level), icepop(inp, level=level)]
    for target in ("old", "new"):
        for kw in (dict(lam=1.0), dict(lam=0.3, c1=2.0, c2=2.0), dict(budget=0.5), dict(budget=1.0)):
            results.append(jp(inp, target=target, **kw))
    for res in results:
        assert not res.weights.isnan().any() and not res.mask.isnan().any()
        assert torch.isfinite(res.weights).all()
        assert all(not v.isnan().any() for v in res.stats.values()), res.stats
        assert (res.mask <= inp.mask).all()
    # p_tgt = 0 at a sampled token: acceptance 0, so the token is always rejected
    assert jp(inp, lam=1.0).mask[1, 1].item() == 0.0
    # a response with a p_old = 0 token has sequence ratio 0 (weights at the log-ratio safety bound),
    # also next to a p_inf = 0 token
    for level in ("sequence", "geometric"):
        for row in (1, 2):
            assert (tis(inp, level=level).weights[row] < 1e-8).all()  # exp(-SAFETY_BOUND)
            assert (icepop(inp, level=level).mask[row] == 0).all()


def test_empty_mask_gives_finite_stats_for_fixed_lam():
    inp = batch(9)
    empty = CorrectionInputs(
        inp.rollout_logp, inp.old_logp, torch.zeros_like(inp.mask), uniforms=inp.uniforms
    )
    for res in (jp(empty, lam=1.0), tis(empty), icepop(empty)):
        assert res.mask.sum().item() == 0.0
        assert all(torch.isfinite(v).all() for v in res.stats.values())


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
def test_bad_input_raises_value_error_naming_the_argument():
    inp = batch(10)
    lp, mask = inp.rollout_logp, inp.mask
    nan_lp = lp.clone()
    nan_lp[0, 0] = math.nan
    with pytest.raises(ValueError, match="shape mismatch"):
        CorrectionInputs(lp, lp[:, :3], mask)
    with pytest.raises(ValueError, match="shape mismatch"):
        CorrectionInputs(lp, lp, mask, uniforms=torch.rand(2, 2))
    with pytest.raises(ValueError, match="shape mismatch"):
        CorrectionInputs(lp, lp, mask, z=torch.rand(4, 6))
    with pytest.raises(ValueError, match=r"rollout_logp must be \(B, T\)"):
        CorrectionInputs(lp[0], lp[0], mask[0])
    with pytest.raises(ValueError, match="rollout_logp contains NaN"):
        CorrectionInputs(nan_lp, lp, mask)
    with pytest.raises(ValueError, match="old_logp contains NaN"):
        CorrectionInputs(lp, nan_lp, mask)
    with pytest.raises(ValueError, match="new_logp contains NaN"):
        CorrectionInputs(lp, lp, mask, new_logp=nan_lp)
    with pytest.raises(ValueError, match="unknown correction 'obrs'"):
        apply_correction("obrs", inp)
    for fn in (tis, icepop):
        with pytest.raises(ValueError, match="level must be one of"):
            fn(inp, level="seq")
    with pytest.raises(ValueError, match="target must be one of"):
        jp(inp, target="ref")
    with pytest.raises(ValueError, match="target='new' needs new_logp"):
        jp(CorrectionInputs(lp, lp, mask), target="new")
    for lam in (0.0, -2.0, math.nan, INF):
        with pytest.raises(ValueError, match="lam"):
            jp(inp, lam=lam)
    for budget in (0.0, 1.5, -0.2, math.nan):
        with pytest.raises(ValueError, match="budget"):
            jp(inp, budget=budget)
    for name in ("c1", "c2"):
        with pytest.raises(ValueError, match=name):
            jp(inp, **{name: 0.0})
    with pytest.raises(ValueError, match="cap"):
        tis(inp, cap=-1.0)
    with pytest.raises(ValueError, match="low"):
        icepop(inp, low=0.0)
    with pytest.raises(ValueError, match="high"):
        icepop(inp, high=-1.0)
    with pytest.raises(ValueError, match=r"low \(3.0\) must be <= high \(2.0\)"):
        icepop(inp, low=3.0, high=2.0)
    with pytest.raises(ValueError, match="mask selects no token"):
        jp(CorrectionInputs(lp, lp, torch.zeros_like(mask)), budget=0.5)


# --------------------------------------------------------------------------------------------------
# what each correction needs from its caller; TIS lower truncation; the expected-mask scale
# --------------------------------------------------------------------------------------------------
def test_needs_are_declared_by_the_table():
    from jackpot.core.corrections import Needs, correction_needs

    for name, kw in (("none", {}), ("tis", dict(cap=2.0)), ("icepop", dict(low=0.5, high=2.0))):
        assert correction_needs(name, **kw) == Needs()
    assert correction_needs("jackpot", lam=0.7, z="exact") == Needs(z="exact", z_lam=0.7, uniforms=True)
    assert correction_needs("jackpot", lam=0.7, z="topk", target="new", sampled_mask=False) == Needs(
        z="topk", z_lam=0.7, uniforms=False, current_policy=True)
    assert correction_needs("jackpot", budget=0.9, z="exact").z is None  # Z = budget
    assert correction_needs("jackpot", z="batch").z is None
    with pytest.raises(ValueError, match="unknown correction"):
        correction_needs("magic")


def test_jackpot_refuses_to_run_without_what_it_declared():
    inp = batch(11)
    with pytest.raises(ValueError, match="per-state normaliser"):
        jackpot(inp, z="exact")
    no_u = CorrectionInputs(inp.rollout_logp, inp.old_logp, inp.mask, z=torch.ones_like(inp.mask))
    with pytest.raises(ValueError, match="uniforms"):
        jackpot(no_u, z="exact", sampled_mask=True)


def test_tis_lower_truncation():
    # ratios (4, 0.25, 2, 0.05): cap 2, cap_min 0.5 (TRL's clip_min) -> (2, 0.5, 2, 0.5)
    inp = CorrectionInputs(
        rollout_logp=torch.full((1, 4), 0.25, dtype=torch.float64).log(),
        old_logp=(torch.tensor([[4.0, 0.25, 2.0, 0.05]], dtype=torch.float64) * 0.25).log(),
        mask=torch.ones(1, 4, dtype=torch.float64),
    )
    res = tis(inp, cap=2.0, cap_min=0.5)
    torch.testing.assert_close(res.weights, torch.tensor([[2.0, 0.5, 2.0, 0.5]], dtype=torch.float64))
    assert res.stats["tis/clipped_low_frac"].item() == pytest.approx(0.5)
    torch.testing.assert_close(tis(inp, cap=2.0).weights, torch.tensor([[2.0, 0.25, 2.0, 0.05]], dtype=torch.float64))
    with pytest.raises(ValueError, match="cap_min"):
        tis(inp, cap=2.0, cap_min=3.0)


@pytest.mark.parametrize("mode", ["token-mean", "token-mean-all", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_expected_mask_loss_has_the_sampled_mask_scale_in_expectation(mode):
    """The ablation keeps a fraction a of each token: its loss equals the average of the sampled-mask
    loss over many draws of the uniforms (the kept-token count is concentrated on a large batch)."""
    from jackpot.core.losses import aggregate

    g = gen(12)
    B, T = 64, 32
    inp = CorrectionInputs(sampled_logp(g, (B, T)), sampled_logp(g, (B, T)), torch.ones(B, T, dtype=torch.float64),
                           z=torch.rand(B, T, generator=g, dtype=torch.float64) * 0.5 + 0.4)
    token_loss = torch.randn(B, T, generator=g, dtype=torch.float64) + 0.5
    expected = jackpot(inp, lam=1.0, z="exact", sampled_mask=False)
    exp_loss = aggregate(token_loss * expected.weights, expected.mask, mode, response_mask=inp.mask)
    draws = []
    for seed in range(200):
        u = torch.rand(B, T, generator=gen(1000 + seed), dtype=torch.float64)
        res = jackpot(CorrectionInputs(inp.rollout_logp, inp.old_logp, inp.mask, z=inp.z, uniforms=u),
                      lam=1.0, z="exact")
        draws.append(aggregate(token_loss * res.weights, res.mask, mode, response_mask=inp.mask))
    draws = torch.stack(draws)
    stderr = draws.std() / math.sqrt(len(draws))
    assert abs(draws.mean() - exp_loss) < 4 * stderr + 1e-3 * abs(exp_loss)
    assert 0.3 < expected.mask.mean() < 0.95  # tokens really are rejected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kw", [dict(lam=1.3, c1=2.0), dict(budget=0.7, c1=None),
                                dict(lam=0.8, c1=3.0, sampled_mask=False)])
def test_batch_jackpot_is_jackpot_with_a_batch_normaliser_in_the_compute_dtype(dtype, kw):
    """The integrations' batch-level helper: Jackpot (target old, z batch) of the upcast inputs; without
    uniforms it draws them from torch's default generator in the compute dtype (float32 for bf16)."""
    g = gen(11)
    old, rollout = sampled_logp(g, (5, 6), dtype), sampled_logp(g, (5, 6), dtype)
    mask = (torch.rand(5, 6, generator=g) < 0.8).long()
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    torch.manual_seed(3)
    got = batch_jackpot(old, rollout, mask, **kw)
    torch.manual_seed(3)
    sampled = kw.get("sampled_mask", True)
    u = torch.rand(old.shape, dtype=compute) if sampled else None
    want = jackpot(CorrectionInputs(rollout_logp=rollout.to(compute), old_logp=old.to(compute), mask=mask.to(compute),
                                    uniforms=u), target="old", z="batch", **kw)
    assert got.weights.dtype == compute
    torch.testing.assert_close(got.weights, want.weights, rtol=0, atol=0)
    torch.testing.assert_close(got.mask, want.mask, rtol=0, atol=0)
    assert got.stats.keys() == want.stats.keys()
    given_u = torch.rand(old.shape, generator=g, dtype=compute)
    again = batch_jackpot(old.requires_grad_(old.is_floating_point()), rollout, mask, uniforms=given_u, **kw)
    assert not again.weights.requires_grad
