"""Optimal Budgeted Rejection Sampling (OBRS) at the token level.

A token x ~ p_inf (the rollout model) is accepted with probability

    a(x) = min(1, p_tgt(x) / (lam * p_inf(x)))            (lam > 0)

and the accepted tokens follow p'_inf(x) = min(p_inf(x), p_tgt(x)/lam) / Z with
Z = sum_x min(p_inf(x), p_tgt(x)/lam), which is also the expected acceptance rate at that state.
The importance weight of an accepted token is p_tgt/p'_inf = Z * max(lam, r), r = p_tgt/p_inf.

What is here (all pure functions on tensors, batched over leading dims, log space throughout):
    acceptance_prob     a = min(1, r/lam) elementwise
    normalizer          exact Z from full log-prob vectors (last dim = vocabulary)
    normalizer_from_logits   exact Z from logits, streamed over vocabulary chunks
    obrs_kl_from_logits      KL(p_tgt || p_inf) and KL(p_tgt || p'_inf), streamed over chunks
    topk_normalizer     Z restricted to the union of the two models' top-k sets (under-estimates Z)
    kappa               the batch bias correction of the top-k Z (paper §4.4), clamped >= 1
    lambda_for_budget   exact lam per state so that Z(lam) = budget (sort + prefix sums, no bisection)
    batch_lambda        exact scalar lam so that the mean acceptance over sampled tokens = budget

Departures from the paper ("Jackpot", arXiv 2602.06107), all documented in METHOD.md:
  * lam for a budget is solved exactly by sorting (the OBRS authors bisect);
  * Z can be computed exactly from logits in vocabulary chunks, not only by top-k + kappa;
  * batch_lambda is OBRS on the (state, token) sample space, whose weight budget * max(lam, r) needs
    no per-state Z at all.

References: Verine et al., "Optimal Budgeted Rejection Sampling for Generative Models", AISTATS 2024;
Chen et al., "Jackpot", ICLR 2026.
"""

from __future__ import annotations

import math

import torch

from jackpot.core.checks import (
    as_log,
    check_budget,
    check_in_range,
    check_logp,
    check_mask,
    check_positive,
    check_same_shape,
    log_ratio,
)
from jackpot.core.dtypes import compute_dtype, upcast

DEFAULT_VOCAB_CHUNK = 8192


