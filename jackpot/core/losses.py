"""Policy-gradient and distillation losses, per token, with explicit aggregation.

PPO (Schulman et al. 2017), per token, to be *minimised*:
    ratio = p_new / p_old
    clipped:   -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    unclipped: -ratio * A          (pure importance-sampled policy gradient; the paper's "no-clip")
    dual clip: for A < 0 the clipped loss is further capped at -c * A (Ye et al. 2020, verl's
               `clip_ratio_c`, c > 1): a token whose ratio exploded cannot dominate a negative update.
The correction's weight and mask multiply this per-token loss (see corrections.py).

Aggregation (`aggregate`) is a named choice because rejection changes the scale (METHOD.md §4).
`keep` is the correction's mask: 0/1, or fractional for the expected-mask ablation (a kept
"fraction" of a token), and every sum below is weighted by it:
    token-mean          sum(loss * keep) / sum(keep)       mean over *kept* (accepted) tokens (verl: same name)
    token-mean-all      sum(loss * keep) / sum(response)   mean over all response tokens
    token-sum           sum(loss * keep)                   (verl: token-sum)
    seq-mean-token-mean mean over sequences of the per-sequence token mean (over kept tokens); a
                        sequence with no kept token adds 0 and still counts among the sequences
                        (verl: same name)
    seq-mean-token-sum  sum(loss * keep) / num_seqs        (verl: same name)
    seq-sum-norm        sum(loss * keep) / (num_seqs * norm_len)   (Dr.GRPO's constant normaliser;
                        verl's seq-mean-token-sum-norm with loss_scale_factor = norm_len, per sequence)
`loss_denominator` is the one rule for the denominator; the trainer calls it on a whole mini-batch.
Every correction that masks tokens (Jackpot, IcePop) interacts with this choice: under token-mean a
masked token leaves the denominator as well as the sum, so IcePop's "weight 0 outside [low, high]"
(METHOD.md §7) is reproduced to the letter by token-mean-all, and scaled by 1/kept-fraction under
token-mean.
For gradient accumulation, pass the *global* denominator of the whole mini-batch so that the sum
of micro-batch losses equals the mini-batch loss (1 x 8 == 8 x 1).

Distillation of the rollout model toward the policy (paper eq. 7-8), per position:
    forward  KL(SG(p_new) || p_omega)   (eq. 7, default)     reverse  KL(p_omega || SG(p_new))
estimators: "full" (exact over the vocabulary: computed from hidden states and heads, a chunk of positions
at a time, by `jackpot.core.head.joint_logprobs` / `kl_from_hidden`), "topk" (the teacher's top-k tokens
only) and "sampled" (the sampled tokens only, importance-weighted from p_inf: k1 for forward; k3 as the
value and the score-function gradient for reverse, whose expectation is over the student's own
distribution); `distill_kl_at` computes the last two from the student's log-probs at those tokens.
"""

from __future__ import annotations

import torch

from jackpot.core.checks import SAFETY_BOUND, check_logits, check_same_shape
from jackpot.core.dtypes import upcast

AGGREGATIONS = ("token-mean", "token-mean-all", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
                "seq-sum-norm")
KL_DIRECTIONS = ("forward", "reverse")
KL_ESTIMATORS = ("full", "topk", "sampled")


def ppo_token_loss(
    new_logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_eps: float | None = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO loss (B, T) and detached per-token diagnostics.

    new_logp (B, T) carries the gradient; old_logp (B, T) is treated as a constant; advantages (B, T)
    or (B,) (broadcast over T). clip_eps None gives the unclipped loss -ratio * A.
    dual_clip: c > 1 caps the loss of negative-advantage tokens at -c * A (None: no dual clip).
    Returns (loss, {"ratio", "clipped", "clipped_lower"}) — per-token tensors, reduce them with a mask;
    "clipped_lower" marks the tokens the dual clip capped.
    """
    check_logits("new_logp", new_logp)  # only their difference matters here
    check_logits("old_logp", old_logp)
    check_same_shape(new_logp=new_logp, old_logp=old_logp)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(new_logp)
    check_same_shape(new_logp=new_logp, advantages=advantages)
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip!r}")
    log_ratio = (new_logp - old_logp.detach()).clamp(-SAFETY_BOUND, SAFETY_BOUND)
    ratio = log_ratio.exp()
    unclipped = -ratio * advantages
    if clip_eps is None:
        loss, clipped_mask = unclipped, torch.zeros_like(ratio)
    else:
        high = clip_eps if clip_eps_high is None else clip_eps_high
        clipped = -ratio.clamp(1.0 - clip_eps, 1.0 + high) * advantages
        loss, clipped_mask = torch.maximum(unclipped, clipped), (clipped > unclipped).to(ratio.dtype)
    lower = torch.zeros_like(ratio)
    if dual_clip is not None:
        cap = -dual_clip * advantages
        lower = ((advantages < 0) & (loss > cap)).to(ratio.dtype)
        loss = torch.where(advantages < 0, torch.minimum(loss, cap), loss)
    return loss, {"ratio": ratio.detach(), "clipped": clipped_mask.detach(), "clipped_lower": lower.detach()}


def loss_denominator(
    keep: torch.Tensor,
    mode: str,
    *,
    response_mask: torch.Tensor | None = None,
    norm_len: int | None = None,
) -> torch.Tensor:
    """The denominator of `mode` (see the module docstring) over `keep` (B, T), as a tensor (0 -> 1).

    The trainer calls it once on a whole mini-batch and passes the result to `aggregate` for each of
    its micro-batches, so that the micro-batch losses sum to the mini-batch loss.
    response_mask (B, T): all response tokens (token-mean-all; defaults to keep).
    norm_len: the constant length of seq-sum-norm (defaults to T).
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"loss aggregation must be one of {AGGREGATIONS}, got {mode!r}")
    check_same_shape(keep=keep, response_mask=response_mask)
    keep = keep if keep.is_floating_point() else keep.float()
    if mode == "token-mean":
        d = keep.sum()
    elif mode == "token-mean-all":
        d = (keep if response_mask is None else response_mask.to(keep.dtype)).sum()
    elif mode == "token-sum":
        d = keep.new_ones(())
    elif mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
        d = keep.new_tensor(float(keep.shape[0]))
    else:
        d = keep.new_tensor(float(keep.shape[0] * (norm_len or keep.shape[-1])))
    return _nonzero(d)


