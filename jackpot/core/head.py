"""Per-vocabulary quantities from hidden states and the output embedding, a chunk of positions at a time.

A causal LM's next-token logits are a linear map of its last hidden states,
    logits = (h @ W^T + b) / temperature        h (N, H), W (V, H), b (V,) or None,
and with a real vocabulary (Qwen3: V = 151,936) the (N, V) logits of a long batch are the largest tensor
of a training step (N = 4 x 8,192 positions: 18.5 GiB in float32). Every function here takes the hidden
states and the head instead, and materialises at most `chunk` rows of logits at once; the functions with
a gradient (`logprobs_at`, `joint_logprobs`) are custom autograd functions whose backward recomputes one
chunk at a time, so peak memory follows the chunk size, not N x V (beyond W's own gradient, V x H).

Numerics: the matmul runs in the parameters' dtype (bf16 / fp16 / fp32); everything after it — log-softmax,
ratios, KL — in float32 (float64 for float64 inputs). Temperature divides the logits exactly as sampling did.

    logprobs_at(h, W, b, ids)          log softmax(logits)[ids], ids (N, K); gradient to h, W, b
    joint_logprobs(policy, student, ids, kl=, topk=)   both models' log-probs at ids and the student's
                                       distillation toward the policy (exact KL, or at the policy's top-k), each
                                       head's logits formed once per chunk forward and once backward: the joint
                                       update's one pass (the teacher is the policy's own forward)
    kl_from_hidden(student, teacher)   exact per-position KL in either direction; gradient to the student
    entropy(h, W, b)                   per-position entropy (no gradient)
    topk(h, W, b, k)                   top-k log-probs and ids (no gradient)
    normalizer(target, rollout, lam)   exact OBRS Z between two heads at the same positions (no gradient)
    logprobs_and_normalizer(...)       both heads' log-probs at ids and Z in one pass over the logits
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jackpot.core import obrs
from jackpot.core.dtypes import upcast

DEFAULT_ROW_CHUNK = 1024  # positions per chunk: 1024 x 151,936 float32 logits = 0.6 GiB


@dataclass(frozen=True)
class Head:
    """The last hidden states of N positions and the linear map to next-token logits.

    hidden (N, H); weight (V, H); bias (V,) or None; temperature > 0 (the sampling temperature).
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.hidden.dim() != 2 or self.weight.dim() != 2 or self.hidden.shape[1] != self.weight.shape[1]:
            raise ValueError(f"hidden must be (N, H) and weight (V, H); got {tuple(self.hidden.shape)} and "
                             f"{tuple(self.weight.shape)}")
        if self.bias is not None and self.bias.shape != self.weight.shape[:1]:
            raise ValueError(f"bias must be (V,) = ({self.weight.shape[0]},), got {tuple(self.bias.shape)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def __len__(self) -> int:
        return self.hidden.shape[0]


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, temperature: float) -> torch.Tensor:
    out = F.linear(h, w, b)
    out = out.float() if out.dtype in (torch.bfloat16, torch.float16) else out  # a fresh buffer either way
    return out.div_(temperature) if temperature != 1.0 else out


def _check_chunk(chunk: int) -> None:
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")


