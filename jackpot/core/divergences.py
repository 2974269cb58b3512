"""Mismatch diagnostics in the field's vocabulary (verl's rollout_corr/*), plus exact divergences.

Sampled-token estimators of KL(p_sample || p_other) from tokens x ~ p_sample, with
log_rho = log p_other(x) - log p_sample(x)  (Schulman, "Approximating KL divergence", 2020):
    k1 = -log_rho            unbiased, high variance, can be negative
    k2 = (log_rho)^2 / 2     biased, low variance
    k3 = (rho - 1) - log_rho unbiased, >= 0
chi2 = E[rho^2] - 1 (token and sequence level), ESS = (sum w)^2 / (n * sum w^2) in (0, 1], and the
log-perplexity difference between the two models on the sampled responses. Names and signs follow
verl's `rollout_corr/` metrics (docs/METHOD.md maps each of ours to verl's): log_ppl_diff is the
rollout model's mean token log-prob minus the target's, per sequence, averaged over sequences.
Exact KL and total variation when full log-prob vectors are given.
"""

from __future__ import annotations

import math

import torch

from jackpot.core.checks import (
    SAFETY_BOUND,
    check_logp,
    check_positive,
    check_same_shape,
    log_ratio,
    masked_mean,
)
from jackpot.metric_names import (
    CHI2_SEQ,
    CHI2_TOKEN,
    ESS,
    FRAC_ABOVE,
    FRAC_BELOW,
    KL_K1,
    KL_K2,
    KL_K3,
    LOG_PPL_ABS_DIFF,
    LOG_PPL_DIFF,
    PPL_RATIO,
    RATIO_MAX,
    RATIO_MIN,
)


