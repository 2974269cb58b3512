"""Per-vocabulary quantities from hidden states and the output embedding, a chunk of positions at a time.

A causal LM's next-token logits are a linear map of its last hidden states,
    logits = (h @ W^T + b) / temperature        h (N, H), W (V, H), b (V,) or None,
and with a real vocabulary (Qwen3: V = 151,936) the (N, V) logits of a long batch are the largest tensor
of a training step (N = 4 x 8,192 positions: 18.5 GiB in float32). Every function here takes the hidden
states and the head instead, and materialises at most `chunk` rows of logits at once; the functions with
a gradient (`logprobs_at`, `kl_from_hidden`) are custom autograd functions whose backward recomputes one
chunk at a time, so peak memory follows the chunk size, not N x V (beyond W's own gradient, V x H).

Numerics: the matmul runs in the parameters' dtype (bf16 / fp16 / fp32); everything after it — log-softmax,
ratios, KL — in float32 (float64 for float64 inputs). Temperature divides the logits exactly as sampling did.

    logprobs_at(h, W, b, ids)          log softmax(logits)[ids], ids (N, K); gradient to h, W, b
    kl_from_hidden(student, teacher)   exact per-position KL in either direction; gradient to the student
    logprobs_and_kl(student, teacher, ids)   both of the above for one student, in one pass per chunk
    entropy(h, W, b)                   per-position entropy (no gradient)
    topk(h, W, b, k)                   top-k log-probs and ids (no gradient)
    normalizer(target, rollout, lam)   exact OBRS Z between two heads at the same positions (no gradient)
    logprobs_and_normalizer(...)       both heads' log-probs at ids and Z in one pass over the logits
"""

from __future__ import annotations

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
    out = upcast(F.linear(h, w, b))
    return out / temperature if temperature != 1.0 else out


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
        return _head_backward(ctx, h, w, b, lambda s, logits: _grad_logprobs(logits, lse[s:s + ctx.chunk],
                                                                             ids[s:s + ctx.chunk],
                                                                             grad_out[s:s + ctx.chunk]))


def _grad_logprobs(logits, lse, ids, g):
    d = -(logits - lse[:, None]).exp() * g.sum(-1, keepdim=True)
    return d.scatter_add(-1, ids, g.to(d.dtype))


def _head_backward(ctx, h, w, b, dlogits_of):
    """Gradients of h, w, b from dL/dlogits, recomputed chunk by chunk: dlogits_of(start, logits) -> (n, V)."""
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    grad_h = torch.zeros_like(h) if need_h else None
    grad_w = torch.zeros(w.shape, dtype=upcast(w[:0, :0]).dtype, device=w.device) if need_w else None
    grad_b = torch.zeros(w.shape[0], dtype=grad_w.dtype if grad_w is not None else torch.float32,
                         device=w.device) if need_b and b is not None else None
    for s in range(0, h.shape[0], ctx.chunk):
        hs = h[s:s + ctx.chunk]
        d = dlogits_of(s, _logits(hs, w, b, ctx.temperature))
        if ctx.temperature != 1.0:
            d = d / ctx.temperature
        if grad_h is not None:
            grad_h[s:s + ctx.chunk] = (d.to(w.dtype) @ w).to(h.dtype)
        if grad_w is not None:
            grad_w += d.T @ upcast(hs).to(d.dtype)
        if grad_b is not None:
            grad_b += d.sum(0)
    return (grad_h, None if grad_w is None else grad_w.to(w.dtype),
            None if grad_b is None else grad_b.to(b.dtype), None, None, None)


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


class _KLFromHidden(torch.autograd.Function):
    """Exact per-position KL between the student's and the teacher's next-token distributions.

    forward direction: KL(p_t || p_s), d/dlogits_s = p_s - p_t
    reverse direction: KL(p_s || p_t), d/dlogits_s = p_s * (log p_s - log p_t - KL)
    """

    @staticmethod
    def forward(ctx, h, w, b, th, tw, tb, temperature: float, chunk: int, reverse: bool):
        kl = torch.empty(h.shape[0], dtype=upcast(h[:0]).dtype, device=h.device)
        for s in range(0, h.shape[0], chunk):
            ls = torch.log_softmax(_logits(h[s:s + chunk], w, b, temperature), -1)
            lt = torch.log_softmax(_logits(th[s:s + chunk], tw, tb, temperature), -1)
            p, d = (ls.exp(), ls - lt) if reverse else (lt.exp(), lt - ls)
            kl[s:s + chunk] = torch.where(p > 0, p * d, torch.zeros_like(p)).sum(-1)
        ctx.save_for_backward(h, w, b, th, tw, tb, kl)
        ctx.temperature, ctx.chunk, ctx.reverse = temperature, chunk, reverse
        return kl

    @staticmethod
    def backward(ctx, grad_out):
        h, w, b, th, tw, tb, kl = ctx.saved_tensors
        c = ctx.chunk

        def dlogits(s, logits):
            ls = torch.log_softmax(logits, -1)
            lt = torch.log_softmax(_logits(th[s:s + c], tw, tb, ctx.temperature), -1)
            ps = ls.exp()
            part = ps * (ls - lt - kl[s:s + c, None]) if ctx.reverse else ps - lt.exp()
            return grad_out[s:s + c, None].to(part.dtype) * part

        return (*_head_backward(ctx, h, w, b, dlogits)[:3], None, None, None, None, None, None)


