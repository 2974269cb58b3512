"""Actor-policy mismatch corrections behind one interface: none, TIS, IcePop/MIS and Jackpot (OBRS).

Every correction maps the same `CorrectionInputs` (sampled-token log-probs of the rollout model,
the old/proximal policy and optionally the current policy, all (B, T)) to a `CorrectionResult`:
a detached per-token weight, a per-token mask (1 = keep the token in the loss) and statistics.
The policy loss is then `mask * weight * PPO_clip(p_new/p_old, A)` for every variant, so the
training loop never branches on the correction's name: it looks it up in `CORRECTIONS`.

    none     weight 1, mask = response mask (off-policy, uncorrected)
    tis      weight clip(p_old/p_inf, cap_min, cap) at token, sequence or geometric-mean level
             (Yao et al., "Your efficient RL framework secretly brings you off-policy RL training";
             cap_min is TRL's vllm_importance_sampling_clip_min)
    icepop   weight r if r in [low, high] else masked (IcePop / masked IS), same three levels
    jackpot  OBRS (METHOD.md §4): a = min(1, r/lam), Mask = 1[u < a] with one uniform per token
             drawn once per batch, weight min(Z * max(lam, r), c1) * min(p_old/p_tgt, c2).

Each table entry is a `Correction`: the function and what it needs from its caller (`Needs`): a
per-state normaliser Z (and how to compute it), uniforms, the current policy's log-probs (then the
correction changes with every optimizer step and is recomputed per mini-batch). A trainer serves
needs, never names: adding a correction is one function and one table entry.

Jackpot decisions (METHOD.md §4): the mask of eq. 5 is applied (Algorithm 1 omits it); c1 clips the
OBRS factor and c2 clips p_old/p_tgt (c2 = None recovers eq. 5); lam is either fixed or solved per
batch for a target acceptance `budget` (then Z = budget, the (state, token)-space normaliser); a
per-state Z (exact or top-k + kappa) is passed in by the caller, who owns the logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from jackpot.core.checks import (
    SAFETY_BOUND,
    check_budget,
    check_in_range,
    check_logp,
    check_mask,
    check_optional_cap,
    check_positive,
    check_same_shape,
    log_ratio,
    masked_mean,
    to_output_dtype,
)
from jackpot.core.dtypes import compute_dtype
from jackpot.core.obrs import batch_lambda
from jackpot.metric_names import (
    ICEPOP,
    LOG_RATIO_MEAN,
    MASKED_FRAC,
    OBRS,
    OBRS_ACCEPT_PROB_MEAN,
    OBRS_ACCEPT_RATE,
    OBRS_C1_CLIPPED_FRAC,
    OBRS_LAMBDA,
    OBRS_Z_MEAN,
    TIS,
    TIS_CLIPPED_FRAC,
    TIS_CLIPPED_LOW_FRAC,
    WEIGHT_MAX,
    WEIGHT_MEAN,
    WEIGHT_MIN,
)

LEVELS = ("token", "sequence", "geometric")
TARGETS = ("old", "new")
Z_MODES = ("exact", "topk", "batch")


@dataclass(frozen=True)
class CorrectionInputs:
    """Sampled-token quantities of one batch, each (B, T).

    rollout_logp: log p_inf(x_t), the distribution the rollout engine actually sampled from.
    old_logp:     log p_old(x_t), the trained policy when the batch was collected (PPO "old").
    mask:         response mask (1 for generated tokens).
    new_logp:     log p_new(x_t), the current policy (needed only for target="new"); detached here.
    uniforms:     U(0,1) per token, drawn once per batch (Jackpot's mask); None -> expected mask.
    z:            per-state OBRS normaliser Z_t for the chosen target and lam (Jackpot, fixed lam).

    Checked on construction: no NaN anywhere, log-probabilities <= 0, mask 0/1, uniforms in [0, 1], z >= 0.
    Weights are computed in float32 (or float64) whatever the inputs' dtype, and returned in rollout_logp's
    dtype clamped to its finite range (a float16 weight tops out at 65504 instead of overflowing to inf).
    """

    rollout_logp: torch.Tensor
    old_logp: torch.Tensor
    mask: torch.Tensor
    new_logp: torch.Tensor | None = None
    uniforms: torch.Tensor | None = None
    z: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_logp("rollout_logp", self.rollout_logp)
        check_logp("old_logp", self.old_logp)
        if self.new_logp is not None:
            check_logp("new_logp", self.new_logp)
        check_same_shape(rollout_logp=self.rollout_logp, old_logp=self.old_logp, mask=self.mask,
                         new_logp=self.new_logp, uniforms=self.uniforms, z=self.z)
        check_mask("mask", self.mask)
        if self.uniforms is not None:
            check_in_range("uniforms", self.uniforms, 0.0, 1.0)
        if self.z is not None:
            check_in_range("z", self.z, 0.0, math.inf)
        if self.rollout_logp.dim() != 2:
            raise ValueError(f"rollout_logp must be (B, T), got shape {tuple(self.rollout_logp.shape)}")


@dataclass
class CorrectionResult:
    """weights (B, T) detached; mask (B, T) float, 1 = token enters the loss (a fraction for the
    expected-mask ablation: the loss is weighted by it and token-mean divides by its sum); stats:
    0-dim tensors."""

    weights: torch.Tensor
    mask: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)

    def select(self, idx: torch.Tensor) -> CorrectionResult:
        """The rows `idx` of weights and mask (statistics stay with the whole batch)."""
        return CorrectionResult(self.weights[idx], self.mask[idx], {})


@dataclass(frozen=True)
class Needs:
    """What a correction needs from its caller beyond the sampled-token log-probs of p_inf and p_old.

    z:              None, or how to compute the per-state normaliser Z_t passed as `inputs.z`:
                    'exact' (both full distributions at each position) or 'topk' (the rollout's
                    stored top-k, scaled by kappa over the batch the correction is computed on).
    z_lam:          the lambda at which Z_t = sum_x min(p_inf(x), p_tgt(x) / lambda) is wanted.
    uniforms:       one U(0,1) per token, drawn once per rollout batch (`inputs.uniforms`).
    current_policy: `inputs.new_logp` (the policy being optimised): the correction is recomputed for
                    every mini-batch over the whole mini-batch, and Z, if needed, is that of p_new.
    """

    z: str | None = None
    z_lam: float = 1.0
    uniforms: bool = False
    current_policy: bool = False


@dataclass(frozen=True)
class Correction:
    """A table entry: `fn(inputs, **kwargs) -> CorrectionResult` and `needs(**kwargs) -> Needs`,
    both called with the same keyword arguments."""

    fn: Callable[..., CorrectionResult]
    needs: Callable[..., Needs] = lambda **_: Needs()


def _level_log_ratio(lr: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """Per-token log-ratio lifted to `level`: token as is; sequence sum or mean over the response.

    A response holding a token of zero target probability (log-ratio -inf) has sequence ratio 0, also
    when another of its tokens has p_inf = 0 (+inf, a token that cannot have been sampled): the
    undefined 0 * inf is resolved to 0, never NaN.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if level == "token":
        return lr
    m = mask.to(lr.dtype)
    per_token = torch.where(m > 0, lr, torch.zeros_like(lr))
    seq = torch.where((per_token == -math.inf).any(-1, keepdim=True), -math.inf, per_token.sum(-1, keepdim=True))
    if level == "geometric":
        seq = seq / m.sum(-1, keepdim=True).clamp_min(1.0)
    return seq.expand_as(lr)


def _base_stats(prefix: str, log_r: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor,
                keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """The statistics every correction logs under its `prefix` (tis/, icepop/, obrs/)."""
    m = mask > 0
    w = weights[m] if m.any() else weights.new_ones(1)
    return {
        prefix + WEIGHT_MEAN: masked_mean(weights * keep, mask),
        prefix + WEIGHT_MAX: w.max(),
        prefix + WEIGHT_MIN: w.min(),
        prefix + MASKED_FRAC: 1.0 - masked_mean(keep, mask),
        prefix + LOG_RATIO_MEAN: masked_mean(log_r.clamp(-SAFETY_BOUND, SAFETY_BOUND), mask),
    }


def _upcast_inputs(inp: CorrectionInputs, target_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, log(p_tgt/p_inf)) detached, in the compute dtype (float32 for half-precision inputs)."""
    dtype = compute_dtype(inp.rollout_logp)
    tgt = inp.old_logp if target_logp is None else target_logp
    return inp.mask.to(dtype), log_ratio(tgt.detach().to(dtype), inp.rollout_logp.detach().to(dtype))


def _result(inp: CorrectionInputs, weights: torch.Tensor, keep: torch.Tensor,
            stats: dict[str, torch.Tensor]) -> CorrectionResult:
    """Weights and mask back in the inputs' dtype (clamped to its finite range); statistics stay float32+."""
    dtype = inp.rollout_logp.dtype
    return CorrectionResult(to_output_dtype(weights.detach(), dtype), to_output_dtype(keep, dtype), stats)


def no_correction(inp: CorrectionInputs) -> CorrectionResult:
    """Off-policy, uncorrected: every response token kept with weight 1."""
    mask = inp.mask.to(inp.rollout_logp.dtype)
    return CorrectionResult(torch.ones_like(mask), mask, {})


def tis(inp: CorrectionInputs, *, cap: float = 2.0, cap_min: float | None = None,
        level: str = "token") -> CorrectionResult:
    """Truncated importance sampling: weight clip(p_old/p_inf, cap_min, cap) at `level`
    (cap_min None: no lower truncation)."""
    check_positive("cap", cap)
    check_optional_cap("cap_min", cap_min)
    if cap_min is not None and cap_min > cap:
        raise ValueError(f"cap_min ({cap_min}) must be <= cap ({cap})")
    mask, lr = _upcast_inputs(inp)
    lr = _level_log_ratio(lr, mask, level)
    w = lr.clamp(-SAFETY_BOUND, SAFETY_BOUND).exp().clamp(min=cap_min, max=cap)
    stats = _base_stats(TIS, lr, w, mask, mask)
    stats[TIS_CLIPPED_FRAC] = masked_mean((lr.exp() > cap).to(mask.dtype), mask)
    if cap_min is not None:
        stats[TIS_CLIPPED_LOW_FRAC] = masked_mean((lr.exp() < cap_min).to(mask.dtype), mask)
    return _result(inp, w, mask, stats)


def icepop(inp: CorrectionInputs, *, low: float = 0.5, high: float = 2.0, level: str = "token") -> CorrectionResult:
    """IcePop / masked IS: weight r = p_old/p_inf where low <= r <= high, token masked otherwise."""
    check_positive("low", low)
    check_positive("high", high)
    if low > high:
        raise ValueError(f"low ({low}) must be <= high ({high})")
    mask, lr = _upcast_inputs(inp)
    lr = _level_log_ratio(lr, mask, level)
    r = lr.clamp(-SAFETY_BOUND, SAFETY_BOUND).exp()
    keep = ((r >= low) & (r <= high)).to(mask.dtype) * mask
    return _result(inp, r * keep, keep, _base_stats(ICEPOP, lr, r * keep, mask, keep))


def jackpot(
    inp: CorrectionInputs,
    *,
    lam: float = 1.0,
    budget: float | None = None,
    target: str = "old",
    z: str = "exact",
    c1: float | None = None,
    c2: float | None = None,
    sampled_mask: bool = True,
) -> CorrectionResult:
    """Jackpot / OBRS weights and mask (paper eq. 5, Algorithm 1; METHOD.md §4).

    lam: fixed lam > 0, used when budget is None.
    budget: if set, lam is solved over this batch's tokens so the mean acceptance equals it
        (batch_lambda) and Z = budget; `z` and `inp.z` are then not used.
    target: "old" aligns p_inf to p_old; "new" to the current policy (needs inp.new_logp).
    z: where the per-state normaliser comes from: "exact" or "topk" (the caller computes it and
        passes `inp.z`; see `Needs`) or "batch" (no per-state Z: the batch's mean acceptance, the
        (state, token)-space normaliser for a fixed lam).
    c1: clip of the OBRS weight Z * max(lam, r) (None: no clip).
    c2: clip of p_old/p_tgt (only matters for target="new"; None: no clip).
    sampled_mask: True (the paper): Mask = 1[u < a] with `inp.uniforms`; False: the expected-mask
        ablation, mask = a (a fraction of each token kept) and the same weight, so that every
        aggregation divides by the expected kept count and the loss has the sampled mask's scale in
        expectation.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if z not in Z_MODES:
        raise ValueError(f"z must be one of {Z_MODES}, got {z!r}")
    check_optional_cap("c1", c1)
    check_optional_cap("c2", c2)
    if target == "new" and inp.new_logp is None:
        raise ValueError("target='new' needs new_logp in CorrectionInputs")
    if sampled_mask and inp.uniforms is None:
        raise ValueError("sampled_mask=True needs uniforms in CorrectionInputs (one U(0,1) per token)")
    mask, lr = _upcast_inputs(inp, inp.old_logp if target == "old" else inp.new_logp)
    if budget is not None:
        check_budget("budget", budget)
        lam_t = batch_lambda(lr, mask, budget)
        log_z = torch.full_like(lr, float(budget)).log()
    else:
        check_positive("lam", lam)
        lam_t = torch.tensor(float(lam), dtype=lr.dtype, device=lr.device)
        if z == "batch":  # (state, token)-space normaliser for a fixed lam: the batch's mean acceptance
            a_bar = masked_mean((lr - lam_t.log()).clamp_max(0.0).exp(), mask)
            log_z = a_bar.clamp_min(torch.finfo(lr.dtype).tiny).log().expand_as(lr)
        elif inp.z is None:
            raise ValueError(f"z={z!r} needs the per-state normaliser in CorrectionInputs.z")
        else:
            log_z = inp.z.detach().to(lr.dtype).clamp_min(torch.finfo(lr.dtype).tiny).log()
    log_lam = lam_t.log()
    accept_prob = (lr - log_lam).clamp_max(0.0).exp()
    log_w = (log_z + torch.maximum(lr, log_lam.expand_as(lr))).clamp(-SAFETY_BOUND, SAFETY_BOUND)
    w = log_w.exp() if c1 is None else log_w.exp().clamp_max(c1)
    if target == "new":
        old, new = inp.old_logp.detach().to(lr.dtype), inp.new_logp.detach().to(lr.dtype)
        second = log_ratio(old, new).clamp(-SAFETY_BOUND, SAFETY_BOUND).exp()
        w = w * (second if c2 is None else second.clamp_max(c2))
    if sampled_mask:
        keep = (inp.uniforms < accept_prob).to(mask.dtype) * mask
    else:
        keep = accept_prob * mask
    stats = _base_stats(OBRS, lr, w, mask, keep)
    stats.update({
        OBRS_ACCEPT_RATE: masked_mean(keep, mask),
        OBRS_ACCEPT_PROB_MEAN: masked_mean(accept_prob, mask),
        OBRS_LAMBDA: lam_t,
        OBRS_Z_MEAN: masked_mean(log_z.exp(), mask),
        OBRS_C1_CLIPPED_FRAC: masked_mean((log_w.exp() > c1).to(mask.dtype), mask) if c1 else lr.new_zeros(()),
    })
    return _result(inp, w, keep, stats)


def _jackpot_needs(*, lam: float = 1.0, budget: float | None = None, target: str = "old", z: str = "exact",
                   sampled_mask: bool = True, **_) -> Needs:
    per_state = budget is None and z != "batch"
    return Needs(z=z if per_state else None, z_lam=lam, uniforms=sampled_mask, current_policy=target == "new")


CORRECTIONS: dict[str, Correction] = {
    "none": Correction(no_correction),
    "tis": Correction(tis),
    "icepop": Correction(icepop),
    "jackpot": Correction(jackpot, _jackpot_needs),
}


def _entry(name: str) -> Correction:
    if name not in CORRECTIONS:
        raise ValueError(f"unknown correction {name!r}; choose one of {sorted(CORRECTIONS)}")
    return CORRECTIONS[name]


def correction_needs(name: str, **kwargs) -> Needs:
    """What correction `name`, configured with `kwargs`, needs from its caller."""
    return _entry(name).needs(**kwargs)


def correction_params(name: str) -> tuple[str, ...]:
    """The keyword arguments correction `name` accepts."""
    import inspect

    return tuple(k for k in inspect.signature(_entry(name).fn).parameters if k != "inp")


def apply_correction(name: str, inp: CorrectionInputs, **kwargs) -> CorrectionResult:
    """Look up `name` in CORRECTIONS and call it; a clear error for an unknown name."""
    return _entry(name).fn(inp, **kwargs)


def batch_jackpot(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, *, lam: float = 1.0,
                  budget: float | None = None, c1: float | None = 2.0, sampled_mask: bool = True,
                  uniforms: torch.Tensor | None = None) -> CorrectionResult:
    """Jackpot over one whole batch from sampled-token log-probs alone: what a framework's batch-level hook can
    compute (verl's driver, TRL's generation step), where no per-state Z is at hand.

    `jackpot` with target="old" and z="batch" (METHOD.md §4.2): lam fixed with the batch's mean acceptance as Z,
    or lam solved for the target acceptance `budget`; weight min(Z * max(lam, r), c1), r = p_old / p_inf.
    old_logp, rollout_logp, mask (B, T), any float dtype (computed in float32 or wider, detached); uniforms
    (B, T) U(0, 1) for the sampled mask, drawn from torch's default generator in the compute dtype when None
    (seed it for reproducible masks); sampled_mask False: the expected-mask ablation (no uniforms).
    """
    dtype = compute_dtype(old_logp)
    old = old_logp.detach().to(dtype)
    if sampled_mask and uniforms is None:
        uniforms = torch.rand(old.shape, dtype=dtype, device=old.device)
    inputs = CorrectionInputs(rollout_logp=rollout_logp.detach().to(dtype), old_logp=old, mask=mask.to(dtype),
                              uniforms=uniforms if sampled_mask else None)
    return jackpot(inputs, lam=lam, budget=budget, target="old", z="batch", c1=c1, sampled_mask=sampled_mask)
