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

What the controller moves (ACTUATORS). Under AdamW a loss coefficient sets the mix of the rollout model's
gradients, not its step size, so with distillation already dominating the mix the coefficient has no authority
over the gap (docs/RESULTS-long.md). The same rule can move a multiplier m on the rollout model's learning rate
instead (lr = rollout_model.lr x m, m within bounds), which scales every step it takes: 'coef' or 'lr'.
Which gap it reads (SIGNALS): 'k3', the batch mean of the per-token k3 = rho - 1 - log rho (rho = p_old / p_inf
at the sampled token), which one token of rho = e^10 moves by 2e4 / tokens (one batch measured 45.7 against a
typical 0.5); or 'k3-clipped', the mean of min(k3_t, cap) (jackpot.core.divergences.clipped_kl_k3): biased low,
but one token moves it by at most cap / tokens.
"""

from __future__ import annotations

import math

ACTUATORS = ("coef", "lr")
"""What distill.target_kl moves: the distillation coefficient, or a multiplier on the rollout model's lr."""
SIGNALS = ("k3", "k3-clipped")
"""The gap distill.target_kl holds: the mean per-token k3, or its mean with each token's k3 capped."""

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
    """The next coefficient (or learning-rate multiplier): clip(coef * exp(rate * log_kl_error(kl, target)), low,
    high).

    coef: the coefficient of the previous step (> 0); kl: the gap measured on this step's batch; target: the gap
    to hold; rate: the gain (log(coef) moves by at most `rate` a step); low <= high: the bounds."""
    if not (coef > 0 and rate > 0 and 0 < low <= high):
        raise ValueError(f"need coef > 0, rate > 0 and 0 < low <= high, got coef={coef!r}, rate={rate!r}, "
                         f"low={low!r}, high={high!r}")
    return min(high, max(low, coef * math.exp(rate * log_kl_error(kl, target))))


__all__ = ["ACTUATORS", "LOG_ERROR_CLIP", "SIGNALS", "kl_controlled_coef", "log_kl_error"]
