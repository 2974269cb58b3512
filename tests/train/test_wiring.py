"""The trainer's wiring: which tensor reaches which loss, checked against hand formulas in float64.

For every correction x target x aggregation mode, one `prepare` + `update` (SGD, lr 1, one optimizer step)
on a hand-built batch must move the policy by exactly minus the gradient of

    sum_t keep_t * w_t * PPO_t(p_new / p_old, A) / denominator

with keep, w, Z, kappa, lambda, the PPO clip and the denominator recomputed here from the definitions
(METHOD.md §4), independently of `jackpot.train.update`. The batch is built so that the formula is
discriminating: the rollout model and the policy differ (weights far from 1, tokens rejected), and the
policy moves between `prepare` and `update` (the staleness case), so p_new != p_old, the PPO clip binds,
and target='new' differs from target='old'. Likewise for the rollout model's loss (PPO with its IS weight
+ distillation toward the policy in each direction and estimator), the grad clip, and collection.
"""

from __future__ import annotations

import copy

import pytest
import torch
from reference import response_logits

from jackpot.core.advantages import group_advantages
from jackpot.models.loading import build_tiny_qwen
from jackpot.rollout.base import RolloutBatch
from jackpot.seeding import step_seed
from jackpot.train.config import build_config
from jackpot.train.prepare import prepare
from jackpot.train.update import update

V, B, P, T, G = 24, 8, 3, 5, 4  # vocabulary, sequences, prompt and response length, group size
STEP = 3


def _model(seed: int, sharpen: float) -> torch.nn.Module:
    m = build_tiny_qwen(V, hidden_size=16, num_layers=1, num_heads=2, seed=seed, pad_token_id=0, eos_token_id=1,
                        bos_token_id=2).double().eval()
    with torch.no_grad():
        m.model.norm.weight.mul_(sharpen)  # sharper next-token distributions: ratios far from 1
    return m


def _perturbed(model: torch.nn.Module, seed: int, scale: float = 0.03) -> torch.nn.Module:
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return out


def _logits(model, batch):
    return response_logits(model, batch.input_ids, batch.attention_mask, batch.response_len)


def _logp(logits, ids):
    return torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


