"""train.mixed_precision=bf16 on CPU (torch's autocast runs there too): the loss path runs under bfloat16 autocast,
the parameters, their gradients and AdamW's moments stay float32 (the master weights), and the step agrees with
the float32 step to bfloat16's precision; the config refuses what the option cannot mean. Also the optimizer
(fused only where every parameter is on CUDA) and the head chunk chosen for a GPU."""

from __future__ import annotations

import contextlib

import pytest
import torch
from reference import response_logits

from jackpot.errors import InputError
from jackpot.models.loading import build_tiny_qwen
from jackpot.rollout.base import RolloutBatch
from jackpot.train.config import build_config
from jackpot.train.precision import adamw, autocast, gpu_head_chunk
from jackpot.train.prepare import prepare
from jackpot.train.update import update

V, B, P, T = 40, 4, 3, 6


def _model(seed: int) -> torch.nn.Module:
    return build_tiny_qwen(V, hidden_size=64, num_layers=1, num_heads=2, seed=seed, pad_token_id=0, eos_token_id=1,
                           bos_token_id=2).eval()


def _batch(rollout: torch.nn.Module) -> RolloutBatch:
    g = torch.Generator().manual_seed(0)
    prompt, response = torch.randint(3, V, (B, P), generator=g), torch.randint(3, V, (B, T), generator=g)
    with torch.no_grad():
        lp = torch.log_softmax(response_logits(rollout, torch.cat([prompt, response], 1),
                                               torch.ones(B, P + T, dtype=torch.long), T), -1)
    top = lp.topk(4, -1)
    return RolloutBatch(prompt, torch.ones_like(prompt), response, torch.ones(B, T),
                        lp.gather(-1, response[..., None])[..., 0], top.indices, top.values)


def _step(mixed: str | None):
    """One prepare + update of a fresh pair under `mixed`; returns the policy, its optimizer and the metrics."""
    cfg = build_config(None, ["train.prompts_per_step=2", "train.group_size=2", f"sampling.max_new_tokens={T}",
                              "sampling.topk=4", *([f"train.mixed_precision={mixed}"] if mixed else [])])
    policy, rollout = _model(0), _model(1)
    batch = _batch(rollout)
    policy_opt, rollout_opt = adamw(list(policy.parameters()), 1e-2), adamw(list(rollout.parameters()), 1e-2)
    with autocast(cfg.train.mixed_precision, policy):
        prep = prepare(cfg, batch, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), policy=policy, rollout_model=rollout,
                       init_policy=None, step=1)
        record = update(cfg, prep, policy=policy, rollout_model=rollout, step=1, policy_opt=policy_opt,
                        rollout_opt=rollout_opt)
    return policy, policy_opt, record


def test_bf16_autocast_keeps_float32_master_weights_and_states():
    start = [p.detach().clone() for p in _model(0).parameters()]
    policy, opt, record = _step("bf16")
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    states = [t for s in opt.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert states and all(t.dtype == torch.float32 for t in states)
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in record.values())
    assert any(not torch.equal(a, p) for a, p in zip(start, policy.parameters()))  # it learned


def test_bf16_step_matches_the_float32_step_to_bf16_precision():
    mixed, _, r_mixed = _step("bf16")
    full, _, r_full = _step(None)
    # AdamW's first step moves every weight by about lr * sign(gradient): the directions must agree where the
    # float32 gradient is not tiny (bf16 keeps 8 bits of mantissa: relative error ~ 4e-3 per product)
    start = _model(0)
    agree = total = 0
    for s, m, f in zip(start.parameters(), mixed.parameters(), full.parameters()):
        dm, df = (m - s).detach(), (f - s).detach()
        big = df.abs() > 5e-3
        agree += (torch.sign(dm[big]) == torch.sign(df[big])).sum().item()
        total += big.sum().item()
    assert total > 1000 and agree / total > 0.95
    assert float(r_mixed["policy/loss"]) == pytest.approx(float(r_full["policy/loss"]), abs=2e-2)


def test_autocast_none_changes_nothing():
    assert isinstance(autocast(None, _model(0)), contextlib.nullcontext)
    with autocast("bf16", _model(0)):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_optimizer_is_fused_only_on_cuda():
    opt = adamw(list(_model(0).parameters()), 1e-3)
    assert not opt.defaults.get("fused")
    reference = torch.optim.AdamW(_model(0).parameters(), lr=1e-3)
    assert {k: v for k, v in opt.defaults.items() if k != "fused"} == \
        {k: v for k, v in reference.defaults.items() if k != "fused"}


def test_gpu_head_chunk():
    gib = 2**30
    assert gpu_head_chunk(151_936, 80 * gib) == 1024   # 3 x 1024 x V x 4 B = 1.7 GiB, 2 % of the card
    assert gpu_head_chunk(151_936, 141 * gib) == 1024   # 1,661 fits: the power of two below
    assert gpu_head_chunk(32_000, 80 * gib) == 4096      # a 32k vocabulary: 4,473 fits
    assert gpu_head_chunk(56, 80 * gib) == 16384         # a tiny vocabulary: the upper bound
    assert gpu_head_chunk(151_936, 8 * gib) == 1024      # never below the CPU default


@pytest.mark.parametrize("overrides, message", [
    (["train.mixed_precision=fp16"], r"train.mixed_precision must be one of \['bf16'\]"),
    (["train.mixed_precision=bf16", "policy.dtype=bfloat16"], "policy.dtype must be float32, got bfloat16"),
    (["train.mixed_precision=bf16", "rollout_model.dtype=bfloat16"], "rollout_model.dtype must be float32"),
    (["train.mixed_precision=bf16", "parallel.mixed_precision=bfloat16"], "choose one"),
])
def test_the_config_refuses_what_mixed_precision_cannot_mean(overrides, message):
    with pytest.raises(InputError, match=message):
        build_config(None, overrides)
    build_config(None, ["train.mixed_precision=bf16", "rollout_model.dtype=bfloat16", "distill.rollout_model=frozen"])