def _nonzero(d: torch.Tensor) -> torch.Tensor:
    """An empty denominator (nothing kept) becomes 1, so the loss is 0 rather than NaN."""
    return torch.where(d > 0, d, torch.ones_like(d))


def aggregate(
    loss: torch.Tensor,
    keep: torch.Tensor,
    mode: str = "token-mean",
    *,
    response_mask: torch.Tensor | None = None,
    denominator: torch.Tensor | float | None = None,
    norm_len: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss (B, T) to a scalar; see the module docstring for the modes.

    keep: (B, T) tokens that enter the loss (response mask times the correction's mask), 0/1 or a
        fraction (expected mask); the loss is weighted by it.
    response_mask: (B, T) all response tokens (needed for token-mean-all; defaults to keep).
    denominator: overrides `loss_denominator(keep, mode, ...)` — pass the mini-batch's when
        accumulating gradients over micro-batches.
    norm_len: the constant length for seq-sum-norm (defaults to T).
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"loss aggregation must be one of {AGGREGATIONS}, got {mode!r}")
    check_same_shape(loss=loss, keep=keep, response_mask=response_mask)
    keep = keep.to(loss.dtype)
    kept = torch.where(keep > 0, loss, torch.zeros_like(loss)) * keep  # masked-out NaN/inf stay out
    if mode == "seq-mean-token-mean":
        numerator = (kept.sum(-1) / _nonzero(keep.sum(-1))).sum()
    else:
        numerator = kept.sum()
    if denominator is None:
        denominator = loss_denominator(keep, mode, response_mask=response_mask, norm_len=norm_len)
    elif isinstance(denominator, torch.Tensor):
        denominator = _nonzero(denominator)
    else:
        denominator = float(denominator) if denominator > 0 else 1.0
    return numerator / denominator


def distill_kl_at(
    student_logp: torch.Tensor,
    *,
    direction: str = "forward",
    estimator: str = "topk",
    teacher_logp: torch.Tensor,
    rollout_logp: torch.Tensor | None = None,
    is_cap: float = 2.0,
) -> torch.Tensor:
    """The sparse distillation estimators (module docstring) from the student's log-probs at chosen tokens.

    estimator "topk": student_logp and teacher_logp (..., K) at the teacher's top-k tokens -> (...).
    estimator "sampled": student_logp, teacher_logp, rollout_logp (...) at the sampled tokens -> (...).
    Used when the student's log-probs come from its hidden states and head (jackpot.core.head), so
    that no full (B, T, V) log-softmax is formed; the gradient flows through student_logp.
    """
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"direction must be one of {KL_DIRECTIONS}, got {direction!r}")
    reverse = direction == "reverse"
    ls, lt = upcast(student_logp), upcast(teacher_logp.detach())
    if estimator == "topk":
        check_same_shape(student_logp=student_logp, teacher_logp=teacher_logp)
        terms = ls.exp() * (ls - lt) if reverse else lt.exp() * (lt - ls)
        return terms.sum(-1)
    if estimator != "sampled":
        raise ValueError(f"estimator must be 'topk' or 'sampled' here, got {estimator!r}")
    if rollout_logp is None:
        raise ValueError("estimator='sampled' needs rollout_logp (log p_inf of the sampled tokens)")
    check_same_shape(student_logp=student_logp, teacher_logp=teacher_logp, rollout_logp=rollout_logp)
    lb = upcast(rollout_logp.detach())
    if reverse:
        w = (ls.detach() - lb).clamp(-SAFETY_BOUND, SAFETY_BOUND).exp().clamp_max(is_cap)
        log_rho = (lt - ls.detach()).clamp(-SAFETY_BOUND, SAFETY_BOUND)
        value = w * (log_rho.exp() - 1.0 - log_rho)
        surrogate = w * (-log_rho) * ls  # gradient: w * (log p_s - log p_t) * grad log p_s
        return value + surrogate - surrogate.detach()
    w = (lt - lb).clamp(-SAFETY_BOUND, SAFETY_BOUND).exp().clamp_max(is_cap)
    return w * (lt - ls)