@pytest.fixture(scope="module")
def world():
    """A policy, a rollout model, and a batch whose log-probs are the rollout model's (plus engine noise)."""
    g = torch.Generator().manual_seed(0)
    policy, rollout = _model(10, 6.0), _model(11, 9.0)
    prompt_ids = torch.randint(3, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_ids[0, 0], prompt_mask[0, 0] = 0, 0  # a left-padded prompt
    response_ids = torch.randint(3, V, (B, T), generator=g)
    response_mask = torch.ones(B, T, dtype=torch.float64)
    response_mask[1, 3:] = 0.0  # right padding after an early EOS
    response_mask[5, 2:] = 0.0
    response_ids[response_mask == 0] = 0
    proto = RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask, torch.zeros(B, T, dtype=torch.float64),
                         torch.zeros(B, T, 3, dtype=torch.long), torch.zeros(B, T, 3, dtype=torch.float64))
    with torch.no_grad():
        roll_logits = _logits(rollout, proto)
        logp_inf = _logp(roll_logits, response_ids)
        top = torch.log_softmax(roll_logits, -1).topk(3, -1)
    batch = RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask, logp_inf * response_mask,
                         top.indices, top.values)
    rewards = torch.randn(B // G, G, generator=g, dtype=torch.float64)
    return policy, rollout, batch, rewards, roll_logits


def _cfg(*extra):
    # max_new_tokens 7 > T = 5: seq-sum-norm must divide by the configured length, not the batch's
    return build_config(None, ["sampling.max_new_tokens=7", "sampling.topk=3", "train.grad_clip=null",
                               f"train.group_size={G}", f"train.prompts_per_step={B // G}", *extra])


# ----------------------------------------------------------------------------- the hand formula
def _aggregate(tok, keep, mode, resp, norm_len):
    kept = torch.where(keep > 0, tok, torch.zeros_like(tok)) * keep
    n_seq = tok.shape[0]
    return {
        "token-mean": lambda: kept.sum() / keep.sum(),
        "token-mean-all": lambda: kept.sum() / resp.sum(),
        "token-sum": lambda: kept.sum(),
        "seq-mean-token-mean": lambda: (kept.sum(-1) / torch.where(keep.sum(-1) > 0, keep.sum(-1), 1.0)).sum() / n_seq,
        "seq-mean-token-sum": lambda: kept.sum() / n_seq,
        "seq-sum-norm": lambda: kept.sum() / (n_seq * norm_len),
    }[mode]()


def _bisect_lambda(r, m, budget):
    lo, hi = 1e-12, float(r[m > 0].max()) * 2 + 1
    for _ in range(200):
        mid = (lo + hi) / 2
        acc = (torch.clamp(r / mid, max=1.0) * m).sum() / m.sum()
        lo, hi = (mid, hi) if acc > budget else (lo, mid)
    return (lo + hi) / 2


def _weights_and_keep(cfg, batch, old_logp, new_logp, old_logits, new_logits, roll_logits):
    """(w, keep) of the configured correction, from the definitions (METHOD.md §4, §7)."""
    c, m, lp_inf = cfg.correction, batch.response_mask, batch.rollout_logp
    if c.name == "none":
        return torch.ones_like(m), m
    r_ref = (old_logp - lp_inf).exp()
    if c.name == "tis":
        return r_ref.clamp(min=c.cap_min, max=c.cap), m
    if c.name == "icepop":
        keep = m * ((r_ref >= c.low) & (r_ref <= c.high))
        return r_ref * keep, keep
    tgt_lp, tgt_logits = (old_logp, old_logits) if c.target == "old" else (new_logp, new_logits)
    r = (tgt_lp - lp_inf).exp()
    if c.budget is not None:
        lam = _bisect_lambda(r, m, c.budget)
        z = torch.full_like(r, c.budget)
    else:
        lam = c.lam
        a = torch.clamp(r / lam, max=1.0)
        p_tgt = torch.softmax(tgt_logits, -1)
        if c.z == "exact":
            z = torch.minimum(torch.softmax(roll_logits, -1), p_tgt / lam).sum(-1)
        elif c.z == "topk":
            z = torch.minimum(batch.topk_logp.exp(), p_tgt.gather(-1, batch.topk_ids) / lam).sum(-1)
            kappa = max(1.0, float((a * m).sum() / (z * m).sum()))
            assert kappa > 1.05, "top-k Z should under-estimate here, or kappa is not tested"
            z = kappa * z
        else:
            z = torch.full_like(r, float((a * m).sum() / m.sum()))
    a = torch.clamp(r / lam, max=1.0)
    w = z * torch.clamp(r, min=lam)
    if c.c1 is not None:
        w = w.clamp(max=c.c1)
    if c.target == "new":
        w = w * (old_logp - new_logp).exp().clamp(max=c.c2 if c.c2 is not None else float("inf"))
    if c.sampled_mask:
        # one row of max_new_tokens uniforms per (global) sequence, drawn from one table per (seed, step)
        gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, STEP, 1))
        u = torch.rand(m.shape[0], cfg.sampling.max_new_tokens, generator=gen)[:, :m.shape[1]]
        keep = m * (u.double() < a)
        assert 0 < keep.sum() < m.sum(), "the mask should reject some tokens, or it is not tested"
    else:
        keep = m * a
    return w, keep


def _ppo(new_lp, old_lp, adv, t):
    ratio = (new_lp - old_lp).exp()
    loss = -ratio * adv
    if t.clip_eps is not None:
        high = t.clip_eps_high if t.clip_eps_high is not None else t.clip_eps
        loss = torch.maximum(loss, -ratio.clamp(1 - t.clip_eps, 1 + high) * adv)
    if t.dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -t.dual_clip * adv), loss)
    return loss