def kl_estimators(other_logp: torch.Tensor, sample_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """k1, k2, k3 estimates of KL(p_sample || p_other) over masked tokens. Inputs (B, T); outputs 0-dim."""
    check_logp("other_logp", other_logp)
    check_logp("sample_logp", sample_logp)
    check_same_shape(other_logp=other_logp, sample_logp=sample_logp, mask=mask)
    lr = log_ratio(other_logp, sample_logp).clamp(-SAFETY_BOUND, SAFETY_BOUND)
    return {
        KL_K1: masked_mean(-lr, mask),
        KL_K2: masked_mean(0.5 * lr.square(), mask),
        KL_K3: masked_mean(lr.exp() - 1.0 - lr, mask),
    }


def clipped_kl_k3(other_logp: torch.Tensor, sample_logp: torch.Tensor, mask: torch.Tensor, *, cap: float
                  ) -> torch.Tensor:
    """The mean over masked tokens of min(k3_t, cap), k3_t = rho - 1 - log rho, rho = p_other / p_sample: the
    k3 estimate of KL(p_sample || p_other) with each token's share bounded, so that one token moves it by at most
    cap / tokens (biased low; jackpot.core.control's robust signal). Inputs (B, T); output 0-dim. cap > 0."""
    check_positive("cap", cap)
    check_logp("other_logp", other_logp)
    check_logp("sample_logp", sample_logp)
    check_same_shape(other_logp=other_logp, sample_logp=sample_logp, mask=mask)
    lr = log_ratio(other_logp, sample_logp).clamp(-SAFETY_BOUND, SAFETY_BOUND)
    return masked_mean((lr.exp() - 1.0 - lr).clamp(max=cap), mask)


def effective_sample_size(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalised ESS (sum w)^2 / (n sum w^2) over masked entries, in (0, 1]; 1 for uniform weights."""
    check_same_shape(weights=weights, mask=mask)
    m = mask.to(weights.dtype)
    w = torch.where(m > 0, weights, torch.zeros_like(weights)) * m  # NaN/inf where masked out stay out
    n = m.sum().clamp_min(1.0)
    return w.sum().square() / (n * w.square().sum()).clamp_min(torch.finfo(w.dtype).tiny)


def _masked_sum(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim of x where m > 0; masked-out -inf (padding) does not turn into NaN."""
    return (torch.where(m > 0, x, torch.zeros_like(x)) * m).sum(-1)


def mismatch_metrics(target_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                     *, low: float = 0.5, high: float = 2.0) -> dict[str, torch.Tensor]:
    """The usual rollout-vs-trainer mismatch metrics on sampled tokens x ~ p_inf. Inputs (B, T).

    Keys: kl_k1/k2/k3 (of KL(p_inf || p_tgt)), chi2_token, chi2_seq, ess, ratio_min/max,
    frac_above/below (ratio outside [low, high]), log_ppl_diff (rollout minus target mean token
    log-prob, verl's sign), log_ppl_abs_diff and ppl_ratio = mean over sequences of exp(log_ppl_diff)
    (target perplexity over rollout perplexity, as verl).
    chi2_seq clamps each sequence's summed log-ratio, not each token's (as verl): a sequence holding a
    token of zero target probability has ratio 0.
    """
    out = kl_estimators(target_logp, rollout_logp, mask)
    m = mask.to(target_logp.dtype)
    raw = log_ratio(target_logp, rollout_logp)
    lr = raw.clamp(-SAFETY_BOUND, SAFETY_BOUND)
    rho = lr.exp()
    seq_lr = _sequence_log_ratio(raw, m).clamp(-SAFETY_BOUND, SAFETY_BOUND)
    seq_len = m.sum(-1).clamp_min(1.0)
    sel = rho[m > 0] if (m > 0).any() else rho.new_ones(1)
    # mean token log-prob per sequence; -inf (a zero-probability token) clamped like the ratios
    mean_lp = [_masked_sum(x.clamp_min(-SAFETY_BOUND * 10), m) / seq_len for x in (rollout_logp, target_logp)]
    ppl_diff = mean_lp[0] - mean_lp[1]
    out.update({
        CHI2_TOKEN: masked_mean(rho.square(), m) - 1.0,
        CHI2_SEQ: (2 * seq_lr).exp().mean() - 1.0,
        ESS: effective_sample_size(rho, m),
        RATIO_MIN: sel.min(),
        RATIO_MAX: sel.max(),
        FRAC_ABOVE: masked_mean((rho > high).to(m.dtype), m),
        FRAC_BELOW: masked_mean((rho < low).to(m.dtype), m),
        LOG_PPL_DIFF: ppl_diff.mean(),
        LOG_PPL_ABS_DIFF: ppl_diff.abs().mean(),
        PPL_RATIO: ppl_diff.clamp(-SAFETY_BOUND, SAFETY_BOUND).exp().mean(),
    })
    return out


def _sequence_log_ratio(lr: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Sum of the per-token log-ratios of each sequence over m (B,): -inf if any is -inf (ratio 0),
    +inf tokens (p_inf = 0, never sampled) otherwise count as +inf; padding never enters."""
    per_token = torch.where(m > 0, lr, torch.zeros_like(lr))
    has_zero = (per_token == -math.inf).any(-1)
    finite = torch.where(torch.isinf(per_token), torch.zeros_like(per_token), per_token).sum(-1)
    has_inf = (per_token == math.inf).any(-1)
    out = torch.where(has_inf, torch.full_like(finite, math.inf), finite)
    return torch.where(has_zero, torch.full_like(finite, -math.inf), out)


def exact_kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim from full log-prob vectors; +inf where q = 0 < p. (..., V) -> (...)."""
    check_logp("p_logp", p_logp)
    check_logp("q_logp", q_logp)
    check_same_shape(p_logp=p_logp, q_logp=q_logp)
    p = p_logp.exp()
    terms = torch.where(p > 0, p * log_ratio(p_logp, q_logp), torch.zeros_like(p))
    return terms.sum(-1)


def total_variation(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """TV(p, q) = 1/2 sum |p - q| over the last dim. (..., V) -> (...)."""
    check_logp("p_logp", p_logp)
    check_logp("q_logp", q_logp)
    check_same_shape(p_logp=p_logp, q_logp=q_logp)
    return 0.5 * (p_logp.exp() - q_logp.exp()).abs().sum(-1)


def post_rejection_logp(target_logp: torch.Tensor, rollout_logp: torch.Tensor, lam: float) -> torch.Tensor:
    """log p'_inf = log(min(p_inf, p_tgt/lam) / Z), the distribution of accepted tokens. (..., V)."""
    check_logp("target_logp", target_logp)
    check_logp("rollout_logp", rollout_logp)
    check_same_shape(target_logp=target_logp, rollout_logp=rollout_logp)
    check_positive("lam", lam)
    m = torch.minimum(rollout_logp, target_logp - math.log(lam))
    return m - torch.logsumexp(m, dim=-1, keepdim=True)
