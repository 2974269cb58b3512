"""jackpot.core.head: every chunked quantity and its gradient equals the unchunked float64 computation,
for several chunk sizes (a ragged last chunk included), with and without a bias, a tied head (the output
embedding also embeds the input), temperature != 1; bf16 against fp32 within a stated tolerance."""

from __future__ import annotations

import pytest
import torch

from jackpot.core import head as H
from jackpot.core.obrs import normalizer as exact_z

N, D, V = 10, 6, 23
CHUNKS = [1, 3, 7, 100]  # 3 and 7 leave a ragged last chunk; 100 > N


def gen(seed):
    return torch.Generator().manual_seed(seed)


def tensors(seed, bias=True, dtype=torch.float64):
    g = gen(seed)
    h = (torch.randn(N, D, generator=g, dtype=torch.float64) * 1.5).to(dtype).requires_grad_()
    w = torch.randn(V, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_() if bias else None
    return h, w, b


def full_logp(h, w, b, t):
    logits = h.double() @ w.double().T + (b.double() if b is not None else 0.0)
    return torch.log_softmax(logits / t, -1)


def grads(out, params):
    return torch.autograd.grad(out, [p for p in params if p is not None])


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k", [None, 4])
def test_logprobs_at_and_its_gradient_match_the_full_computation(chunk, bias, k):
    h, w, b = tensors(1, bias)
    t = 0.7
    ids = torch.randint(0, V, (N,) if k is None else (N, k), generator=gen(2))
    up = torch.randn(ids.shape, generator=gen(3), dtype=torch.float64)  # an upstream gradient
    got = H.logprobs_at(H.Head(h, w, b, t), ids, chunk=chunk)
    ref = full_logp(h, w, b, t).gather(-1, ids if k else ids[:, None])
    ref = ref if k else ref[:, 0]
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, r in zip(grads((got * up).sum(), (h, w, b)), grads((ref * up).sum(), (h, w, b))):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_tied_head_gradient_accumulates_both_uses(chunk):
    """The output embedding also embeds the input tokens (tied, as Qwen3-0.6B/1.7B): its gradient is the
    sum of both paths, as with the full computation."""
    g = gen(4)
    emb = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    mix = torch.randn(D, D, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, V, (N,), generator=g)
    ids = torch.randint(0, V, (N,), generator=g)

    def hidden():
        return torch.tanh(emb[tokens] @ mix)

    got = H.logprobs_at(H.Head(hidden(), emb, None, 1.3), ids, chunk=chunk).sum()
    ref = full_logp(hidden(), emb, None, 1.3).gather(-1, ids[:, None]).sum()
    for a, r in zip(grads(got, (emb, mix)), grads(ref, (emb, mix))):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_kl_from_hidden_and_its_gradient_match_the_full_computation(chunk, reverse, bias):
    hs, ws, bs = tensors(5, bias)
    ht, wt, bt = tensors(6, bias)
    t = 0.8
    up = torch.randn(N, generator=gen(7), dtype=torch.float64)
    got = H.kl_from_hidden(H.Head(hs, ws, bs, t), H.Head(ht, wt, bt, t), reverse=reverse, chunk=chunk)
    ls, lt = full_logp(hs, ws, bs, t), full_logp(ht, wt, bt, t).detach()
    ref = (ls.exp() * (ls - lt)).sum(-1) if reverse else (lt.exp() * (lt - ls)).sum(-1)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    for a, r in zip(grads((got * up).sum(), (hs, ws, bs)), grads((ref * up).sum(), (hs, ws, bs))):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12)
    assert ht.grad is None and wt.grad is None  # the teacher gets no gradient