def _expected_policy_grad(cfg, world, stale, moved, init=None):
    """Minus the parameter change one SGD step at lr 1 should make, from the hand formula."""
    _, rollout, batch, rewards, roll_logits = world
    t = cfg.train
    adv = group_advantages(rewards, mode=t.advantages).reshape(-1, 1).expand(B, T)
    with torch.no_grad():
        old_logits = _logits(stale, batch)
    old_lp = _logp(old_logits, batch.response_ids)
    new_logits = _logits(moved, batch)
    new_lp = _logp(new_logits, batch.response_ids)
    w, keep = _weights_and_keep(cfg, batch, old_lp, new_lp.detach(), old_logits, new_logits.detach(), roll_logits)
    tok = _ppo(new_lp, old_lp, adv, t)
    if init is not None:
        with torch.no_grad():
            init_lp = _logp(_logits(init, batch), batch.response_ids)
        log_rho = init_lp - new_lp
        tok = tok + t.kl_coef * (log_rho.exp() - 1 - log_rho)
    loss = _aggregate(tok * w, keep, t.loss_agg, batch.response_mask, cfg.sampling.max_new_tokens)
    return torch.autograd.grad(loss, list(moved.parameters()), allow_unused=True)


def _trainer_step(cfg, world, stale, moved, *, rollout_opt_lr=None, init=None):
    """prepare with the stale policy (p_old), then one update of the moved one; returns both models'
    parameter changes (and the prepared batch)."""
    _, rollout, batch, rewards, _ = world
    prep = prepare(cfg, batch, rewards, policy=stale, rollout_model=rollout, init_policy=init, step=STEP)
    policy, roll = copy.deepcopy(moved), copy.deepcopy(rollout)
    roll_opt = torch.optim.SGD(roll.parameters(), lr=rollout_opt_lr) if rollout_opt_lr else None
    update(cfg, prep, policy=policy, rollout_model=roll, step=STEP,
           policy_opt=torch.optim.SGD(policy.parameters(), lr=1.0), rollout_opt=roll_opt)
    d_pol = [p1.detach() - p0.detach() for p0, p1 in zip(moved.parameters(), policy.parameters())]
    d_roll = [p1.detach() - p0.detach() for p0, p1 in zip(rollout.parameters(), roll.parameters())]
    return d_pol, d_roll, prep


def _assert_step_is_minus_grad(delta, grad):
    assert any(g is not None and g.abs().max() > 1e-6 for g in grad), "the expected gradient is ~0: nothing tested"
    for d, g in zip(delta, grad):
        torch.testing.assert_close(d, -g if g is not None else torch.zeros_like(d), rtol=1e-9, atol=1e-12)


CORRECTIONS = {
    "none": ["correction.name=none"],
    "tis": ["correction.name=tis", "correction.cap=1.5", "correction.cap_min=0.6"],
    "icepop": ["correction.name=icepop", "correction.low=0.5", "correction.high=2.0"],
    "jackpot-exact": ["correction.z=exact", "correction.lam=1.0", "correction.c1=4.0"],
    "jackpot-exact-lam": ["correction.z=exact", "correction.lam=0.5"],
    "jackpot-topk": ["correction.z=topk", "correction.lam=1.0"],
    "jackpot-batch": ["correction.z=batch", "correction.lam=2.0", "correction.c1=3.0"],
    "jackpot-budget": ["correction.budget=0.6"],
    "jackpot-expected-mask": ["correction.z=exact", "correction.sampled_mask=false"],
    "jackpot-new-topk": ["correction.target=new", "correction.z=topk", "correction.c2=1.1"],
    "jackpot-new-budget": ["correction.target=new", "correction.budget=0.7", "correction.c1=5.0"],
}
AGGREGATIONS = ["token-mean", "token-mean-all", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
                "seq-sum-norm"]


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("correction", list(CORRECTIONS))
def test_policy_step_is_the_hand_formula(world, correction, agg):
    cfg = _cfg(*CORRECTIONS[correction], f"train.loss_agg={agg}", "distill.rollout_model=frozen")
    stale = world[0]
    moved = _perturbed(stale, seed=1)
    delta, _, _ = _trainer_step(cfg, world, stale, moved)
    _assert_step_is_minus_grad(delta, _expected_policy_grad(cfg, world, stale, moved))


