"""Jackpot (OBRS) inside verl: a registered policy loss plus the batch-level correction it needs.

verl (0.9.x) calls a policy loss per micro-batch with sampled-token log-probs only:

    fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)

No rollout (engine) log-probs, no top-k tensors reach it. So the Jackpot correction is split in two,
exactly where verl splits its own rollout correction (`verl.trainer.ppo.rollout_corr_helper`):

1. Once per batch, on the driver, before mini/micro-batching (`compute_jackpot_correction_and_add_to_batch`,
   same signature as verl's `compute_rollout_correction_and_add_to_batch`): the ratio
   r = p_old / p_rollout of verl's recomputed old log-probs to the engine's, lam (fixed, or solved for a
   target acceptance `budget` over the whole batch, METHOD.md §4.2), one uniform per token, the mask
   1[u < min(1, r/lam)] and the weight min(Z * max(lam, r), c1) with Z the batch's normaliser (the
   budget, or the batch's mean acceptance for a fixed lam) — `jackpot.core.corrections.batch_jackpot`
   (`jackpot` with z="batch", target="old"). Rejected tokens leave `response_mask` (as verl's own
   `rollout_rs` does), the weights go to `rollout_is_weights`. Fixed for the whole batch: every
   mini-batch sees the same mask.
2. Per micro-batch, the registered loss `jackpot` (`jackpot_policy_loss`): PPO clip with verl's
   clip_ratio_low/high and dual clip clip_ratio_c (`jackpot.core.losses.ppo_token_loss`), times the
   batch's weights, aggregated with verl's `agg_loss` and `config.global_batch_info` (DP-correct).
   It raises if `rollout_is_weights` is missing, so a run whose batch-level part did not happen stops
   instead of silently training as plain PPO.

TIS composition (Algorithm 1): c1 is verl's `rollout_is_threshold`, the truncation of the OBRS weight.

verl offers no registry for batch-level corrections. Importing this module (which verl does for
every entry point of the group `verl.plugins` when `verl` is imported, driver and Ray workers alike)
wraps `rollout_corr_helper.compute_rollout_correction_and_add_to_batch` with a dispatcher: configs
with `rollout_is: jackpot` go to part 1 above, every other config to verl's function unchanged. The
trainer imports that function from the module at call time, so the wrapper is what it calls.

What verl cannot give Jackpot: a per-state Z (needs top-k log-probs of both models per position),
target="new" (needs the rollout log-probs inside the loss), and a second, smaller rollout model
(verl's rollout engine serves the actor's own weights). See docs/integrations/verl.md.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from verl import DataProto
from verl.trainer.ppo import rollout_corr_helper
from verl.trainer.ppo.core_algos import agg_loss, register_policy_loss

from jackpot import metric_names as names
from jackpot.core.checks import masked_mean
from jackpot.core.corrections import CorrectionResult, batch_jackpot
from jackpot.core.divergences import effective_sample_size
from jackpot.core.losses import ppo_token_loss

LOSS_NAME = "jackpot"
"""The name under which the policy loss is registered (actor_rollout_ref.actor.policy_loss.loss_mode)."""
ROLLOUT_IS_NAME = "jackpot"
"""The value of algorithm.rollout_correction.rollout_is that selects the Jackpot batch-level part."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JackpotOptions:
    """The Jackpot settings read from verl's `algorithm.rollout_correction` section.

    c1:           `rollout_is_threshold` — clip of the OBRS weight (TIS on top of OBRS, Algorithm 1);
                  None (YAML null) leaves it unclipped.
    lam:          `jackpot.lam` — fixed lambda (default 1.0, the paper's), used when budget is None.
    budget:       `jackpot.budget` — target mean acceptance in (0, 1]; lambda is then solved per batch.

    The mask is always sampled (Mask ~ Bernoulli(a), the paper's): verl's loss reads response_mask as
    booleans, so the expected-mask ablation (fractional keep) has no place to go.
    """

    c1: float | None = 2.0
    lam: float = 1.0
    budget: float | None = None

    @classmethod
    def from_config(cls, rollout_corr_config: Mapping[str, Any]) -> JackpotOptions:
        threshold = rollout_corr_config.get("rollout_is_threshold", cls.c1)
        if isinstance(threshold, str):
            if "_" in threshold:
                raise ValueError(f"rollout_is=jackpot takes a single rollout_is_threshold (the c1 clip of the OBRS "
                                 f"weight), got the IcePop bounds {threshold!r}")
            threshold = float(threshold)
        extra = rollout_corr_config.get("jackpot", None) or {}
        unknown = set(extra) - {"lam", "budget"}
        if unknown:
            raise ValueError(f"unknown keys in algorithm.rollout_correction.jackpot: {sorted(unknown)}; "
                             "known: budget, lam")
        budget = extra.get("budget", None)
        return cls(c1=None if threshold is None else float(threshold), lam=float(extra.get("lam", cls.lam)),
                   budget=None if budget is None else float(budget))