def kl_from_hidden(student: Head, teacher: Head, *, reverse: bool = False,
                   chunk: int = DEFAULT_ROW_CHUNK) -> torch.Tensor:
    """Per-position KL (N,): forward KL(p_teacher || p_student) or reverse KL(p_student || p_teacher),
    with gradient to the student's hidden states and head only (the teacher is detached)."""
    _check_chunk(chunk)
    if len(student) != len(teacher) or student.vocab_size != teacher.vocab_size:
        raise ValueError(f"student and teacher must cover the same positions and vocabulary: ({len(student)}, "
                         f"{student.vocab_size}) vs ({len(teacher)}, {teacher.vocab_size})")
    if student.temperature != teacher.temperature:
        raise ValueError("student and teacher must use the same temperature")
    tb = teacher.bias.detach() if teacher.bias is not None else None
    return _KLFromHidden.apply(student.hidden, student.weight, student.bias, teacher.hidden.detach(),
                               teacher.weight.detach(), tb, student.temperature, chunk, reverse)


class _LogprobsAndKL(torch.autograd.Function):
    """`_LogprobsAt` at ids (N,) and `_KLFromHidden` of the same student in one pass per chunk: the student's
    logits are formed once in the forward and once in the backward instead of twice each."""

    @staticmethod
    def forward(ctx, h, w, b, th, tw, tb, ids, temperature: float, chunk: int, reverse: bool):
        dtype = upcast(h[:0]).dtype
        lp = torch.empty(h.shape[0], dtype=dtype, device=h.device)
        kl = torch.empty(h.shape[0], dtype=dtype, device=h.device)
        for s in range(0, h.shape[0], chunk):
            ls = torch.log_softmax(_logits(h[s:s + chunk], w, b, temperature), -1)
            lt = torch.log_softmax(_logits(th[s:s + chunk], tw, tb, temperature), -1)
            lp[s:s + chunk] = ls.gather(-1, ids[s:s + chunk, None])[:, 0]
            p, d = (ls.exp(), ls - lt) if reverse else (lt.exp(), lt - ls)
            kl[s:s + chunk] = torch.where(p > 0, p * d, torch.zeros_like(p)).sum(-1)
        ctx.save_for_backward(h, w, b, th, tw, tb, ids, kl)
        ctx.temperature, ctx.chunk, ctx.reverse = temperature, chunk, reverse
        return lp, kl

    @staticmethod
    def backward(ctx, g_lp, g_kl):
        h, w, b, th, tw, tb, ids, kl = ctx.saved_tensors
        c = ctx.chunk

        def dlogits(s, logits):
            ls = torch.log_softmax(logits, -1)
            ps = ls.exp()
            d = torch.zeros_like(ls)
            if g_lp is not None:
                g = g_lp[s:s + c, None].to(d.dtype)
                d = d - ps * g
                d = d.scatter_add(-1, ids[s:s + c, None], g)
            if g_kl is not None:
                lt = torch.log_softmax(_logits(th[s:s + c], tw, tb, ctx.temperature), -1)
                part = ps * (ls - lt - kl[s:s + c, None]) if ctx.reverse else ps - lt.exp()
                d = d + g_kl[s:s + c, None].to(part.dtype) * part
            return d

        return (*_head_backward(ctx, h, w, b, dlogits)[:3], None, None, None, None, None, None, None)


def logprobs_and_kl(student: Head, teacher: Head, ids: torch.Tensor, *, reverse: bool = False,
                    chunk: int = DEFAULT_ROW_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(`logprobs_at(student, ids)`, `kl_from_hidden(student, teacher)`), ids (N,), computed together."""
    _check_chunk(chunk)
    if len(student) != len(teacher) or student.vocab_size != teacher.vocab_size or ids.shape != (len(student),):
        raise ValueError(f"student and teacher must cover the same positions and vocabulary and ids be (N,): "
                         f"({len(student)}, {student.vocab_size}), ({len(teacher)}, {teacher.vocab_size}), "
                         f"{tuple(ids.shape)}")
    if student.temperature != teacher.temperature:
        raise ValueError("student and teacher must use the same temperature")
    tb = teacher.bias.detach() if teacher.bias is not None else None
    return _LogprobsAndKL.apply(student.hidden, student.weight, student.bias, teacher.hidden.detach(),
                                teacher.weight.detach(), tb, ids.long(), student.temperature, chunk, reverse)


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
    lt_out, li_out, z_out = [], [], []
    for s in range(0, len(target), chunk):
        lt = torch.log_softmax(_logits(target.hidden[s:s + chunk], target.weight, target.bias, target.temperature), -1)
        li = torch.log_softmax(_logits(rollout.hidden[s:s + chunk], rollout.weight, rollout.bias,
                                       rollout.temperature), -1)
        idx = ids[s:s + chunk, None].long()
        lt_out.append(lt.gather(-1, idx)[:, 0])
        li_out.append(li.gather(-1, idx)[:, 0])
        z_out.append(obrs.normalizer(lt, li, lam))
    return torch.cat(lt_out), torch.cat(li_out), torch.cat(z_out)
