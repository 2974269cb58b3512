"""Slow, obvious reference implementations of the core math, written from METHOD.md (§3-§4, §7), and the
teacher-forced forward (`response_logits`) the chunked head and the engines are checked against.

Pure Python floats (IEEE float64) and explicit loops, one state / one token / one group at a time,
so that a reader can check each line against the paper's formulas. Nothing here imports `jackpot`.
The vectorised functions in `jackpot.core` are tested against these in tests/core/test_*.py.

Conventions (the same as the package's documented ones):
  * probabilities are given as log-probabilities; -inf means probability 0;
  * the ratio r = p_tgt / p_inf at a token where both are 0 is taken as 1 (0/0 -> 1);
    p_tgt > 0 = p_inf gives r = +inf (such a token is never proposed), p_tgt = 0 < p_inf gives r = 0.
"""

from __future__ import annotations

import math

INF = math.inf


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------
def rows(x) -> list[list[float]]:
    """A tensor (..., V) as a list of float64 Python rows (leading dims flattened)."""
    x = x.detach().double()
    return x.reshape(-1, x.shape[-1]).tolist() if x.dim() > 0 else [[x.item()]]


def flat(x) -> list[float]:
    return x.detach().double().reshape(-1).tolist()


def exp(v: float) -> float:
    return 0.0 if v == -INF else math.exp(v)


def log(v: float) -> float:
    return -INF if v == 0.0 else math.log(v)


def softmax(logits: list[float]) -> list[float]:
    m = max(logits)
    e = [exp(v - m) for v in logits]
    s = sum(e)
    return [v / s for v in e]


def log_softmax(logits: list[float]) -> list[float]:
    m = max(logits)
    s = sum(exp(v - m) for v in logits)
    return [v - m - math.log(s) for v in logits]


def ratio(lt: float, li: float) -> float:
    """p_tgt / p_inf from log-probs with 0/0 -> 1."""
    pt, pi = exp(lt), exp(li)
    if pi == 0.0:
        return 1.0 if pt == 0.0 else INF
    return pt / pi


# --------------------------------------------------------------------------------------------------
# OBRS at one state (METHOD.md §3)
# --------------------------------------------------------------------------------------------------
def acceptance(lt: float, li: float, lam: float) -> float:
    """a = min(1, p_tgt / (lam p_inf)) for one token; a token with p_inf = 0 is never proposed: a = 1."""
    if exp(li) == 0.0:
        return 1.0
    return min(1.0, ratio(lt, li) / lam)


def z_row(tgt_logp: list[float], rollout_logp: list[float], lam: float) -> float:
    """Z = sum_x min(p_inf(x), p_tgt(x)/lam)."""
    total = 0.0
    for lt, li in zip(tgt_logp, rollout_logp, strict=True):
        total += min(exp(li), exp(lt) / lam)
    return total


def post_rejection_row(tgt_logp: list[float], rollout_logp: list[float], lam: float) -> list[float]:
    """p'_inf(x) = min(p_inf(x), p_tgt(x)/lam) / Z, as probabilities."""
    z = z_row(tgt_logp, rollout_logp, lam)
    return [min(exp(li), exp(lt) / lam) / z for lt, li in zip(tgt_logp, rollout_logp, strict=True)]


def kl_probs(p: list[float], q: list[float]) -> float:
    """KL(p || q) = sum p log(p/q); 0 log 0 = 0; +inf where q = 0 < p."""
    total = 0.0
    for pv, qv in zip(p, q, strict=True):
        if pv == 0.0:
            continue
        if qv == 0.0:
            return INF
        total += pv * math.log(pv / qv)
    return total


def tv_probs(p: list[float], q: list[float]) -> float:
    return 0.5 * sum(abs(pv - qv) for pv, qv in zip(p, q, strict=True))


def obrs_kl_row(tgt_logp: list[float], rollout_logp: list[float], lam: float) -> tuple[float, float, float]:
    """(Z, KL(p_tgt || p_inf), KL(p_tgt || p'_inf)) with p'_inf built explicitly."""
    p_tgt = [exp(v) for v in tgt_logp]
    p_inf = [exp(v) for v in rollout_logp]
    z = z_row(tgt_logp, rollout_logp, lam)
    return z, kl_probs(p_tgt, p_inf), kl_probs(p_tgt, post_rejection_row(tgt_logp, rollout_logp, lam))


def r_min_row(tgt_logp: list[float], rollout_logp: list[float]) -> float:
    """Smallest ratio over tokens where both p_tgt and p_inf are positive."""
    return min(
        exp(lt) / exp(li) for lt, li in zip(tgt_logp, rollout_logp, strict=True) if exp(lt) > 0 and exp(li) > 0
    )