def jackpot_batch_correction(
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    options: JackpotOptions,
    uniforms: torch.Tensor | None = None,
) -> CorrectionResult:
    """The Jackpot correction of one whole batch (verl's tensors in, jackpot.core's result out).

    old_log_prob (B, T): verl's recomputed log p_old (the target); rollout_log_prob (B, T): the engine's
    log p_rollout; response_mask (B, T); uniforms (B, T) U(0,1), drawn from torch's default generator
    when None (verl's driver; seed it for reproducible masks).
    Returns weights (B, T) and mask (B, T) (1 = accepted response token) and the obrs/* statistics.
    """
    return batch_jackpot(old_log_prob, rollout_log_prob, response_mask, lam=options.lam, budget=options.budget,
                         c1=options.c1, sampled_mask=True, uniforms=uniforms)


def _weight_metrics(weights: torch.Tensor, keep: torch.Tensor, c1: float | None) -> dict[str, torch.Tensor]:
    """verl's rollout_is_* statistics of the weights that enter the loss (the accepted tokens)."""
    sel = weights[keep > 0] if (keep > 0).any() else weights.new_ones(1)
    mean = masked_mean(weights, keep)
    out = {
        "rollout_is_mean": mean,
        "rollout_is_max": sel.max(),
        "rollout_is_min": sel.min(),
        "rollout_is_std": (masked_mean(weights.square(), keep) - mean.square()).clamp_min(0.0).sqrt(),
        "rollout_is_eff_sample_size": effective_sample_size(weights, keep),
    }
    if c1 is not None:
        out["rollout_is_ratio_fraction_high"] = masked_mean((weights >= c1).to(weights.dtype), keep)
    return out


def compute_jackpot_correction_and_add_to_batch(
    batch: DataProto, rollout_corr_config: Mapping[str, Any]
) -> tuple[DataProto, dict[str, float]]:
    """Drop-in for verl's `compute_rollout_correction_and_add_to_batch` when rollout_is == "jackpot".

    Reads `old_log_probs`, `rollout_log_probs`, `response_mask` of the batch; writes the accepted-token
    mask into `response_mask` and the weights (0 off the mask) into `rollout_is_weights`. Returns the
    batch and metrics: verl's `rollout_corr/*` (off-policy diagnostics from verl's own
    `compute_offpolicy_metrics` on the unmasked batch, weight statistics, `rollout_rs_masked_fraction`)
    plus `obrs/*` (acceptance, lambda, Z, clipping).
    """
    for key in ("old_log_probs", "rollout_log_probs", "response_mask"):
        if key not in batch.batch.keys():
            hint = " (set actor_rollout_ref.rollout.calculate_log_probs=true)" if key == "rollout_log_probs" else ""
            raise ValueError(f"rollout_is=jackpot needs '{key}' in the batch{hint}")
    options = JackpotOptions.from_config(rollout_corr_config)
    old, rollout, response_mask = (batch.batch[k] for k in ("old_log_probs", "rollout_log_probs", "response_mask"))
    if not response_mask.any():
        raise ValueError("response_mask must contain at least one valid token (1).")
    with torch.no_grad():
        result = jackpot_batch_correction(old, rollout, response_mask, options)
        keep = result.mask
        metrics: dict[str, Any] = dict(result.stats)
        metrics.update({f"rollout_corr/{k}": v for k, v in _weight_metrics(result.weights, keep, options.c1).items()})
        metrics["rollout_corr/rollout_rs_masked_fraction"] = 1.0 - masked_mean(keep, response_mask.to(keep.dtype))
        offpolicy = rollout_corr_helper.compute_offpolicy_metrics(old, rollout, response_mask)
        metrics.update({f"rollout_corr/{k}": v for k, v in offpolicy.items()})
    batch.batch["response_mask"] = (response_mask * (keep > 0)).to(response_mask.dtype)
    batch.batch["rollout_is_weights"] = (result.weights * keep).to(old.dtype)
    return batch, {k: float(v) for k, v in metrics.items()}