class _LogprobsAt(torch.autograd.Function):
    """log softmax(h W^T + b)/T at ids (N, K); d/dlogits of sum_k g_k logp_k = g_k 1[id_k] - p * sum_k g_k."""

    @staticmethod
    def forward(ctx, h, w, b, ids, temperature: float, chunk: int):
        out = torch.empty(ids.shape, dtype=upcast(h[:0]).dtype, device=h.device)
        lse = torch.empty(h.shape[0], dtype=out.dtype, device=h.device)
        for s in range(0, h.shape[0], chunk):
            logits = _logits(h[s:s + chunk], w, b, temperature)
            lse[s:s + chunk] = torch.logsumexp(logits, -1)
            out[s:s + chunk] = logits.gather(-1, ids[s:s + chunk]) - lse[s:s + chunk, None]
        ctx.save_for_backward(h, w, b, ids, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, w, b, ids, lse = ctx.saved_tensors
        grads = _HeadGrads(ctx.needs_input_grad[:3], h, w, b)
        g = grad_out / ctx.temperature  # d/dlogits is linear in g: the temperature folded in once
        for s in range(0, h.shape[0], ctx.chunk):
            e = s + ctx.chunk
            grads.add(s, _grad_logprobs(_logits(h[s:e], w, b, ctx.temperature), lse[s:e], ids[s:e], g[s:e]))
        return (*grads.result(), None, None, None)


def _grad_logprobs(logits, lse, ids, g):
    """d/dlogits of sum_k g_k log p(ids_k) = scatter(g) - p * sum_k g_k, formed in the logits' own buffer."""
    d = logits.sub_(lse[:, None]).exp_().mul_(-g.sum(-1, keepdim=True).to(logits.dtype))
    return d.scatter_add_(-1, ids, g.to(d.dtype))


class _HeadGrads:
    """Gradients of one head's (h, w, b) accumulated chunk by chunk from dL/dlogits (`add`); `needs` is
    ctx.needs_input_grad for the three."""

    def __init__(self, needs, h, w, b):
        self.h, self.w, self.b = h, w, b
        self.grad_h = torch.zeros_like(h) if needs[0] else None
        self.grad_w = torch.zeros(w.shape, dtype=upcast(w[:0, :0]).dtype, device=w.device) if needs[1] else None
        dtype = self.grad_w.dtype if self.grad_w is not None else torch.float32
        self.grad_b = torch.zeros(w.shape[0], dtype=dtype, device=w.device) if needs[2] and b is not None else None

    def add(self, start: int, d: torch.Tensor) -> None:
        """The chunk of positions [start, start + len(d)) with d (n, V) = dL/d(h W^T + b): the temperature's
        1/T already in d (the callers fold it into the upstream gradients)."""
        hs = self.h[start:start + d.shape[0]]
        if self.grad_h is not None:
            self.grad_h[start:start + d.shape[0]] = (d.to(self.w.dtype) @ self.w).to(self.h.dtype)
        if self.grad_w is not None:
            self.grad_w.addmm_(d.T, upcast(hs).to(d.dtype))
        if self.grad_b is not None:
            self.grad_b += d.sum(0)

    def result(self) -> tuple:
        return (self.grad_h, None if self.grad_w is None else self.grad_w.to(self.w.dtype),
                None if self.grad_b is None else self.grad_b.to(self.b.dtype))


def logprobs_at(head: Head, ids: torch.Tensor, *, chunk: int = DEFAULT_ROW_CHUNK) -> torch.Tensor:
    """log softmax(logits)[ids] for ids (N,) or (N, K): (N,) or (N, K) float32, with gradient to the head.

    The sampled-token log-probs of PPO are ids (N,); the student's log-probs at a teacher's top-k are (N, K).
    """
    _check_chunk(chunk)
    squeeze = ids.dim() == 1
    ids2 = ids.unsqueeze(-1) if squeeze else ids
    if ids2.dim() != 2 or ids2.shape[0] != len(head):
        raise ValueError(f"ids must be (N,) or (N, K) with N = {len(head)}, got {tuple(ids.shape)}")
    if ids2.numel() and (ids2.min() < 0 or ids2.max() >= head.vocab_size):
        raise ValueError(f"ids must be in [0, {head.vocab_size}) (the head's vocabulary), got "
                         f"[{int(ids2.min())}, {int(ids2.max())}]")
    out = _LogprobsAt.apply(head.hidden, head.weight, head.bias, ids2.long(), head.temperature, chunk)
    return out.squeeze(-1) if squeeze else out


def _kl_terms(ls: torch.Tensor, lt: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Per-position exact KL from the student's and the teacher's log-softmax rows (n, V), finite (a linear
    head's logits are): forward KL(p_t || p_s) = sum p_t (log p_t - log p_s), reverse KL(p_s || p_t)."""
    p, diff = (ls.exp(), ls - lt) if reverse else (lt.exp(), lt - ls)
    return diff.mul_(p).sum(-1)


class _JointPass(torch.autograd.Function):
    """Both models' per-vocabulary quantities at the same positions, each head's logits formed once per chunk in
    the forward and once in the backward (`joint_logprobs`). Inputs: the policy's head (h, w, b), the student's
    (sh, sw, sb), ids (N,); kl None | "forward" | "reverse"; k >= 0 the policy's top-k. Outputs: the policy's
    log-probs at ids (gradient to its head), the student's log-probs at ids, the exact KL and the student's
    log-probs at the policy's top-k (gradient to the student's head), the policy's top-k log-probs (none).

    d/dlogits_s of g_s log p_s(id) + g_kl KL + sum_k g_k log p_s(top_k) is, with p_s, p_t the two softmaxes,
        p_s (g_kl - g_s - sum_k g_k) - g_kl p_t + scatter(g_s at id, g_k at top_k)        forward KL
        p_s (g_kl (log p_s - log p_t - KL) - g_s - sum_k g_k) + scatter(...)              reverse KL
    formed in place, a few (chunk, V) passes per head (the policy's own: p_t (-g_p) + scatter(g_p))."""

    @staticmethod
    def forward(ctx, h, w, b, sh, sw, sb, ids, temperature: float, chunk: int, kl_mode, k: int):
        n, dtype = h.shape[0], upcast(h[:0]).dtype
        p_logp, s_logp, lse_p, lse_s = (torch.empty(n, dtype=dtype, device=h.device) for _ in range(4))
        kl = torch.zeros(n if kl_mode else 0, dtype=dtype, device=h.device)
        s_top, p_top = (torch.empty(n, k, dtype=dtype, device=h.device) for _ in range(2))
        top_ids = torch.empty(n, k, dtype=torch.long, device=h.device)
        for s in range(0, n, chunk):
            e, idx = s + chunk, ids[s:s + chunk, None]
            lt = _logits(h[s:e], w, b, temperature)  # the policy's: the one head computation of the chunk
            lse_p[s:e] = torch.logsumexp(lt, -1)
            lt = lt.sub_(lse_p[s:e, None])  # log p_t, in the logits' buffer
            p_logp[s:e] = lt.gather(-1, idx)[:, 0]
            ls = _logits(sh[s:e], sw, sb, temperature)
            lse_s[s:e] = torch.logsumexp(ls, -1)
            ls = ls.sub_(lse_s[s:e, None])
            s_logp[s:e] = ls.gather(-1, idx)[:, 0]
            if kl_mode:
                kl[s:e] = _kl_terms(ls, lt, kl_mode == "reverse")
            if k:
                top = lt.topk(k, -1)
                p_top[s:e], top_ids[s:e] = top.values, top.indices
                s_top[s:e] = ls.gather(-1, top.indices)
        ctx.save_for_backward(h, w, b, sh, sw, sb, ids, lse_p, lse_s, kl, top_ids)
        ctx.temperature, ctx.chunk, ctx.kl_mode = temperature, chunk, kl_mode
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(p_top)
        return p_logp, s_logp, kl, s_top, p_top

    @staticmethod
    def backward(ctx, g_p, g_s, g_kl, g_top, _):
        h, w, b, sh, sw, sb, ids, lse_p, lse_s, kl, top_ids = ctx.saved_tensors
        g_kl = g_kl if ctx.kl_mode else None
        g_top = g_top if top_ids.shape[1] else None
        need_p = any(ctx.needs_input_grad[:3]) and g_p is not None
        need_s = any(ctx.needs_input_grad[3:6]) and any(g is not None for g in (g_s, g_kl, g_top))
        grads_p = _HeadGrads(ctx.needs_input_grad[:3], h, w, b) if need_p else None
        grads_s = _HeadGrads(ctx.needs_input_grad[3:6], sh, sw, sb) if need_s else None
        inv_t = 1.0 / ctx.temperature  # every d/dlogits is linear in the upstream gradients: 1/T folded in
        g_p, g_s, g_kl, g_top = (None if g is None else g * inv_t for g in (g_p, g_s, g_kl, g_top))
        zero = torch.zeros((), dtype=lse_p.dtype, device=h.device)
        # the per-row coefficient of p_s beside the KL's own term: -g_s - sum_k g_k
        coef = -(g_s if g_s is not None else zero) - (g_top.sum(-1) if g_top is not None else zero)
        c, teacher = ctx.chunk, need_s and g_kl is not None  # teacher: the KL's gradient needs the policy's logits
        for s in range(0, h.shape[0], c):
            e, idx = s + c, ids[s:s + c, None]
            if need_p or teacher:
                lt = _logits(h[s:e], w, b, ctx.temperature).sub_(lse_p[s:e, None])
                pt = lt.exp() if need_p or ctx.kl_mode == "forward" else None
                if need_p:
                    grads_p.add(s, (pt * -g_p[s:e, None]).scatter_add_(-1, idx, g_p[s:e, None]))
            if not need_s:
                continue
            ls = _logits(sh[s:e], sw, sb, ctx.temperature).sub_(lse_s[s:e, None])
            row = coef if coef.dim() == 0 else coef[s:e, None]
            if teacher and ctx.kl_mode == "reverse":  # p_s (g_kl (ls - lt - KL) + coef)
                d = (ls - lt).sub_(kl[s:e, None]).mul_(g_kl[s:e, None]).add_(row).mul_(ls.exp_())
            else:  # p_s (g_kl + coef) - g_kl p_t
                d = ls.exp_().mul_(row + g_kl[s:e, None] if teacher else row)
                if teacher:
                    d.addcmul_(pt, g_kl[s:e, None], value=-1.0)
            if g_s is not None:
                d.scatter_add_(-1, idx, g_s[s:e, None])
            if g_top is not None:
                d.scatter_add_(-1, top_ids[s:e], g_top[s:e])
            grads_s.add(s, d)
        none = (None, None, None)
        return (*(grads_p.result() if grads_p else none), *(grads_s.result() if grads_s else none),
                None, None, None, None, None)


@dataclass(frozen=True)
class JointLogprobs:
    """What `joint_logprobs` returns over N positions (float32; float64 for float64 heads).

    policy (N,): log p_policy(ids), with gradient to the policy's head (None where no policy head was used);
    student (N,): log p_student(ids);
    kl (N,) or None: the exact KL between the two (kl="forward": KL(p_policy || p_student), "reverse":
    KL(p_student || p_policy)); student_at_top (N, K) or None: log p_student at the policy's top-K tokens,
    policy_top (N, K) the policy's log-probs there (no gradient). student, kl and student_at_top carry gradient
    to the student's head only: the policy is their teacher, held fixed (stop-gradient, paper eq. 8).
    """

    policy: torch.Tensor | None
    student: torch.Tensor
    kl: torch.Tensor | None = None
    student_at_top: torch.Tensor | None = None
    policy_top: torch.Tensor | None = None


def joint_logprobs(policy: Head, student: Head, ids: torch.Tensor, *, kl: str | None = None, topk: int = 0,
                   chunk: int = DEFAULT_ROW_CHUNK) -> JointLogprobs:
    """The policy's and the student's (rollout model's) log-probs at ids (N,), with the distillation quantities
    the student needs from the policy's distribution — the exact KL (kl="forward" | "reverse") or the policy's
    top-k (topk=K) — from one computation of each head's logits per chunk of positions, forward and backward:
    the teacher's distribution is read from the policy's own pass, never formed a second time. Backpropagating
    any combination of the outputs recomputes each head once per chunk (`JointLogprobs` says what flows where)."""
    _check_chunk(chunk)
    if len(student) != len(policy) or student.vocab_size != policy.vocab_size or ids.shape != (len(policy),):
        raise ValueError(f"policy and student must cover the same positions and vocabulary and ids be (N,): "
                         f"({len(policy)}, {policy.vocab_size}), ({len(student)}, {student.vocab_size}), "
                         f"{tuple(ids.shape)}")
    if student.temperature != policy.temperature:
        raise ValueError("policy and student must use the same temperature")
    if kl not in (None, "forward", "reverse"):
        raise ValueError(f"kl must be None, 'forward' or 'reverse', got {kl!r}")
    if not isinstance(topk, int) or not 0 <= topk <= policy.vocab_size:
        raise ValueError(f"topk must be in [0, {policy.vocab_size}], got {topk!r}")
    p, s, d, s_top, p_top = _JointPass.apply(policy.hidden, policy.weight, policy.bias, student.hidden,
                                             student.weight, student.bias, ids.long(), policy.temperature, chunk,
                                             kl, topk)
    return JointLogprobs(p, s, d if kl else None, s_top if topk else None, p_top if topk else None)


def kl_from_hidden(student: Head, teacher: Head, *, reverse: bool = False,
                   chunk: int = DEFAULT_ROW_CHUNK) -> torch.Tensor:
    """Per-position KL (N,): forward KL(p_teacher || p_student) or reverse KL(p_student || p_teacher),
    with gradient to the student's hidden states and head only (the teacher is detached)."""
    _check_chunk(chunk)
    if len(student) != len(teacher) or student.vocab_size != teacher.vocab_size:
        raise ValueError(f"student and teacher must cover the same positions and vocabulary: ({len(student)}, "
                         f"{student.vocab_size}) vs ({len(teacher)}, {teacher.vocab_size})")
    ids = torch.zeros(len(student), dtype=torch.long, device=student.hidden.device)
    return joint_logprobs(detached(teacher), student, ids, kl="reverse" if reverse else "forward", chunk=chunk).kl


def detached(head: Head) -> Head:
    """`head` with no gradient to its hidden states or weights (a teacher)."""
    return Head(head.hidden.detach(), head.weight.detach(), None if head.bias is None else head.bias.detach(),
                head.temperature)


@torch.no_grad()
def entropy(head: Head, *, chunk: int = DEFAULT_ROW_CHUNK) -> torch.Tensor:
    """Per-position entropy of the next-token distribution (N,), no gradient."""
    _check_chunk(chunk)
    out = []
    for s in range(0, len(head), chunk):
        lp = torch.log_softmax(_logits(head.hidden[s:s + chunk], head.weight, head.bias, head.temperature), -1)
        out.append(-(lp.exp() * lp).nan_to_num().sum(-1))
    return torch.cat(out) if out else head.hidden.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def topk(head: Head, k: int, *, chunk: int = DEFAULT_ROW_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens per position: (log-probs (N, k) descending, ids (N, k)), no gradient."""
    _check_chunk(chunk)
    if not 1 <= k <= head.vocab_size:
        raise ValueError(f"k must be in [1, {head.vocab_size}], got {k}")
    vals, ids = [], []
    for s in range(0, len(head), chunk):
        lp = torch.log_softmax(_logits(head.hidden[s:s + chunk], head.weight, head.bias, head.temperature), -1)
        top = lp.topk(k, -1)
        vals.append(top.values)
        ids.append(top.indices)
    return torch.cat(vals), torch.cat(ids)


@torch.no_grad()
def normalizer(target: Head, rollout: Head, lam: float, *, chunk: int = DEFAULT_ROW_CHUNK) -> torch.Tensor:
    """Exact Z = sum_x min(p_inf(x), p_tgt(x) / lam) per position (N,), from two heads at the same positions."""
    _check_chunk(chunk)
    if len(target) != len(rollout) or target.vocab_size != rollout.vocab_size:
        raise ValueError(f"target and rollout heads must cover the same positions and vocabulary: ({len(target)}, "
                         f"{target.vocab_size}) vs ({len(rollout)}, {rollout.vocab_size})")
    out = []
    for s in range(0, len(target), chunk):
        lt = _logits(target.hidden[s:s + chunk], target.weight, target.bias, target.temperature)
        li = _logits(rollout.hidden[s:s + chunk], rollout.weight, rollout.bias, rollout.temperature)
        out.append(obrs.normalizer_from_logits(lt, li, lam))
    return torch.cat(out)


@torch.no_grad()
def logprobs_and_normalizer(target: Head, rollout: Head, ids: torch.Tensor, lam: float, *,
                            chunk: int = DEFAULT_ROW_CHUNK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p_tgt(ids), log p_inf(ids), Z) per position, each (N,), forming each chunk's logits once: what
    `logprobs_at` twice and `normalizer` compute in three passes (no gradient)."""
    _check_chunk(chunk)
    if len(target) != len(rollout) or target.vocab_size != rollout.vocab_size or ids.shape != (len(target),):
        raise ValueError(f"target and rollout heads must cover the same positions and vocabulary, ids (N,): "
                         f"({len(target)}, {target.vocab_size}), ({len(rollout)}, {rollout.vocab_size}), "
                         f"{tuple(ids.shape)}")
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam!r}")
    log_lam = math.log(lam)
    lt_out, li_out, z_out = [], [], []
    for s in range(0, len(target), chunk):
        idx = ids[s:s + chunk, None].long()
        lt = _log_softmax_(_logits(target.hidden[s:s + chunk], target.weight, target.bias, target.temperature))
        li = _log_softmax_(_logits(rollout.hidden[s:s + chunk], rollout.weight, rollout.bias, rollout.temperature))
        lt_out.append(lt.gather(-1, idx)[:, 0])
        li_out.append(li.gather(-1, idx)[:, 0])
        # Z = sum_x min(p_inf, p_tgt / lam) (jackpot.core.obrs.normalizer), in the logits' own buffers
        z_out.append(torch.minimum(li, lt.sub_(log_lam), out=lt).exp_().sum(-1))
    return torch.cat(lt_out), torch.cat(li_out), torch.cat(z_out)


def _log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """log softmax over the last dim in the logits' own buffer. A NaN or +inf logit makes its row's logsumexp
    NaN / inf, so the row's values say so without a full-size check."""
    return logits.sub_(torch.logsumexp(logits, -1, keepdim=True))
