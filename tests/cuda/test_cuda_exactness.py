"""The CPU exactness tests again on a CUDA device in bfloat16, at Qwen3's vocabulary (V = 151,936), with stated
tolerances: each quantity computed on the GPU from bfloat16 tensors against float64 on the same (rounded) values.

    chunked head (log-probs at ids, exact KL, entropy, Z)  values within 0.05 nats (log-probs, KL) / 1 % (Z)
                                                           of float64: bf16 products, float32 accumulation
    gradients through the head                             within 2 % of float64, relative to their norm
    OBRS Z from bfloat16 logits                            within 1e-4 relative (the logits are given: only the
                                                           float32 upcast and summation differ)
    one decoupled prepare + update on the GPU              float32 on the GPU equals float32 on the CPU (each
                                                           weight's move within 1e-5 + 1e-3 relative, on all but
                                                           0.1 % of them; no TF32); bf16 autocast agrees in sign
                                                           with float32 on > 95 % of the moved weights, loss
                                                           within 0.02

A dry run of this file on CPU (`.cuda()` removed) passes: the bf16 tolerances hold there; on the GPU only the
kernels differ.

Skipped without a GPU (`-m cuda` selects them; scripts/device_check.sh runs them first). Nothing here has run
yet: no GPU was lent while they were written (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import pytest
import torch

from jackpot.core import head as H
from jackpot.core.obrs import normalizer, normalizer_from_logits

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

N, D, V = 96, 256, 151_936
CHUNK = 32  # several chunks, a ragged last one


def _tensors(seed: int, bias: bool = False):
    """bf16 hidden states and head on the GPU, and their float64 copies (the same rounded values)."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, D, generator=g) * 0.5).bfloat16()
    w = (torch.randn(V, D, generator=g) * 0.2).bfloat16()
    b = (torch.randn(V, generator=g) * 0.1).bfloat16() if bias else None
    on_gpu = [x.cuda().requires_grad_() if x is not None else None for x in (h, w, b)]
    exact = [x.double().cuda().requires_grad_() if x is not None else None for x in (h, w, b)]
    return on_gpu, exact


def _full_logp(h, w, b, t=1.0):
    return torch.log_softmax((h @ w.T + (b if b is not None else 0.0)) / t, -1)


def _grads(out, params):
    return torch.autograd.grad(out, [p for p in params if p is not None])


def _close_in_norm(got, ref, rel):
    for a, r in zip(got, ref):
        assert (a.double() - r).norm() <= rel * r.norm(), f"{(a.double() - r).norm() / r.norm():.4f} > {rel}"


def test_logprobs_at_and_gradient_in_bf16():
    (h, w, b), (hx, wx, bx) = _tensors(0, bias=True)
    ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(1)).cuda()
    got = H.logprobs_at(H.Head(h, w, b, 0.8), ids, chunk=CHUNK)
    ref = _full_logp(hx, wx, bx, 0.8).gather(-1, ids[:, None])[:, 0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=0.05)
    _close_in_norm(_grads(got.sum(), (h, w, b)), _grads(ref.sum(), (hx, wx, bx)), 0.02)


@pytest.mark.parametrize("reverse", [False, True])
def test_exact_kl_and_gradient_in_bf16(reverse):
    (hs, ws, _), (hsx, wsx, _) = _tensors(2)
    (ht, wt, _), (htx, wtx, _) = _tensors(3)
    got = H.kl_from_hidden(H.Head(hs, ws), H.Head(ht, wt), reverse=reverse, chunk=CHUNK)
    ls, lt = _full_logp(hsx, wsx, None), _full_logp(htx, wtx, None).detach()
    ref = (ls.exp() * (ls - lt)).sum(-1) if reverse else (lt.exp() * (lt - ls)).sum(-1)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=0.05)
    _close_in_norm(_grads(got.sum(), (hs, ws)), _grads(ref.sum(), (hsx, wsx)), 0.02)


def test_entropy_and_exact_z_in_bf16():
    (h, w, _), (hx, wx, _) = _tensors(4)
    (h2, w2, _), (h2x, w2x, _) = _tensors(5)
    with torch.no_grad():
        lp, lp2 = _full_logp(hx, wx, None), _full_logp(h2x, w2x, None)
        torch.testing.assert_close(H.entropy(H.Head(h, w), chunk=CHUNK).double(), -(lp.exp() * lp).sum(-1),
                                   rtol=0, atol=0.05)
        z = H.normalizer(H.Head(h, w), H.Head(h2, w2), 0.6, chunk=CHUNK)
        torch.testing.assert_close(z.double(), normalizer(lp, lp2, 0.6), rtol=0.01, atol=0)