@pytest.mark.parametrize("chunk", CHUNKS)
def test_entropy_topk_and_exact_z_match_the_full_computation(chunk):
    h, w, b = tensors(8)
    h2, w2, b2 = tensors(9)
    t = 1.4
    lp = full_logp(h, w, b, t)
    head, other = H.Head(h, w, b, t), H.Head(h2, w2, b2, t)
    torch.testing.assert_close(H.entropy(head, chunk=chunk), -(lp.exp() * lp).sum(-1), rtol=1e-10, atol=1e-12)
    vals, ids = H.topk(head, 5, chunk=chunk)
    ref = lp.topk(5, -1)
    torch.testing.assert_close(vals, ref.values, rtol=1e-12, atol=1e-12)
    assert torch.equal(ids, ref.indices)
    z = H.normalizer(head, other, 0.6, chunk=chunk)
    lp2 = full_logp(h2, w2, b2, t)
    torch.testing.assert_close(z, exact_z(lp, lp2, 0.6), rtol=1e-10, atol=1e-12)
    ids = torch.randint(0, V, (N,), generator=gen(13))
    lt, li, z2 = H.logprobs_and_normalizer(head, other, ids, 0.6, chunk=chunk)
    torch.testing.assert_close(lt, lp.gather(-1, ids[:, None])[:, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(li, lp2.gather(-1, ids[:, None])[:, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z2, z, rtol=1e-12, atol=1e-14)


def test_bf16_parameters_agree_with_fp32_within_bf16_rounding():
    """bf16 hidden states and head (the matmul in bf16, the log-softmax in fp32): log-probs within 0.05 nats
    and gradients within 2% (relative to their norm) of the fp32 computation on the same values."""
    h32, w32, b32 = tensors(10, dtype=torch.float32)
    ids = torch.randint(0, V, (N,), generator=gen(11))
    hb, wb, bb = (x.detach().bfloat16().requires_grad_() for x in (h32, w32, b32))
    h32, w32, b32 = (x.detach().float().requires_grad_() for x in (hb, wb, bb))  # the same (rounded) values
    lp_b = H.logprobs_at(H.Head(hb, wb, bb), ids, chunk=3)
    lp_f = H.logprobs_at(H.Head(h32, w32, b32), ids, chunk=3)
    assert lp_b.dtype == torch.float32
    torch.testing.assert_close(lp_b, lp_f, rtol=0, atol=0.05)
    for a, r in zip(grads(lp_b.sum(), (hb, wb, bb)), grads(lp_f.sum(), (h32, w32, b32))):
        assert a.dtype == torch.bfloat16
        assert (a.float() - r).norm() <= 0.02 * r.norm()


def test_bad_input_is_a_clear_error():
    h, w, b = tensors(12)
    with pytest.raises(ValueError, match="hidden must be"):
        H.Head(h, w[:, :3])
    with pytest.raises(ValueError, match="bias"):
        H.Head(h, w, b[:5])
    with pytest.raises(ValueError, match="temperature"):
        H.Head(h, w, b, 0.0)
    with pytest.raises(ValueError, match="vocabulary"):
        H.logprobs_at(H.Head(h, w), torch.full((N,), V))
    with pytest.raises(ValueError, match="chunk"):
        H.logprobs_at(H.Head(h, w), torch.zeros(N, dtype=torch.long), chunk=0)
    with pytest.raises(ValueError, match="same positions"):
        H.kl_from_hidden(H.Head(h, w), H.Head(h[:3], w))


OUTPUTS = ("policy", "student", "kl", "student_at_top")


def _joint_reference(p, s, ids, kl, k):
    """The joint pass's outputs from the unchunked float64 log-softmax of each head (the teacher detached)."""
    lp, ls = full_logp(*p), full_logp(*s)
    lt = lp.detach()
    out = {"policy": lp.gather(-1, ids[:, None])[:, 0], "student": ls.gather(-1, ids[:, None])[:, 0]}
    if kl:
        out["kl"] = (ls.exp() * (ls - lt)).sum(-1) if kl == "reverse" else (lt.exp() * (lt - ls)).sum(-1)
    if k:
        top = lt.topk(k, -1)
        out["student_at_top"], out["policy_top"] = ls.gather(-1, top.indices), top.values
    return out


@pytest.mark.parametrize("chunk", [3, 100])
@pytest.mark.parametrize(("kl", "k"), [("forward", 0), ("reverse", 0), (None, 4), (None, 0)])
@pytest.mark.parametrize("which", ["all", "policy", "student", "distill"])
def test_joint_logprobs_and_their_gradients_match_the_full_computation(chunk, kl, k, which):
    """One pass over both heads: every output equals its float64 reference, and for any mix of upstream
    gradients the policy's head gets the gradient of its own log-probs only, the student's head that of its
    log-probs and distillation terms only (the policy is the teacher: held fixed)."""
    p, s = tensors(14), tensors(15)
    ids = torch.randint(0, V, (N,), generator=gen(16))
    got = H.joint_logprobs(H.Head(*p, 0.9), H.Head(*s, 0.9), ids, kl=kl, topk=k, chunk=chunk)
    ref = _joint_reference((*p, 0.9), (*s, 0.9), ids, kl, k)
    assert (got.kl is None) == (kl is None) and (got.student_at_top is None) == (k == 0)
    for name in ref:
        torch.testing.assert_close(getattr(got, name), ref[name], rtol=1e-11, atol=1e-12)
    assert not got.policy_top.requires_grad if k else got.policy_top is None
    ups = {name: torch.randn(ref[name].shape, generator=gen(17 + n), dtype=torch.float64)
           for n, name in enumerate(OUTPUTS) if name in ref}
    chosen = {"all": list(ups), "policy": ["policy"], "student": ["student"],
              "distill": [n for n in ("kl", "student_at_top") if n in ups] or ["student"]}[which]

    def total(outs):
        return sum((outs[n] * ups[n]).sum() for n in chosen)

    params = [x for x in (*p, *s) if x is not None]
    got_g = torch.autograd.grad(total({n: getattr(got, n) for n in ups}), params, allow_unused=True)
    ref_g = torch.autograd.grad(total(ref), params, allow_unused=True)
    for a, r in zip(got_g, ref_g, strict=True):
        if r is None:
            assert a is None or not a.abs().any()
        else:
            torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12)


def test_joint_pass_forms_each_head_once_per_chunk_forward_and_backward(monkeypatch):
    """The cost floor of a joint update (METHOD.md §9): with the exact KL and the top-k estimator alike, each
    head's logits are formed once per chunk in the forward and once in the backward — the teacher's
    distribution comes from the policy's own pass. Counted by the weight each logits computation uses."""
    calls = []
    real = H._logits
    monkeypatch.setattr(H, "_logits", lambda h, w, b, t: calls.append(w) or real(h, w, b, t))
    p, s = tensors(20), tensors(21)
    ids = torch.randint(0, V, (N,), generator=gen(22))
    chunks = -(-N // 3)
    for request in ({"kl": "forward"}, {"kl": "reverse"}, {"topk": 5}):
        calls.clear()
        out = H.joint_logprobs(H.Head(*p), H.Head(*s), ids, chunk=3, **request)
        distill = out.kl if out.kl is not None else out.student_at_top.sum(-1)
        assert sum(w is p[1] for w in calls) == chunks and sum(w is s[1] for w in calls) == chunks
        calls.clear()
        (out.policy.sum() + out.student.sum() + distill.sum()).backward()
        assert sum(w is p[1] for w in calls) == chunks, request
        assert sum(w is s[1] for w in calls) == chunks, request


def test_joint_pass_bad_input_is_a_clear_error():
    p, s = tensors(23), tensors(24)
    ids = torch.zeros(N, dtype=torch.long)
    with pytest.raises(ValueError, match="kl must be"):
        H.joint_logprobs(H.Head(*p), H.Head(*s), ids, kl="both")
    with pytest.raises(ValueError, match="topk must be"):
        H.joint_logprobs(H.Head(*p), H.Head(*s), ids, topk=V + 1)
    with pytest.raises(ValueError, match="same positions"):
        H.joint_logprobs(H.Head(*p), H.Head(*s), ids[:3])
    with pytest.raises(ValueError, match="temperature"):
        H.joint_logprobs(H.Head(*p, 0.5), H.Head(*s), ids)