def _bisect_decreasing(f, target: float, lo: float, hi: float, iters: int = 200) -> float:
    """x in [lo, hi] with f(x) = target for a continuous non-increasing f, f(lo) >= target >= f(hi).

    Bisects on log x (lam spans many orders of magnitude)."""
    a, b = math.log(lo), math.log(hi)
    for _ in range(iters):
        mid = 0.5 * (a + b)
        if f(math.exp(mid)) >= target:
            a = mid
        else:
            b = mid
    return math.exp(0.5 * (a + b))


def lambda_bisect_row(tgt_logp: list[float], rollout_logp: list[float], budget: float) -> float:
    """lam with Z(lam) = budget, by bisection (as the OBRS authors do).

    Z(lam) is the largest (= p_inf(supp p_tgt)) for lam <= r_min and strictly decreasing after, so:
    a budget at or above that maximum returns r_min (the package's documented choice)."""
    r_lo = r_min_row(tgt_logp, rollout_logp)
    z_max = z_row(tgt_logp, rollout_logp, r_lo)
    if budget >= z_max:
        return r_lo
    # for lam >= r_max, Z = (p_tgt mass on supp p_inf) / lam, so this hi has Z(hi) <= budget
    r_hi = max(exp(lt) / exp(li) for lt, li in zip(tgt_logp, rollout_logp, strict=True) if exp(li) > 0)
    hi = max(r_hi, 1.0 / budget) * 2.0
    assert z_row(tgt_logp, rollout_logp, hi) < budget
    return _bisect_decreasing(lambda lam: z_row(tgt_logp, rollout_logp, lam), budget, r_lo, hi)


def batch_acceptance(ratios: list[float], lam: float) -> float:
    """mean_t min(1, r_t / lam) over the given (already masked) sampled-token ratios."""
    return sum(min(1.0, r / lam) for r in ratios) / len(ratios)


def batch_lambda_bisect(ratios: list[float], budget: float) -> float:
    """Scalar lam with mean_t min(1, r_t/lam) = budget (METHOD.md §4.2), by bisection."""
    positive = [r for r in ratios if 0.0 < r < INF]
    r_lo = min(positive)
    if budget >= batch_acceptance(ratios, r_lo):
        return r_lo
    hi = max(positive)
    while batch_acceptance(ratios, hi) >= budget:  # for lam >= r_max the acceptance is mean(r)/lam
        hi *= 2.0
    return _bisect_decreasing(lambda lam: batch_acceptance(ratios, lam), budget, r_lo, hi)


# --------------------------------------------------------------------------------------------------
# Corrections, one token at a time (METHOD.md §4 and §7)
# --------------------------------------------------------------------------------------------------
def jackpot_row_major(
    rollout_logp: list[list[float]],
    old_logp: list[list[float]],
    mask: list[list[float]],
    *,
    new_logp: list[list[float]] | None = None,
    uniforms: list[list[float]] | None = None,
    z: list[list[float]] | None = None,
    lam: float = 1.0,
    budget: float | None = None,
    target: str = "old",
    c1: float | None = None,
    c2: float | None = None,
) -> tuple[list[list[float]], list[list[float]], float]:
    """Jackpot weights and keep-mask, Algorithm 1 with the METHOD.md decisions. Returns (w, keep, lam).

    per token:  r = p_tgt/p_inf;  a = min(1, r/lam);  Mask = 1[u < a]  (u drawn once per batch)
                w = Z * max(lam, r);  rho = min(w, c1) * min(p_old/p_tgt, c2)
    Z: the per-state normaliser if given; in budget mode lam solves mean a = budget and Z = budget;
    for a fixed lam without per-state Z, the (state, token)-space normaliser mean_t a_t.
    Without uniforms, the expected-mask ablation: keep a fraction a of each response token, weight rho.
    """
    tgt = old_logp if target == "old" else new_logp
    n_rows, n_cols = len(rollout_logp), len(rollout_logp[0])
    cells = [(b, t) for b in range(n_rows) for t in range(n_cols)]
    r = {(b, t): ratio(tgt[b][t], rollout_logp[b][t]) for b, t in cells}
    counted = [(b, t) for b, t in cells if mask[b][t] > 0]
    if budget is not None:
        lam = batch_lambda_bisect([r[c] for c in counted], budget)
        z_of = {c: budget for c in cells}
    elif z is not None:
        z_of = {(b, t): z[b][t] for b, t in cells}
    else:
        a_bar = sum(min(1.0, r[c] / lam) for c in counted) / len(counted)
        z_of = {c: a_bar for c in cells}
    w_out = [[0.0] * n_cols for _ in range(n_rows)]
    keep_out = [[0.0] * n_cols for _ in range(n_rows)]
    for b, t in cells:
        a = min(1.0, r[(b, t)] / lam)
        w = z_of[(b, t)] * max(lam, r[(b, t)])
        if c1 is not None:
            w = min(w, c1)
        if target == "new":
            second = ratio(old_logp[b][t], new_logp[b][t])
            w *= second if c2 is None else min(second, c2)
        if uniforms is None:
            keep = mask[b][t] * a
        else:
            keep = mask[b][t] * (1.0 if uniforms[b][t] < a else 0.0)
        w_out[b][t], keep_out[b][t] = w, keep
    return w_out, keep_out, lam