def test_obrs_z_from_bf16_logits():
    g = torch.Generator().manual_seed(6)
    target = (torch.randn(8, 16, V, generator=g) * 2).bfloat16().cuda()
    rollout = (target.float() + torch.randn(8, 16, V, generator=g).cuda() * 0.5).bfloat16()
    got = normalizer_from_logits(target, rollout, 1.0)
    ref = normalizer(torch.log_softmax(target.double(), -1), torch.log_softmax(rollout.double(), -1), 1.0)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=0)


def _decoupled_step(device: str, mixed: str | None):
    """One decoupled Jackpot prepare + update of a small Qwen3 pair at the real vocabulary, float32 parameters."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from jackpot.rollout.base import RolloutBatch
    from jackpot.train.config import build_config
    from jackpot.train.precision import adamw, autocast
    from jackpot.train.prepare import prepare
    from jackpot.train.update import update

    def model(seed):
        torch.manual_seed(seed)
        cfg = Qwen3Config(vocab_size=V, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True)
        return Qwen3ForCausalLM(cfg).eval().to(device)

    policy, rollout = model(0), model(1)
    g = torch.Generator().manual_seed(7)
    B, P, T = 4, 8, 16
    prompt, response = torch.randint(0, V, (B, P), generator=g), torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():
        full = torch.cat([prompt, response], 1).to(device)
        lp = torch.log_softmax(rollout(full).logits[:, P - 1:-1].float(), -1)
        top = lp.topk(4, -1)
    batch = RolloutBatch(prompt.to(device), torch.ones(B, P, dtype=torch.long, device=device), response.to(device),
                         torch.ones(B, T, device=device), lp.gather(-1, response.to(device)[..., None])[..., 0],
                         top.indices, top.values)
    cfg = build_config(None, ["train.prompts_per_step=2", "train.group_size=2", f"sampling.max_new_tokens={T}",
                              "sampling.topk=4", "train.head_chunk=16",
                              *([f"train.mixed_precision={mixed}"] if mixed else [])])
    start = [p.detach().cpu().clone() for p in policy.parameters()]
    with autocast(mixed, policy):
        prep = prepare(cfg, batch, torch.tensor([[1.0, 0.0], [0.0, 1.0]], device=device), policy=policy,
                       rollout_model=rollout, init_policy=None, step=1)
        record = update(cfg, prep, policy=policy, rollout_model=rollout, step=1,
                        policy_opt=adamw(list(policy.parameters()), 1e-3),
                        rollout_opt=adamw(list(rollout.parameters()), 1e-3))
    moved = [(p.detach().cpu() - s) for p, s in zip(policy.parameters(), start)]
    return moved, record, [p.dtype for p in policy.parameters()]


def test_decoupled_step_on_the_gpu_equals_the_cpu_step():
    gpu, r_gpu, _ = _decoupled_step("cuda", None)
    cpu, r_cpu, _ = _decoupled_step("cpu", None)
    # AdamW's first step moves a weight by about lr * sign(gradient): a gradient within rounding of zero may flip,
    # so equality is asked of all but 0.1 % of the weights
    close = sum((a - b).abs().le(1e-5 + 1e-3 * b.abs()).sum().item() for a, b in zip(gpu, cpu))
    assert close / sum(a.numel() for a in gpu) > 0.999
    assert float(r_gpu["policy/loss"]) == pytest.approx(float(r_cpu["policy/loss"]), abs=1e-4)


def test_bf16_autocast_step_keeps_fp32_masters_and_follows_the_fp32_step():
    mixed, r_mixed, dtypes = _decoupled_step("cuda", "bf16")
    full, r_full, _ = _decoupled_step("cuda", None)
    assert set(dtypes) == {torch.float32}
    big = [(f.abs() > 1e-4) for f in full]
    agree = sum((torch.sign(m[k]) == torch.sign(f[k])).sum().item() for m, f, k in zip(mixed, full, big))
    total = sum(k.sum().item() for k in big)
    assert total > 10_000 and agree / total > 0.95
    assert float(r_mixed["policy/loss"]) == pytest.approx(float(r_full["policy/loss"]), abs=0.02)