@pytest.mark.parametrize("micro", [1, 3])
@pytest.mark.parametrize("correction", list(CORRECTIONS))
def test_micro_batched_policy_step_is_the_same_hand_formula(world, correction, micro):
    """Micro-batches of 3 (8 = 3 + 3 + 2) and 1: the same step, target='new' included (its correction is
    computed over the whole mini-batch in a gradient-free pass first)."""
    agg = "seq-mean-token-mean" if micro == 1 else "token-mean"
    cfg = _cfg(*CORRECTIONS[correction], f"train.loss_agg={agg}", f"train.micro_batch_size={micro}",
               "distill.rollout_model=frozen")
    stale = world[0]
    moved = _perturbed(stale, seed=2)
    delta, _, _ = _trainer_step(cfg, world, stale, moved)
    _assert_step_is_minus_grad(delta, _expected_policy_grad(cfg, world, stale, moved))


@pytest.mark.parametrize("extra", [
    ["train.clip_eps=null"],                                    # the paper's no-clip setting
    ["train.clip_eps=0.1", "train.clip_eps_high=0.3"],          # clip-higher
    ["train.clip_eps=null", "train.dual_clip=1.5"],             # dual clip binds on exploded ratios
    ["train.advantages=rloo"],
    ["train.kl_coef=0.3"],                                      # KL to the initial policy, weighted and masked
])
def test_policy_step_options_reach_the_loss(world, extra):
    cfg = _cfg("correction.z=exact", "correction.c1=4.0", *extra, "distill.rollout_model=frozen")
    stale = world[0]
    moved = _perturbed(stale, seed=3, scale=0.08)
    init = _perturbed(stale, seed=4) if cfg.train.kl_coef > 0 else None
    delta, _, _ = _trainer_step(cfg, world, stale, moved, init=init)
    _assert_step_is_minus_grad(delta, _expected_policy_grad(cfg, world, stale, moved, init=init))


def test_the_ppo_clip_and_the_rejection_really_bind_in_this_batch(world):
    """Guards the tests above: on this batch the clip binds on some tokens and OBRS rejects some."""
    cfg = _cfg("correction.z=exact", "correction.c1=null", "distill.rollout_model=frozen")
    stale = world[0]
    moved = _perturbed(stale, seed=1)
    _, rollout, batch, rewards, _ = world
    prep = prepare(cfg, batch, rewards, policy=stale, rollout_model=rollout, init_policy=None, step=STEP)
    record = update(cfg, prep, policy=copy.deepcopy(moved), rollout_model=rollout, step=STEP,
                    policy_opt=torch.optim.SGD(moved.parameters(), lr=0.0), rollout_opt=None)
    assert record["policy/clipfrac"] > 0.05
    assert 0.2 < prep.metrics["obrs/accept_rate"] < 0.95
    assert prep.metrics["obrs/weight_max"] > 2.0


@pytest.mark.parametrize("micro", [None, 3])
def test_a_per_mini_batch_correction_logs_its_statistics(world, micro):
    """target='new': the correction is computed in update(), and its statistics reach the metrics."""
    extra = [f"train.micro_batch_size={micro}"] if micro else []
    cfg = _cfg("correction.target=new", "correction.z=topk", "distill.rollout_model=frozen", *extra)
    policy, rollout, batch, rewards, _ = world
    prep = prepare(cfg, batch, rewards, policy=policy, rollout_model=rollout, init_policy=None, step=STEP)
    assert "obrs/accept_rate" not in prep.metrics
    record = update(cfg, prep, policy=_perturbed(policy, seed=1), rollout_model=rollout, step=STEP,
                    policy_opt=torch.optim.SGD(policy.parameters(), lr=0.0), rollout_opt=None)
    for key in ("obrs/accept_rate", "obrs/weight_mean", "obrs/kappa", "obrs/lambda"):
        assert key in record and torch.isfinite(record[key]), key
    assert 0 < record["obrs/accept_rate"] < 1


def test_grad_clip_scales_the_step_to_the_clip_norm(world):
    cfg = _cfg("correction.z=exact", "train.grad_clip=1e-3", "distill.rollout_model=frozen")
    stale = world[0]
    moved = _perturbed(stale, seed=1)
    delta, _, _ = _trainer_step(cfg, world, stale, moved)
    grad = _expected_policy_grad(_cfg("correction.z=exact", "distill.rollout_model=frozen"), world, stale, moved)
    g = torch.cat([x.flatten() for x in grad if x is not None])
    d = torch.cat([x.flatten() for x, gr in zip(delta, grad) if gr is not None])
    assert g.norm() > 1e-2  # the clip binds
    torch.testing.assert_close(d.norm(), torch.tensor(1e-3, dtype=d.dtype), rtol=1e-6, atol=0)
    torch.testing.assert_close(d, -g * (1e-3 / g.norm()), rtol=1e-6, atol=1e-12)