def _level_log_ratios(rollout_logp, old_logp, mask, level: str) -> list[list[float]]:
    """log(p_old/p_inf) per token, or its sum (sequence) / mean (geometric) over the response."""
    out = []
    for li_row, lr_row, m_row in zip(rollout_logp, old_logp, mask, strict=True):
        per_tok = [
            math.log(ratio(lr, li)) if ratio(lr, li) > 0 else -INF
            for li, lr in zip(li_row, lr_row, strict=True)
        ]
        if level == "token":
            out.append(per_tok)
            continue
        s, n = 0.0, 0
        for v, m in zip(per_tok, m_row, strict=True):
            if m > 0:
                s += v
                n += 1
        if level == "geometric":
            s = s / max(n, 1)
        out.append([s] * len(li_row))
    return out


def tis_ref(rollout_logp, old_logp, mask, *, cap: float, level: str):
    """TIS: weight min(p_old/p_inf, cap) at token/sequence/geometric level; mask = response mask."""
    lrs = _level_log_ratios(rollout_logp, old_logp, mask, level)
    w = [[min(exp(v), cap) for v in row] for row in lrs]
    return w, [list(m) for m in mask]


def icepop_ref(rollout_logp, old_logp, mask, *, low: float, high: float, level: str):
    """IcePop / MIS: weight r if low <= r <= high else 0 (token masked)."""
    lrs = _level_log_ratios(rollout_logp, old_logp, mask, level)
    w, keep = [], []
    for row, m_row in zip(lrs, mask, strict=True):
        w_row, k_row = [], []
        for v, m in zip(row, m_row, strict=True):
            r = exp(v)
            k = 1.0 if (m > 0 and low <= r <= high) else 0.0
            w_row.append(r * k)
            k_row.append(k)
        w.append(w_row)
        keep.append(k_row)
    return w, keep


# --------------------------------------------------------------------------------------------------
# Losses and aggregation
# --------------------------------------------------------------------------------------------------
def ppo_loss_token(
    new_lp: float, old_lp: float, adv: float, eps_low: float | None, eps_high: float | None,
    dual_clip: float | None = None,
) -> float:
    """-min(ratio A, clip(ratio, 1-eps_low, 1+eps_high) A); -ratio A without a clip; with a dual
    clip c and A < 0, at most -c A."""
    ratio_v = math.exp(new_lp - old_lp)
    if eps_low is None:
        loss = -ratio_v * adv
    else:
        clipped = min(max(ratio_v, 1.0 - eps_low), 1.0 + eps_high)
        loss = -min(ratio_v * adv, clipped * adv)
    if dual_clip is not None and adv < 0:
        loss = min(loss, -dual_clip * adv)
    return loss


def aggregate_ref(loss, keep, mode: str, *, response_mask=None, norm_len: int | None = None) -> float:
    """The aggregation modes, by loops over (B, T) lists; keep may be fractional (a weight)."""
    n_rows, n_cols = len(loss), len(loss[0])
    resp = keep if response_mask is None else response_mask
    cells = [(b, t) for b in range(n_rows) for t in range(n_cols)]
    total = sum(keep[b][t] * loss[b][t] for b, t in cells if keep[b][t] > 0)
    n_keep = sum(keep[b][t] for b, t in cells)
    if mode == "token-mean":
        return total / (n_keep or 1.0)
    if mode == "token-mean-all":
        return total / max(sum(1 for b, t in cells if resp[b][t] > 0), 1)
    if mode == "token-sum":
        return total
    if mode == "seq-mean-token-sum":
        return total / n_rows
    if mode == "seq-mean-token-mean":
        per_seq = []
        for b in range(n_rows):
            num = sum(keep[b][t] * loss[b][t] for t in range(n_cols) if keep[b][t] > 0)
            den = sum(keep[b][t] for t in range(n_cols))
            per_seq.append(num / (den or 1.0))
        return sum(per_seq) / n_rows
    if mode == "seq-sum-norm":
        return total / (n_rows * (norm_len or n_cols))
    raise ValueError(mode)


