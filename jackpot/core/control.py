"""Closed-loop control of the distillation coefficient from the measured actor-policy gap (beyond the paper).

The paper fixes lambda_distill in L(omega) = PPO(omega) + lambda_distill * KL(SG(p_new) || p_omega) (eq. 8) and
names closed-loop control of it from the measured KL as future work (its §8 limits). Here the coefficient is
adapted once per step, from the gap measured on the batch just sampled, before the update:

    e       = clip(log(kl / target), -1, 1)
    coef'   = clip(coef * exp(rate * e), low, high)

an integral controller in log space: log(coef) accumulates the log-error, so the coefficient rises while the
gap stays above the target and falls while it stays below, and stands still exactly at the target. Why this
rule and not PPO's adaptive KL controller (Ziegler et al. 2019, TRL's `AdaptiveKLController`: coef *= 1 +
clip(kl / target - 1, -0.2, 0.2) * n / horizon) — both are integral controllers; the log-error makes a gap
twice the target and half the target move the coefficient by the same factor up and down (a KL spans orders of
magnitude), and the clip keeps one outlier batch from moving it by more than e^rate. docs/METHOD.md §10.
"""

from __future__ import annotations

import math

LOG_ERROR_CLIP = 1.0
"""|log(kl / target)| counted per step at most: one batch moves the coefficient by at most a factor e^rate."""


def log_kl_error(kl: float, target: float) -> float:
    """clip(log(kl / target), -LOG_ERROR_CLIP, LOG_ERROR_CLIP); a gap of 0 (identical models) counts as far
    below, +inf as far above, NaN (no information) as on target. target > 0."""
    if not target > 0:
        raise ValueError(f"target must be > 0, got {target!r}")
    if math.isnan(kl):
        return 0.0
    if kl <= 0:
        return -LOG_ERROR_CLIP
    return max(-LOG_ERROR_CLIP, min(LOG_ERROR_CLIP, math.log(kl / target)))


def kl_controlled_coef(coef: float, kl: float, *, target: float, rate: float, low: float, high: float) -> float:
    """The next coefficient: clip(coef * exp(rate * log_kl_error(kl, target)), low, high).

    coef: the coefficient of the previous step (> 0); kl: the gap measured on this step's batch; target: the gap
    to hold; rate: the gain (log(coef) moves by at most `rate` a step); low <= high: the bounds."""
    if not (coef > 0 and rate > 0 and 0 < low <= high):
        raise ValueError(f"need coef > 0, rate > 0 and 0 < low <= high, got coef={coef!r}, rate={rate!r}, "
                         f"low={low!r}, high={high!r}")
    return min(high, max(low, coef * math.exp(rate * log_kl_error(kl, target))))


__all__ = ["LOG_ERROR_CLIP", "kl_controlled_coef", "log_kl_error"]