# ----------------------------------------------------------------------------- the rollout model's loss
def _expected_rollout_grad(cfg, world, teacher_model, rollout_moved, old_lp):
    from reference import distill_kl

    _, _, batch, rewards, _ = world
    d, t = cfg.distill, cfg.train
    m = batch.response_mask
    adv = group_advantages(rewards, mode=t.advantages).reshape(-1, 1).expand(B, T)
    s_logits = _logits(rollout_moved, batch)
    s_lp = _logp(s_logits, batch.response_ids)
    with torch.no_grad():
        t_logits = _logits(teacher_model, batch)
    is_w = (old_lp - batch.rollout_logp).exp().clamp(max=d.is_cap)
    loss = (_ppo(s_lp, old_lp, adv, t) * is_w * m).sum() / m.sum() if d.ppo else 0.0
    if d.estimator == "full":
        ls, lt = torch.log_softmax(s_logits, -1), torch.log_softmax(t_logits, -1)
        kl = ((ls.exp() * (ls - lt)) if d.direction == "reverse" else (lt.exp() * (lt - ls))).sum(-1)
    elif d.estimator == "topk":
        top = torch.log_softmax(t_logits, -1).topk(cfg.sampling.topk, -1)
        kl = distill_kl(s_logits, direction=d.direction, estimator="topk", teacher_topk_ids=top.indices,
                        teacher_topk_logp=top.values)
    else:
        kl = distill_kl(s_logits, direction=d.direction, estimator="sampled", sampled_ids=batch.response_ids,
                        teacher_sampled_logp=_logp(t_logits, batch.response_ids),
                        rollout_sampled_logp=batch.rollout_logp, is_cap=d.is_cap)
    loss = loss + d.coef * (kl * m).sum() / m.sum()
    return torch.autograd.grad(loss, list(rollout_moved.parameters()), allow_unused=True)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("estimator", ["full", "topk", "sampled"])
