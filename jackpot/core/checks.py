"""Input validation shared by the public entry points of `jackpot.core`.

Every public function checks its arguments with these helpers so that bad input fails early with a
`ValueError` that names the offending argument, instead of surfacing later as a NaN in a loss. A plain
ValueError, not `jackpot.errors.InputError`: the trainer validates what a user gives before it reaches
this math, so one raised here from `jackpot train` is a bug and keeps its traceback.
"""

from __future__ import annotations

import math

import torch

# Log-ratios are clamped to [-SAFETY_BOUND, SAFETY_BOUND] before `exp` wherever the result feeds a
# loss or a weight, so that a single pathological token cannot produce inf (e^20 ~ 4.9e8).
SAFETY_BOUND = 20.0


# Log-probabilities can exceed 0 by rounding: log_softmax of a near-one-hot row gives ~1e-7 in float32, and
# in half precision x - logsumexp(x) is rounded at the spacing of |x| (0.125 at |x| = 20 in bfloat16).
# Anything above this is not a log-probability (logits or log-ratios passed by mistake).
LOGP_TOLERANCE = 1e-4


def logp_tolerance(dtype: torch.dtype) -> float:
    """LOGP_TOLERANCE, or 16 machine epsilons for a dtype too coarse for it (float16: 0.016, bfloat16: 0.125)."""
    return max(LOGP_TOLERANCE, 16 * torch.finfo(dtype).eps)


def check_logits(name: str, x: torch.Tensor) -> None:
    """Logits or log-probabilities: a floating tensor with no NaN and no +inf (-inf means probability zero)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN")
    if (x == math.inf).any():
        raise ValueError(f"{name} contains +inf")


def check_logp(name: str, x: torch.Tensor) -> None:
    """Log-probabilities: a floating tensor with no NaN, no +inf and nothing above 0 (beyond LOGP_TOLERANCE);
    -inf means probability zero."""
    check_logits(name, x)
    if x.numel() and (top := float(x.detach().max())) > logp_tolerance(x.dtype):
        raise ValueError(f"{name} has values above 0 (max {top:.4g}): log-probabilities must be <= 0 "
                         "(were logits or log-ratios passed?)")


def check_mask(name: str, mask: torch.Tensor) -> None:
    """A 0/1 mask: bool, integer or floating, every value exactly 0 or 1 (NaN is neither)."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
        bad = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
        raise ValueError(f"{name} must hold only 0 and 1, found {bad!r}")


def check_in_range(name: str, x: torch.Tensor, low: float, high: float) -> None:
    """A floating tensor with every value in [low, high] (NaN fails)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point torch.Tensor")
    if not ((x >= low) & (x <= high)).all():
        bad = x[~((x >= low) & (x <= high))].flatten()[0].item()
        raise ValueError(f"{name} must lie in [{low:g}, {high:g}], found {bad!r}")


def check_finite(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")


def check_same_shape(**tensors: torch.Tensor | None) -> None:
    named = [(k, v) for k, v in tensors.items() if v is not None]
    (first_name, first), *rest = named
    for name, t in rest:
        if t.shape != first.shape:
            raise ValueError(
                f"shape mismatch: {first_name} has shape {tuple(first.shape)} but {name} has shape {tuple(t.shape)}"
            )


def check_positive(name: str, value: float | torch.Tensor) -> None:
    if isinstance(value, torch.Tensor):
        if torch.isnan(value).any() or (value <= 0).any() or torch.isinf(value).any():
            raise ValueError(f"{name} must be finite and > 0 everywhere")
    elif not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_budget(name: str, budget: float) -> None:
    if not (isinstance(budget, (int, float)) and 0.0 < budget <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {budget!r}")


def check_optional_cap(name: str, value: float | None) -> None:
    if value is not None:
        check_positive(name, value)


def to_output_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` (computed in float32 or wider) in `dtype`, clamped to that dtype's finite range (float16 tops out at
    65504), so a half-precision result is never inf."""
    if x.dtype == dtype:
        return x
    info = torch.finfo(dtype)
    return x.clamp(info.min, info.max).to(dtype)


def as_log(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """log(value) as a tensor on `like`'s device/dtype (value already validated > 0)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=like.dtype).log()
    return torch.tensor(math.log(value), device=like.device, dtype=like.dtype)


def log_ratio(target_logp: torch.Tensor, rollout_logp: torch.Tensor) -> torch.Tensor:
    """log(p_tgt / p_inf) with the convention 0/0 -> ratio 1 (log 0), never NaN.

    p_tgt = 0 < p_inf gives -inf (ratio 0); p_inf = 0 < p_tgt gives +inf (such a token is never proposed).
    """
    diff = target_logp - rollout_logp
    both_zero = (target_logp == -math.inf) & (rollout_logp == -math.inf)
    return torch.where(both_zero, torch.zeros_like(diff), diff)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask (0 where the mask is empty)."""
    mask = mask.to(x.dtype)
    x = torch.where(mask > 0, x, torch.zeros_like(x))  # keeps inf/NaN of masked-out entries out of the sum
    return (x * mask).sum() / mask.sum().clamp_min(1.0)