def acceptance_prob(target_logp: torch.Tensor, rollout_logp: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """a = min(1, exp(target_logp - rollout_logp) / lam), elementwise.

    Args:
        target_logp, rollout_logp: same shape (...), log-probabilities (-inf allowed for zero mass).
        lam: float > 0, or a tensor broadcastable to the inputs (e.g. (..., 1) from lambda_for_budget).
    Returns a tensor of the inputs' shape in [0, 1]. A token with p_inf = 0 gets a = 1 (never proposed).
    """
    check_logp("target_logp", target_logp)
    check_logp("rollout_logp", rollout_logp)
    check_same_shape(target_logp=target_logp, rollout_logp=rollout_logp)
    check_positive("lam", lam)
    log_a = (log_ratio(target_logp, rollout_logp) - as_log(lam, target_logp)).clamp_max(0.0)
    a = log_a.exp()
    # p_inf = 0: never proposed, a = 1 (also where p_tgt = 0, whose ratio log_ratio takes as 1)
    return torch.where(rollout_logp == -math.inf, torch.ones_like(a), a)


def normalizer(target_logp: torch.Tensor, rollout_logp: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """Exact Z = sum_x min(p_inf(x), p_tgt(x)/lam) over the last (vocabulary) dim.

    Args: target_logp, rollout_logp (..., V) full log-probability vectors; lam > 0 (float or (..., 1)).
    Returns (...): Z in [0, 1], the expected acceptance rate at each state.
    """
    check_logp("target_logp", target_logp)
    check_logp("rollout_logp", rollout_logp)
    check_same_shape(target_logp=target_logp, rollout_logp=rollout_logp)
    check_positive("lam", lam)
    return torch.minimum(rollout_logp, target_logp - as_log(lam, target_logp)).exp().sum(-1)


def chunked_logsumexp(logits: torch.Tensor, chunk: int, name: str = "logits") -> torch.Tensor:
    """logsumexp over the last dim, one vocabulary chunk at a time (float32 or wider).

    Also the NaN / +inf check of `logits`: either one makes its row's logsumexp NaN / +inf, so
    checking the (rows,) result costs nothing, where checking the input would allocate a mask as
    large as the logits.
    """
    if chunk <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk}")
    out = None
    for start in range(0, logits.shape[-1], chunk):
        part = torch.logsumexp(upcast(logits[..., start:start + chunk]), dim=-1)
        out = part if out is None else torch.logaddexp(out, part)
    if torch.isnan(out).any():
        raise ValueError(f"{name} contains NaN")
    if (out == math.inf).any():
        raise ValueError(f"{name} contains +inf")
    return out


def _chunks_of_logp(target_logits: torch.Tensor, rollout_logits: torch.Tensor, chunk: int):
    """Yield (log p_tgt, log p_inf) for consecutive vocabulary chunks (float32, never all of V at once)."""
    lse_t = chunked_logsumexp(target_logits, chunk, "target_logits").unsqueeze(-1)
    lse_r = chunked_logsumexp(rollout_logits, chunk, "rollout_logits").unsqueeze(-1)
    for start in range(0, target_logits.shape[-1], chunk):
        t = upcast(target_logits[..., start:start + chunk]) - lse_t
        r = upcast(rollout_logits[..., start:start + chunk]) - lse_r
        yield t, r


def _check_logits(target_logits: torch.Tensor, rollout_logits: torch.Tensor) -> None:
    """Type and shape only; NaN / +inf are caught chunk by chunk in `chunked_logsumexp`."""
    for name, x in (("target_logits", target_logits), ("rollout_logits", rollout_logits)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point torch.Tensor")
    check_same_shape(target_logits=target_logits, rollout_logits=rollout_logits)


def normalizer_from_logits(
    target_logits: torch.Tensor,
    rollout_logits: torch.Tensor,
    lam: float | torch.Tensor,
    *,
    chunk_size: int = DEFAULT_VOCAB_CHUNK,
) -> torch.Tensor:
    """Exact Z from (unnormalised) logits, streaming over the vocabulary.

    Args:
        target_logits, rollout_logits: (..., V), any float dtype (bf16 is upcast chunk by chunk);
            temperature must already be applied.
        lam: float > 0 or tensor broadcastable to (..., 1).
        chunk_size: vocabulary columns processed at once; extra memory is O(rows * chunk_size).
    Returns (...) Z in float32 (float64 for float64 inputs). Equals
    `normalizer(log_softmax(t), log_softmax(r), lam)` without ever holding a full (..., V) probability tensor.
    """
    _check_logits(target_logits, rollout_logits)
    check_positive("lam", lam)
    dtype = compute_dtype(target_logits)
    log_lam = as_log(lam, torch.empty((), dtype=dtype, device=target_logits.device))
    z = torch.zeros(target_logits.shape[:-1], dtype=dtype, device=target_logits.device)
    for t, r in _chunks_of_logp(target_logits, rollout_logits, chunk_size):
        z += torch.minimum(r, t - log_lam).exp_().sum(-1)
    return z


def obrs_kl_from_logits(
    target_logits: torch.Tensor,
    rollout_logits: torch.Tensor,
    lam: float | torch.Tensor,
    *,
    chunk_size: int = DEFAULT_VOCAB_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Z, KL(p_tgt || p_inf), KL(p_tgt || p'_inf)) per state, streamed over vocabulary chunks.

    Uses the closed form KL(p_tgt || p'_inf) = log Z + E_tgt[log max(r, lam)] (METHOD.md §3).
    KL is +inf where p_tgt puts mass on a token that p_inf cannot produce. Shapes: (..., V) -> (...).
    """
    _check_logits(target_logits, rollout_logits)
    check_positive("lam", lam)
    dtype = compute_dtype(target_logits)
    log_lam = as_log(lam, torch.empty((), dtype=dtype, device=target_logits.device))
    shape = target_logits.shape[:-1]
    z, kl_before, e_log_max = (torch.zeros(shape, dtype=dtype, device=target_logits.device) for _ in range(3))
    for t, r in _chunks_of_logp(target_logits, rollout_logits, chunk_size):
        p = t.exp()
        lr = log_ratio(t, r)
        z += torch.minimum(r, t - log_lam).exp().sum(-1)
        kl_before += torch.where(p > 0, p * lr, torch.zeros_like(p)).sum(-1)
        e_log_max += torch.where(p > 0, p * torch.maximum(lr, log_lam.expand_as(lr)), torch.zeros_like(p)).sum(-1)
    # Z = 0 (disjoint supports): nothing is accepted and p_tgt has mass outside supp p_inf, so KL = +inf
    kl_after = torch.where(z > 0, z.log() + e_log_max, torch.full_like(z, math.inf))
    return z, kl_before, kl_after


def topk_normalizer(
    rollout_topk_ids: torch.Tensor,
    rollout_topk_logp: torch.Tensor,
    target_logp_at_rollout_topk: torch.Tensor,
    lam: float | torch.Tensor,
    *,
    target_topk_ids: torch.Tensor | None = None,
    target_topk_logp: torch.Tensor | None = None,
    rollout_logp_at_target_topk: torch.Tensor | None = None,
) -> torch.Tensor:
    """Z restricted to V_k = topk(p_inf) ∪ topk(p_tgt) (paper §4.4). Always <= the exact Z.

    Args:
        rollout_topk_ids, rollout_topk_logp: (..., K) the rollout engine's stored top-k of p_inf.
        target_logp_at_rollout_topk: (..., K) log p_tgt gathered at rollout_topk_ids.
        lam: float > 0 or tensor broadcastable to (..., 1).
        target_topk_ids, target_topk_logp: (..., K2) optional top-k of p_tgt.
        rollout_logp_at_target_topk: (..., K2) log p_inf at target_topk_ids, when the rollout model's
            distribution is at hand. Without it p_inf there is unknown and taken as 0, so tokens of
            topk(p_tgt) outside topk(p_inf) add nothing (the batch correction `kappa` absorbs them).
    Returns (...) Z_approx. Duplicate ids (in both top-k sets) are counted once.
    """
    check_logp("rollout_topk_logp", rollout_topk_logp)
    check_logp("target_logp_at_rollout_topk", target_logp_at_rollout_topk)
    check_same_shape(rollout_topk_ids=rollout_topk_ids, rollout_topk_logp=rollout_topk_logp,
                     target_logp_at_rollout_topk=target_logp_at_rollout_topk)
    check_positive("lam", lam)
    log_lam = as_log(lam, rollout_topk_logp)
    z = torch.minimum(rollout_topk_logp, target_logp_at_rollout_topk - log_lam).exp().sum(-1)
    if rollout_logp_at_target_topk is None:
        return z
    if target_topk_ids is None or target_topk_logp is None:
        raise ValueError("rollout_logp_at_target_topk needs target_topk_ids and target_topk_logp")
    check_logp("target_topk_logp", target_topk_logp)
    check_logp("rollout_logp_at_target_topk", rollout_logp_at_target_topk)
    check_same_shape(target_topk_ids=target_topk_ids, target_topk_logp=target_topk_logp,
                     rollout_logp_at_target_topk=rollout_logp_at_target_topk)
    seen = (target_topk_ids.unsqueeze(-1) == rollout_topk_ids.unsqueeze(-2)).any(-1)  # (..., K2)
    extra = torch.minimum(rollout_logp_at_target_topk, target_topk_logp - log_lam).exp()
    return z + torch.where(seen, torch.zeros_like(extra), extra).sum(-1)


def kappa(accept_prob: torch.Tensor, z_approx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Batch bias correction kappa = mean_t a_t / mean_t Z_approx(t), clamped >= 1 (METHOD.md §4.1).

    Since E_s[Z(s)] equals the mean acceptance, scaling the top-k Z (which can only under-estimate)
    by kappa makes its batch mean match. Args: (B, T) each; returns a 0-dim tensor (detached).
    """
    check_same_shape(accept_prob=accept_prob, z_approx=z_approx, mask=mask)
    check_in_range("accept_prob", accept_prob, 0.0, 1.0)
    check_in_range("z_approx", z_approx, 0.0, math.inf)
    check_mask("mask", mask)
    m = mask.to(accept_prob.dtype)
    a_mean = (accept_prob.detach() * m).sum()
    z_mean = (z_approx.detach() * m).sum()
    return (a_mean / z_mean.clamp_min(torch.finfo(z_mean.dtype).tiny)).clamp_min(1.0)


def _solve_lambda(log_r: torch.Tensor, log_q: torch.Tensor, budget: float) -> torch.Tensor:
    """Exact lam per row with sum_j q_j * min(1, r_j / lam) = budget (last dim), in float64.

    q_j is the proposal mass of item j (-inf: excluded), r_j its ratio (-inf: zero target mass).
    With items sorted by r ascending and prefix sums P_k = sum q r, Q_k = sum q, the acceptance on
    [r_k, r_k+1] is P_k/lam + Q_tot - Q_k; the breakpoint values A_k are non-increasing, so with
    k* = max{k : A_k >= budget}, lam* = P_k* / (budget - Q_tot + Q_k*). A budget above the largest
    reachable acceptance (mass of q where r > 0) returns the smallest positive r, which attains it.
    """
    log_r, log_q = log_r.double(), log_q.double()
    excluded = log_q == -math.inf
    q = log_q.exp()
    # excluded items sort last with no mass; zero-ratio items sort first and only add to Q.
    key = torch.where(excluded, torch.full_like(log_r, math.inf), log_r)
    key, order = key.sort(dim=-1)
    q = q.gather(-1, order)
    log_r_sorted = torch.where(key == math.inf, torch.zeros_like(key), key)
    p = torch.where(key == -math.inf, torch.zeros_like(q), q * log_r_sorted.exp())
    P, Q = p.cumsum(-1), q.cumsum(-1)
    q_tot = Q[..., -1:]
    positive = (key > -math.inf) & (key < math.inf)
    A = torch.where(positive, P / key.exp() + q_tot - Q, torch.full_like(P, -math.inf))
    # zero-ratio items precede every positive one and can never be k*; A is -inf for them too.
    idx = torch.arange(A.shape[-1], device=A.device).expand_as(A)
    k_star = torch.where(A >= budget, idx, torch.full_like(idx, -1)).amax(-1, keepdim=True)
    first_pos = torch.where(positive, idx, torch.full_like(idx, A.shape[-1])).amin(-1, keepdim=True)
    if (first_pos >= A.shape[-1]).any():
        raise ValueError("no item with positive target and rollout mass: lambda is undefined for that row")
    r_min = key.gather(-1, first_pos).exp()
    unreachable = (k_star < 0) | (budget >= 1.0)  # budget 1: exactly r_min (the formula can be off by an ulp)
    k_star = k_star.clamp_min(0)
    denom = budget - q_tot + Q.gather(-1, k_star)
    lam = P.gather(-1, k_star) / denom.clamp_min(torch.finfo(denom.dtype).tiny)
    return torch.where(unreachable, r_min, lam).squeeze(-1)


def lambda_for_budget(target_logp: torch.Tensor, rollout_logp: torch.Tensor, budget: float) -> torch.Tensor:
    """Exact lam per state whose expected acceptance Z(lam) equals `budget`.

    Args:
        target_logp, rollout_logp: (..., V) full log-probability vectors.
        budget: target acceptance in (0, 1].
    Returns (...) lam in the inputs' dtype, computed in float64 by sort + prefix sums (O(V log V)).

    Defined results at the edges: at budget = 1 every lam <= r_min accepts everything; the largest
    such lam, r_min = min over tokens with both masses positive of p_tgt/p_inf, is returned. If p_tgt
    has zeros, acceptance cannot exceed p_inf(supp p_tgt); for larger budgets the same r_min (which
    attains that maximum) is returned.
    """
    check_logp("target_logp", target_logp)
    check_logp("rollout_logp", rollout_logp)
    check_same_shape(target_logp=target_logp, rollout_logp=rollout_logp)
    check_budget("budget", budget)
    lam = _solve_lambda(log_ratio(target_logp, rollout_logp), rollout_logp, float(budget))
    return lam.to(target_logp.dtype)


def batch_lambda(log_ratio: torch.Tensor, mask: torch.Tensor, budget: float) -> torch.Tensor:
    """Exact scalar lam with masked-mean of min(1, exp(log_ratio)/lam) equal to `budget` (METHOD.md §4.2).

    Args:
        log_ratio: (...) log(p_tgt/p_inf) at the sampled tokens (detached; -inf allowed).
        mask: (...) same shape, 1 for tokens that count.
        budget: target mean acceptance in (0, 1].
    Returns a 0-dim tensor in log_ratio's dtype. Same edge conventions as `lambda_for_budget`.
    This is OBRS on the (state, token) sample space; its weight is budget * max(lam, r).
    """
    if torch.isnan(log_ratio).any():
        raise ValueError("log_ratio contains NaN")
    check_same_shape(log_ratio=log_ratio, mask=mask)
    check_mask("mask", mask)
    check_budget("budget", budget)
    m = mask.reshape(-1) > 0
    n = int(m.sum())
    if n == 0:
        raise ValueError("mask selects no token")
    log_q = torch.where(m, torch.full_like(m, -math.log(n), dtype=torch.float64),
                        torch.full_like(m, -math.inf, dtype=torch.float64))
    lam = _solve_lambda(log_ratio.detach().reshape(1, -1), log_q.reshape(1, -1), float(budget))
    return lam.reshape(()).to(log_ratio.dtype)