def group_advantages_ref(rewards: list[list[float]], mode: str, eps: float) -> list[list[float]]:
    out = []
    for group in rewards:
        g = len(group)
        mean = sum(group) / g
        if mode == "grpo":
            std = math.sqrt(sum((x - mean) ** 2 for x in group) / (g - 1))
            out.append([(x - mean) / (std + eps) for x in group])
        elif mode == "drgrpo":
            out.append([x - mean for x in group])
        elif mode == "rloo":
            out.append([x - (sum(group) - x) / (g - 1) for x in group])
        else:
            raise ValueError(mode)
    return out


def distill_full_row(student_logits: list[float], teacher_logits: list[float], direction: str) -> float:
    """Forward KL(p_teacher || p_student) or reverse KL(p_student || p_teacher) for one position."""
    ps, pt = softmax(student_logits), softmax(teacher_logits)
    return kl_probs(pt, ps) if direction == "forward" else kl_probs(ps, pt)


# --------------------------------------------------------------------------------------------------
# Divergences and diagnostics
# --------------------------------------------------------------------------------------------------
def kl_estimators_ref(other_logp, sample_logp, mask) -> dict[str, float]:
    """k1 = -log rho, k2 = (log rho)^2/2, k3 = rho - 1 - log rho (rho = p_other/p_sample), mean over mask."""
    k1 = k2 = k3 = 0.0
    n = 0
    for lo, ls, m in zip(flat(other_logp), flat(sample_logp), flat(mask), strict=True):
        if m <= 0:
            continue
        lr = lo - ls
        k1 += -lr
        k2 += 0.5 * lr * lr
        k3 += math.exp(lr) - 1.0 - lr
        n += 1
    return {"kl_k1": k1 / n, "kl_k2": k2 / n, "kl_k3": k3 / n}


def ess_ref(weights, mask) -> float:
    """(sum w)^2 / (n sum w^2) over masked entries."""
    ws = [w for w, m in zip(flat(weights), flat(mask), strict=True) if m > 0]
    return sum(ws) ** 2 / (len(ws) * sum(w * w for w in ws))


# --------------------------------------------------------------------------------------------------
# Random test inputs (torch tensors; shared by the test files)
# --------------------------------------------------------------------------------------------------
def make_logits(gen, shape, *, dtype=None, scale: float = 2.0, zero_frac: float = 0.0):
    """Random logits (..., V); a fraction `zero_frac` of entries set to -inf, never column 0."""
    import torch

    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    if zero_frac > 0:
        drop = torch.rand(shape, generator=gen, dtype=torch.float64) < zero_frac
        drop[..., 0] = False  # column 0 keeps mass in every row, so supports always overlap
        x = x.masked_fill(drop, -INF)
    return x if dtype is None else x.to(dtype)


def make_logp(gen, shape, *, dtype=None, scale: float = 2.0, zero_frac: float = 0.0):
    """Random normalised log-probabilities (..., V), computed in float64 then cast to `dtype`."""
    import torch

    lp = torch.log_softmax(make_logits(gen, shape, scale=scale, zero_frac=zero_frac), dim=-1)
    return lp if dtype is None else lp.to(dtype)


def mismatch_ref(target_logp, rollout_logp, mask, *, low: float, high: float) -> dict[str, float]:
    """The sampled-token mismatch diagnostics, rho = p_tgt/p_inf at x ~ p_inf, by loops over (B, T)."""
    out = kl_estimators_ref(target_logp, rollout_logp, mask)
    rhos, seq_terms, ppl = [], [], []
    for t_row, r_row, m_row in zip(rows(target_logp), rows(rollout_logp), rows(mask), strict=True):
        s, n, lt_sum, lr_sum = 0.0, 0, 0.0, 0.0
        for lt, li, m in zip(t_row, r_row, m_row, strict=True):
            if m > 0:
                rhos.append(math.exp(lt - li))
                s += lt - li
                n += 1
                lt_sum += lt
                lr_sum += li
        seq_terms.append(math.exp(2 * min(max(s, -20.0), 20.0)))  # verl: the sequence sum is clamped
        ppl.append((lr_sum - lt_sum) / max(n, 1))  # verl: mean log-prob of the rollout minus the target's
    out.update(
        {
            "chi2_token": sum(r * r for r in rhos) / len(rhos) - 1.0,
            "chi2_seq": sum(seq_terms) / len(seq_terms) - 1.0,
            "ess": sum(rhos) ** 2 / (len(rhos) * sum(r * r for r in rhos)),
            "ratio_min": min(rhos),
            "ratio_max": max(rhos),
            "frac_above": sum(1 for r in rhos if r > high) / len(rhos),
            "frac_below": sum(1 for r in rhos if r < low) / len(rhos),
            "log_ppl_diff": sum(ppl) / len(ppl),
            "log_ppl_abs_diff": sum(abs(d) for d in ppl) / len(ppl),
            "ppl_ratio": sum(math.exp(d) for d in ppl) / len(ppl),
        }
    )
    return out