@register_policy_loss(LOSS_NAME)
def jackpot_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl policy loss `jackpot`: mask * weight * PPO_clip(p_new / p_old, A), aggregated by verl.

    All tensors (B, T) of one micro-batch. `response_mask` already excludes the rejected tokens and
    `rollout_is_weights` holds the OBRS weights (both from `compute_jackpot_correction_and_add_to_batch`).
    Clip ranges from the actor config: clip_ratio (eps), clip_ratio_low / clip_ratio_high, clip_ratio_c
    (dual clip, default 3 as verl's vanilla loss).
    """
    if rollout_is_weights is None:
        raise ValueError(
            "loss_mode=jackpot got no rollout_is_weights: the batch-level Jackpot correction did not run. Set "
            "algorithm.rollout_correction.rollout_is=jackpot, algorithm.rollout_correction.bypass_mode=false and "
            "actor_rollout_ref.rollout.calculate_log_probs=true, and install jackpot[verl] where the driver runs.")
    if config is None:
        raise ValueError("loss_mode=jackpot needs the actor config (clip ranges, global_batch_info)")
    eps = config.clip_ratio
    eps_low = config.clip_ratio_low if config.clip_ratio_low is not None else eps
    eps_high = config.clip_ratio_high if config.clip_ratio_high is not None else eps
    per_token, diag = ppo_token_loss(log_prob, old_log_prob, advantages, clip_eps=eps_low, clip_eps_high=eps_high,
                                     dual_clip=config.get("clip_ratio_c", 3.0))
    mask = response_mask.to(per_token.dtype)
    pg_loss = agg_loss(loss_mat=per_token * rollout_is_weights.detach(), loss_mask=response_mask,
                       loss_agg_mode=loss_agg_mode, **config.global_batch_info)
    metrics = {
        "actor/pg_clipfrac": masked_mean(diag["clipped"], mask).item(),
        "actor/ppo_kl": masked_mean((old_log_prob - log_prob).detach(), mask).item(),
        "actor/pg_clipfrac_lower": masked_mean(diag["clipped_lower"], mask).item(),
        names.OBRS_LOSS_WEIGHT_MEAN: masked_mean(rollout_is_weights.detach(), mask).item(),
    }
    return pg_loss, metrics


def _install_batch_hook() -> None:
    """Route rollout_is == "jackpot" configs to Jackpot's batch-level part; leave all others to verl."""
    original = rollout_corr_helper.compute_rollout_correction_and_add_to_batch
    if getattr(original, "_jackpot_dispatch", False):
        return

    @functools.wraps(original)
    def dispatch(batch, rollout_corr_config):
        if rollout_corr_config is not None and rollout_corr_config.get("rollout_is", None) == ROLLOUT_IS_NAME:
            return compute_jackpot_correction_and_add_to_batch(batch, rollout_corr_config)
        return original(batch, rollout_corr_config)

    dispatch._jackpot_dispatch = True
    rollout_corr_helper.compute_rollout_correction_and_add_to_batch = dispatch
    log.info("jackpot: rollout_is=jackpot routed to jackpot.integrations.verl (verl %s)", _verl_version())


def _verl_version() -> str:
    import verl

    return getattr(verl, "__version__", "?")


_install_batch_hook()

__all__ = ["LOSS_NAME", "ROLLOUT_IS_NAME", "JackpotOptions", "compute_jackpot_correction_and_add_to_batch",
           "jackpot_batch_correction", "jackpot_policy_loss"]