@pytest.mark.parametrize("ppo", [True, False])
@pytest.mark.parametrize("micro", [None, 3])
def test_rollout_model_step_distils_toward_the_current_policy(world, direction, estimator, ppo, micro):
    """The teacher is the policy being trained (after it moved), not p_old or p_inf; the PPO term uses
    the rollout model's own old log-probs with the truncated IS weight p_omega_old / p_inf. The one pass over
    both heads (`joint_logprobs`) leaves the policy's step exactly what it is with the rollout model frozen,
    micro-batched or not."""
    micro_cfg = [f"train.micro_batch_size={micro}"] if micro else []
    cfg = _cfg("correction.z=exact", f"distill.direction={direction}", f"distill.estimator={estimator}",
               f"distill.ppo={str(ppo).lower()}", "distill.coef=0.7", "distill.is_cap=1.3", *micro_cfg)
    policy_stale, rollout, batch, rewards, _ = world
    policy_moved = _perturbed(policy_stale, seed=5, scale=0.1)
    d_pol, d_roll, prep = _trainer_step(cfg, world, policy_stale, policy_moved, rollout_opt_lr=1.0)
    alone, _, _ = _trainer_step(_cfg("correction.z=exact", *micro_cfg), world, policy_stale, policy_moved)
    for a, r in zip(d_pol, alone, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        old_lp = _logp(_logits(rollout, batch), batch.response_ids)
    torch.testing.assert_close(prep.rollout_model_old_logp, old_lp, rtol=0, atol=1e-12)
    # engine noise: batch.rollout_logp are the rollout model's own, so p_omega_old / p_inf = 1 here; the IS
    # weight is exercised in test_rollout_model_is_weight_uses_the_engine_logprobs
    grad = _expected_rollout_grad(cfg, world, policy_moved, copy.deepcopy(rollout).requires_grad_(True), old_lp)
    _assert_step_is_minus_grad(d_roll, grad)


def test_rollout_model_is_weight_uses_the_engine_logprobs(world):
    """p_inf (the engine's log-probs) differs from the rollout model's own p_omega_old: the PPO term is
    weighted by min(p_omega_old / p_inf, is_cap)."""
    policy, rollout, batch, rewards, roll_logits = world
    g = torch.Generator().manual_seed(9)
    noisy = (batch.rollout_logp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=-1e-3)
    noisy_batch = RolloutBatch(batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask,
                               noisy * batch.response_mask, batch.topk_ids, batch.topk_logp)
    w2 = (policy, rollout, noisy_batch, rewards, roll_logits)
    cfg = _cfg("correction.name=tis", "distill.coef=0.0", "distill.is_cap=1.3")
    _, d_roll, _ = _trainer_step(cfg, w2, policy, policy, rollout_opt_lr=1.0)
    with torch.no_grad():
        old_lp = _logp(_logits(rollout, batch), batch.response_ids)
    grad = _expected_rollout_grad(cfg, w2, policy, copy.deepcopy(rollout).requires_grad_(True), old_lp)
    _assert_step_is_minus_grad(d_roll, grad)


def test_frozen_rollout_model_does_not_move(world):
    cfg = _cfg("correction.z=exact", "distill.rollout_model=frozen")
    _, d_roll, _ = _trainer_step(cfg, world, world[0], world[0], rollout_opt_lr=None)
    assert all((d == 0).all() for d in d_roll)


# ----------------------------------------------------------------------------- collection
def test_decoupled_mode_samples_from_the_rollout_model_and_on_policy_from_the_policy(tmp_path):
    """The batch's log-probs are those of the model that sampled it (teacher-forced, same temperature)."""
    from jackpot.train.loop import collect, setup

    tiny = ["policy.hidden_size=32", "policy.num_layers=2", "policy.num_heads=2", "policy.sft_steps=2",
            "rollout_model.hidden_size=16", "rollout_model.num_layers=1", "rollout_model.num_heads=2",
            "rollout_model.sft_steps=2", "train.prompts_per_step=2", "train.group_size=2", "tensorboard=false",
            f"cache_dir={tmp_path / 'cache'}", "sampling.temperature=0.7"]
    for mode in ("decoupled", "on-policy"):
        run = setup(build_config(None, [*tiny, f"train.mode={mode}"]), tmp_path / mode)
        batch, _ = collect(run, step=1)
        m = batch.response_mask
        with torch.no_grad():
            own = {name: _logp(response_logits(model, batch.input_ids, batch.attention_mask, batch.response_len, 0.7),
                               batch.response_ids) for name, model in run.models.items()}
        sampler = "rollout_model" if mode == "decoupled" else "policy"
        torch.testing.assert_close(batch.rollout_logp * m, own[sampler] * m, rtol=1e-4, atol=1e-4)
        if mode == "decoupled":
            assert ((batch.rollout_logp - own["policy"]).abs() * m).max() > 1e-2


def _tiny_run(tmp_path, name, *extra):
    from jackpot.train.loop import setup

    tiny = ["policy.hidden_size=32", "policy.num_layers=2", "policy.num_heads=2", "policy.sft_steps=2",
            "rollout_model.hidden_size=16", "rollout_model.num_layers=1", "rollout_model.num_heads=2",
            "rollout_model.sft_steps=2", "train.prompts_per_step=4", "train.group_size=2", "tensorboard=false",
            f"cache_dir={tmp_path / 'cache'}", *extra]
    return setup(build_config(None, tiny), tmp_path / name)


def test_each_step_draws_its_own_prompts_and_samples_reproducibly(tmp_path):
    from jackpot.train.loop import collect

    run = _tiny_run(tmp_path, "run")
    b1, _ = collect(run, step=1)
    b1_again, _ = collect(run, step=1)
    b2, _ = collect(run, step=2)
    assert torch.equal(b1.prompt_ids, b1_again.prompt_ids) and torch.equal(b1.response_ids, b1_again.response_ids)
    assert not torch.equal(b1.prompt_ids, b2.prompt_ids)  # new prompts every step
    # step 2's responses are sampled with step 2's uniforms — one row of max_new_tokens per global sequence
    # from the table of (seed, step, stream 3): regenerating its prompts with step 1's table differs
    from jackpot.rollout.hf import HFRolloutEngine

    s = run.cfg.sampling

    def table(step):
        gen = torch.Generator().manual_seed(step_seed(run.cfg.train.seed, step, 3))
        return torch.rand(len(b2), s.max_new_tokens, generator=gen)

    outs = [HFRolloutEngine(run.rollout_model, run.tokenizer).generate(
        b2.prompt_ids, b2.prompt_mask, max_new_tokens=s.max_new_tokens, temperature=s.temperature, topk=s.topk,
        uniforms=table(step)).response_ids for step in (2, 1)]
    assert torch.equal(outs[0], b2.response_ids) and not torch.equal(outs[0], outs[1])


def test_dropout_is_off_so_the_first_ratio_is_exactly_one(tmp_path):
    """A checkpoint with dropout: the trainer keeps both models in eval mode, so at the first mini-batch
    p_new == p_old exactly (with dropout on, the policy's forward would be random)."""
    from jackpot.train.loop import train_step

    run = _tiny_run(tmp_path, "run", "correction.name=none")
    for model in run.models.values():
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.5
        assert not model.training
    values = train_step(run, 1)
    assert values["policy/ratio_mean"] == 1.0
    assert not any(m.training for m in run.models.values())


@pytest.mark.parametrize("role", ["policy", "rollout_model"])
def test_gradient_checkpointing_recomputes_layers_and_changes_nothing(tmp_path, role):
    """The same step with and without checkpointing; with it, each decoder layer runs again in the backward."""
    from jackpot.train.loop import collect

    results = []
    for on in (False, True):
        run = _tiny_run(tmp_path, f"gc-{on}", f"{role}.gradient_checkpointing={str(on).lower()}",
                        "policy.lr=1e-2", "rollout_model.lr=1e-2")
        calls = []
        model = run.models[role]
        for layer in model.model.layers:  # inside the layer: runs again when the backward recomputes it
            layer.self_attn.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        batch, _ = collect(run, step=1)
        rewards = torch.arange(len(batch), dtype=torch.float32).reshape(-1, 2) % 3  # non-zero advantages
        prep = prepare(run.cfg, batch, rewards, policy=run.policy, rollout_model=run.rollout_model,
                       init_policy=None, step=1)
        calls.clear()
        update(run.cfg, prep, policy=run.policy, rollout_model=run.rollout_model, policy_opt=run.policy_opt,
               rollout_opt=run.rollout_opt, step=1)
        results.append([p.detach().clone() for p in model.parameters()])
        assert len(calls) == len(model.model.layers) * (2 if on else 1)
        assert not model.training
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bfloat16_models_train_with_float32_log_probs(tmp_path):
    from jackpot.train.loop import train_step

    run = _tiny_run(tmp_path, "bf16", "policy.dtype=bfloat16", "rollout_model.dtype=bfloat16", "policy.lr=1e-2")
    object.__setattr__(run.task, "reward", lambda ex, c: float(len(c) % 2))  # non-zero advantages
    assert all(p.dtype == torch.bfloat16 for m in run.models.values() for p in m.parameters())
    before = [p.detach().clone() for p in run.policy.parameters()]
    values = train_step(run, 1)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in values.items() if not k.startswith("perf/"))
    assert any(not torch.equal(a, p) for a, p in zip(before, run.policy.parameters()))


def test_default_micro_batches_follow_a_token_budget(world):
    """micro_batch_size unset: micro_batch_tokens // T sequences per micro-batch (here 10 // 5 = 2), and the
    step is still the hand formula."""
    from jackpot.train.prepare import micro_size

    assert micro_size(_cfg("train.micro_batch_tokens=10"), T) == 2
    assert micro_size(_cfg("train.micro_batch_tokens=10", "train.micro_batch_size=3"), T) == 3
    assert micro_size(_cfg("train.micro_batch_tokens=1"), T) == 1
    assert micro_size(_cfg(), T) >= B  # the default covers this whole batch
    cfg = _cfg("correction.target=new", "correction.z=topk", "train.micro_batch_tokens=10",
               "distill.rollout_model=frozen")
    stale = world[0]
    moved = _perturbed(stale, seed=2)
    delta, _, _ = _trainer_step(cfg, world, stale, moved)
    _assert_step_is_minus_grad(delta, _expected_policy_grad(cfg, world, stale, moved))