# --------------------------------------------------------------------------------------------------
# teacher-forced logits (a plain forward: what the chunked head and the engines' records are checked against)
# --------------------------------------------------------------------------------------------------
def response_logits(model, input_ids, attention_mask, response_len: int, temperature: float = 1.0):
    """Logits predicting each response token, divided by `temperature`: (B, T, V) float32 (float64 for a float64
    model). `input_ids` (B, P + T): the prompt (left-padded) then the response; row t is the model's output at
    position P - 1 + t, with the position ids `generate` uses (cumsum of the mask - 1). Forms B x T x V logits:
    for tests and benchmarks only (the package's forward is `jackpot.models.forward.response_hidden` + a head)."""
    import torch

    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, P + T), got shape {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    if not 1 <= response_len < input_ids.shape[1] or not temperature > 0:
        raise ValueError(f"response_len must be in [1, {input_ids.shape[1] - 1}] and temperature > 0, got "
                         f"{response_len}, {temperature}")
    mask = attention_mask.long()
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                logits_to_keep=response_len + 1)  # only the last T + 1 positions: no (B, P, V) prompt logits
    logits = out.logits[:, :-1, :]
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return logits / temperature if temperature != 1.0 else logits


# --------------------------------------------------------------------------------------------------
# distillation KL from full (B, T, V) logits, dense (what the chunked head's and distill_kl_at's are checked against)
# --------------------------------------------------------------------------------------------------
def distill_kl(student_logits, teacher_logits=None, *, direction: str = "forward", estimator: str = "full",
               teacher_topk_ids=None, teacher_topk_logp=None, sampled_ids=None, teacher_sampled_logp=None,
               rollout_sampled_logp=None, is_cap: float = 2.0):
    """Per-position distillation KL (B, T) of the student toward the (detached) teacher, from dense log-softmaxes,
    gradient to the student by autograd (METHOD.md §5):
      full     forward sum p_t (log p_t - log p_s); reverse sum p_s (log p_s - log p_t)
      topk     the same terms over the teacher's top-k ids only
      sampled  at the sampled token, importance-weighted from p_inf truncated at is_cap: forward
               min(p_t / p_inf, cap) (log p_t - log p_s); reverse the value min(p_s / p_inf, cap) k3(p_t / p_s) with
               the score-function gradient min(p_s / p_inf, cap) (log p_s - log p_t) grad log p_s.
    Forms B x T x V tensors: for tests only."""
    import torch

    ls = torch.log_softmax(student_logits if student_logits.dtype == torch.float64 else student_logits.float(), -1)
    reverse = direction == "reverse"
    if estimator == "full":
        lt = torch.log_softmax(teacher_logits.detach().to(ls.dtype), -1)
        p, d = (ls.exp(), ls - lt) if reverse else (lt.exp(), lt - ls)
        return torch.where(p > 0, p * d, torch.zeros_like(p)).sum(-1)
    if estimator == "topk":
        s, t = ls.gather(-1, teacher_topk_ids), teacher_topk_logp.detach().to(ls.dtype)
        return (s.exp() * (s - t) if reverse else t.exp() * (t - s)).sum(-1)
    s = ls.gather(-1, sampled_ids[..., None])[..., 0]
    t, b = teacher_sampled_logp.detach().to(ls.dtype), rollout_sampled_logp.detach().to(ls.dtype)
    if not reverse:
        return (t - b).exp().clamp_max(is_cap) * (t - s)
    w = (s.detach() - b).exp().clamp_max(is_cap)
    log_rho = t - s.detach()
    value = w * (log_rho.exp() - 1.0 - log_rho)
    surrogate = w * (-log_rho) * s
    return value + surrogate - surrogate.detach()
