"""`jackpot.core`'s public entry points refuse inputs that would poison a result silently (NaN anywhere,
a mask that is not 0/1, log-probabilities above 0) and return half-precision weights that are finite."""

from __future__ import annotations

import math

import pytest
import torch

from jackpot.core import obrs
from jackpot.core.checks import LOGP_TOLERANCE, logp_tolerance
from jackpot.core.corrections import CorrectionInputs, apply_correction


def _inputs(dtype=torch.float64, **over):
    g = torch.Generator().manual_seed(0)
    shape = (3, 5)
    base = dict(
        rollout_logp=-torch.rand(shape, generator=g, dtype=torch.float64) * 3,
        old_logp=-torch.rand(shape, generator=g, dtype=torch.float64) * 3,
        mask=torch.ones(shape, dtype=torch.float64),
        new_logp=-torch.rand(shape, generator=g, dtype=torch.float64) * 3,
        uniforms=torch.rand(shape, generator=g, dtype=torch.float64),
        z=torch.rand(shape, generator=g, dtype=torch.float64),
    )
    base = {k: v.to(dtype) for k, v in base.items()}
    base.update(over)
    return base


def _nan_at(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[1, 2] = math.nan
    return x


@pytest.mark.parametrize("field", ["rollout_logp", "old_logp", "new_logp", "uniforms", "z", "mask"])
def test_nan_in_any_input_is_refused_naming_it(field):
    kw = _inputs()
    kw[field] = _nan_at(kw[field])
    with pytest.raises(ValueError, match=field):
        CorrectionInputs(**kw)


def test_mask_must_be_zero_or_one():
    with pytest.raises(ValueError, match="mask must hold only 0 and 1, found 0.5"):
        CorrectionInputs(**_inputs(mask=torch.full((3, 5), 0.5, dtype=torch.float64)))
    for ok in (torch.ones(3, 5, dtype=torch.bool), torch.zeros(3, 5, dtype=torch.long)):
        CorrectionInputs(**_inputs(mask=ok))
    with pytest.raises(ValueError, match="mask"):
        obrs.batch_lambda(torch.zeros(4), torch.tensor([1.0, 2.0, 0.0, 1.0]), 0.5)
    with pytest.raises(ValueError, match="mask"):
        obrs.kappa(torch.full((2, 2), 0.5), torch.full((2, 2), 0.5), torch.tensor([[1.0, 0.3], [1.0, 1.0]]))


def test_uniforms_and_z_ranges():
    with pytest.raises(ValueError, match=r"uniforms must lie in \[0, 1\]"):
        CorrectionInputs(**_inputs(uniforms=torch.full((3, 5), 1.5, dtype=torch.float64)))
    with pytest.raises(ValueError, match="z must lie in"):
        CorrectionInputs(**_inputs(z=torch.full((3, 5), -0.1, dtype=torch.float64)))
    with pytest.raises(ValueError, match="accept_prob"):
        obrs.kappa(torch.full((2, 2), math.nan), torch.full((2, 2), 0.5), torch.ones(2, 2))


@pytest.mark.parametrize("field", ["rollout_logp", "old_logp", "new_logp"])
def test_log_probabilities_above_zero_are_refused(field):
    kw = _inputs()
    kw[field] = kw[field].clone()
    kw[field][0, 0] = 0.3  # a logit or log-ratio, not a log-probability
    with pytest.raises(ValueError, match=f"{field} has values above 0 \\(max 0.3\\)"):
        CorrectionInputs(**kw)
    kw[field][0, 0] = LOGP_TOLERANCE / 2  # float32 rounding of a log-probability of 1: accepted
    CorrectionInputs(**kw)
    with pytest.raises(ValueError, match="above 0"):
        obrs.acceptance_prob(kw[field].clamp_max(0) + 0.01, kw["rollout_logp"], 1.0)


def test_logp_tolerance_follows_the_dtype():
    assert logp_tolerance(torch.float32) == LOGP_TOLERANCE == logp_tolerance(torch.float64)
    assert logp_tolerance(torch.bfloat16) == 16 * 2.0 ** -7  # bfloat16 rounds x - logsumexp(x) that coarsely


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name, kwargs", [
    ("jackpot", dict(lam=1.0, c1=None)),
    ("jackpot", dict(lam=1.0, c1=None, target="new", c2=None)),
    ("jackpot", dict(budget=0.5, c1=None)),
    ("tis", dict(cap=1e9)),
    ("icepop", dict(low=1e-9, high=1e9)),
])
def test_half_precision_weights_are_computed_in_float32_and_finite(dtype, name, kwargs):
    # p_old / p_inf = e^30 at one token: the weight is clamped to e^SAFETY_BOUND = 4.85e8, more than float16's
    # largest finite value 65504, so a float16 computation would give inf.
    kw = _inputs(torch.float64)
    kw["rollout_logp"][0, 0], kw["old_logp"][0, 0], kw["new_logp"][0, 0] = -35.0, -5.0, -5.0
    wide = CorrectionInputs(**kw)
    half = CorrectionInputs(**{k: v.to(dtype) for k, v in kw.items()})
    reference = apply_correction(name, CorrectionInputs(**{k: v.to(dtype).double() for k, v in kw.items()}), **kwargs)
    res = apply_correction(name, half, **kwargs)
    assert res.weights.dtype == dtype and torch.isfinite(res.weights).all()
    assert reference.weights.max() > 6e4  # the case has teeth: the weight does not fit float16
    # the half-precision result is the float64 one rounded to the dtype (clamped to its largest finite value)
    expected = reference.weights.clamp_max(torch.finfo(dtype).max).to(dtype)
    torch.testing.assert_close(res.weights, expected, rtol=0, atol=0)
    torch.testing.assert_close(res.mask, reference.mask.to(dtype), rtol=0, atol=0)
    assert apply_correction(name, wide, **kwargs).weights.dtype == torch.float64  # float64 stays float64
