"""The update phase: from a scored rollout batch to optimizer steps of the policy and the rollout model.

    prepare()  once per rollout batch, no gradients: advantages, p_ref (policy at collection) and
               p_omega_old (rollout model) at the sampled tokens, the per-state OBRS normaliser Z for
               target='ref', one uniform per token for the rejection mask, and mismatch diagnostics.
    update()   ppo_epochs x minibatches optimizer steps; in each micro-batch one forward of the policy
               (and, when trained jointly, of the rollout model):
                 policy:        keep * (w * PPO(p_new / p_ref, A) + kl_coef * k3(p_init || p_new))
                 rollout model: PPO(p_omega / p_omega_old, A) * min(p_omega_old / p_inf, cap)
                                + coef * KL(SG(p_new) || p_omega)         (paper eq. 8)
               The correction (weights w, mask keep) comes from the CORRECTIONS table.

Denominators of the loss are those of the whole mini-batch, and for target='ref' the correction
(lambda, Z with kappa, weights, mask) is computed once over the whole rollout batch, so micro-batching
does not change the gradient (1 x 8 == 8 x 1, tested). For target='new' the correction depends on the
current policy and is computed per micro-batch: lambda in budget mode, the mean acceptance of
z='batch', kappa of z='topk' and the kept-token count of token-mean are then micro-batch quantities
(a documented approximation; without micro_batch_size they are mini-batch quantities, as in METHOD.md §6).
The KL penalty to the initial policy, like the policy loss, covers only the tokens the correction keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from jackpot.core import obrs
from jackpot.core.advantages import group_advantages
from jackpot.core.corrections import CorrectionInputs, CorrectionResult, apply_correction
from jackpot.core.divergences import kl_estimators, mismatch_metrics
from jackpot.core.losses import aggregate, distill_kl, ppo_token_loss
from jackpot.metrics import mean_of
from jackpot.models.forward import response_logits, token_logprobs
from jackpot.rollout.base import RolloutBatch
from jackpot.train.config import Config

# Losses whose per-micro-batch values are shares of the mini-batch loss: logged as their sum.
_ADDITIVE = ("policy/loss", "rollout_model/ppo_loss", "rollout_model/distill_kl")


@dataclass
class Prepared:
    """A rollout batch with everything the update needs, all (B, T) unless noted."""

    batch: RolloutBatch
    advantages: torch.Tensor          # (B,)
    ref_logp: torch.Tensor            # log p_ref(x_t): the policy at collection
    rollout_old_logp: torch.Tensor    # log p_omega_old(x_t): the rollout model before its update
    init_logp: torch.Tensor | None    # log p_init(x_t): the initial policy (kl_coef > 0)
    z: torch.Tensor | None            # per-state normaliser for target='ref'
    uniforms: torch.Tensor
    correction: CorrectionResult | None  # the whole batch's weights and mask, for target='ref'
    metrics: dict[str, torch.Tensor]


def step_seed(seed: int, step: int, stream: int) -> int:
    """A deterministic seed per (run seed, step, purpose) — identical across processes, for exact resume."""
    return (seed * 1_000_003 + step) * 16 + stream


def _forward(model: torch.nn.Module, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    return response_logits(model, batch.input_ids, batch.attention_mask, batch.response_len, temperature)


def _raw_normalizer(cfg: Config, tgt_logits: torch.Tensor, rollout_logits: torch.Tensor | None,
                    batch: RolloutBatch) -> torch.Tensor | None:
    """Per-state Z_t before any batch correction: exact (streamed over V), top-k (needs kappa, see
    `_with_kappa`), or None when the correction needs no per-state Z ('batch' mode, budget mode)."""
    c = cfg.correction
    if c.name != "jackpot" or c.budget is not None or c.z == "batch":
        return None
    if c.z == "exact":
        return obrs.normalizer_from_logits(tgt_logits, rollout_logits, c.lam)
    tgt_at_topk = torch.log_softmax(tgt_logits, -1).gather(-1, batch.topk_ids)
    return obrs.topk_normalizer(batch.topk_ids, batch.topk_logprobs, tgt_at_topk, c.lam)


def _with_kappa(cfg: Config, z: torch.Tensor | None, tgt_logp: torch.Tensor,
                batch: RolloutBatch) -> tuple[torch.Tensor | None, dict]:
    """Top-k mode: scale Z_approx by kappa = mean acceptance / mean Z_approx over all of `batch`."""
    if z is None or cfg.correction.z != "topk":
        return z, {}
    mask = batch.response_mask
    a = obrs.acceptance_prob(tgt_logp, batch.logprobs, cfg.correction.lam)
    k = obrs.kappa(a, z, mask)
    return k * z, {"obrs/kappa": k, "obrs/topk_z_mean": (z * mask).sum() / mask.sum().clamp_min(1)}


def _chunks(n: int, size: int | None) -> list[torch.Tensor]:
    idx = torch.arange(n)
    return list(idx.split(size)) if size else [idx]


@torch.no_grad()
def prepare(cfg: Config, batch: RolloutBatch, rewards: torch.Tensor, *, policy, rollout_model, init_policy,
            step: int) -> Prepared:
    """rewards (N, G) with batch rows ordered prompt-major. rollout_model None means on-policy."""
    temp = cfg.sampling.temperature
    advantages = group_advantages(rewards, mode=cfg.train.advantages).reshape(-1)
    parts: dict[str, list] = {"ref": [], "old": [], "init": [], "z": []}
    for idx in _chunks(len(batch), cfg.train.micro_batch_size):
        mb = batch.select(idx)
        ref_logits = _forward(policy, mb, temp)
        roll_logits = ref_logits if rollout_model is None else _forward(rollout_model, mb, temp)
        parts["ref"].append(token_logprobs(ref_logits, mb.response_ids))
        parts["old"].append(token_logprobs(roll_logits, mb.response_ids))
        if init_policy is not None:
            parts["init"].append(token_logprobs(_forward(init_policy, mb, temp), mb.response_ids))
        if cfg.correction.target == "ref":
            parts["z"].append(_raw_normalizer(cfg, ref_logits, roll_logits, mb))
    cat = {k: torch.cat(v) if v and v[0] is not None else None for k, v in parts.items()}
    cat["z"], z_metrics = _with_kappa(cfg, cat["z"], cat["ref"], batch)  # kappa over the whole batch
    gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, step, 1))
    uniforms = torch.rand(batch.response_mask.shape, generator=gen).to(batch.response_mask.device)
    mask = batch.response_mask
    correction = None
    if cfg.correction.target == "ref":  # fixed for the whole batch: computed once, sliced per micro-batch
        correction = apply_correction(cfg.correction.name, CorrectionInputs(
            rollout_logp=batch.logprobs, ref_logp=cat["ref"], mask=mask,
            uniforms=uniforms if cfg.correction.sampled_mask else None, z=cat["z"]), **cfg.correction.kwargs())
    metrics = {f"mismatch/{k}": v for k, v in mismatch_metrics(cat["ref"], batch.logprobs, mask).items()}
    metrics.update(correction.stats if correction is not None else {})
    metrics.update({f"mismatch/rollout_model_{k}": v
                    for k, v in kl_estimators(cat["old"], batch.logprobs, mask).items() if k == "kl_k3"})
    metrics.update(z_metrics)
    return Prepared(batch, advantages, cat["ref"], cat["old"], cat["init"], cat["z"], uniforms, correction, metrics)


def _correct(cfg: Config, prep: Prepared, idx: torch.Tensor, new_logits: torch.Tensor,
             new_logp: torch.Tensor) -> CorrectionResult:
    """The correction for a micro-batch: a slice of the batch's (target='ref'), or computed now ('new')."""
    if prep.correction is not None:
        c = prep.correction
        return CorrectionResult(c.weights[idx], c.mask[idx], {})
    mb = prep.batch.select(idx)
    z, zm = _with_kappa(cfg, _raw_normalizer(cfg, new_logits.detach(), None, mb), new_logp.detach(), mb)
    inp = CorrectionInputs(
        rollout_logp=mb.logprobs, ref_logp=prep.ref_logp[idx], mask=mb.response_mask,
        new_logp=new_logp.detach(), uniforms=prep.uniforms[idx] if cfg.correction.sampled_mask else None, z=z)
    result = apply_correction(cfg.correction.name, inp, **cfg.correction.kwargs())
    result.stats.update(zm)
    return result


def _policy_loss(cfg: Config, prep: Prepared, idx: torch.Tensor, new_logits: torch.Tensor,
                 denominator: torch.Tensor | None, share: float) -> tuple[torch.Tensor, dict]:
    """denominator None: the kept-token count is only known per micro-batch; the micro-batch mean is
    then weighted by `share`, its fraction of the mini-batch's sequences."""
    t = cfg.train
    mb = prep.batch.select(idx)
    mask = mb.response_mask
    new_logp = token_logprobs(new_logits, mb.response_ids)
    corr = _correct(cfg, prep, idx, new_logits, new_logp)
    tok, diag = ppo_token_loss(new_logp, prep.ref_logp[idx], prep.advantages[idx],
                               clip_eps=t.clip_eps, clip_eps_high=t.clip_eps_high)
    tok = tok * corr.weights
    if prep.init_logp is not None and t.kl_coef > 0:
        log_rho = (prep.init_logp[idx] - new_logp).clamp(-20, 20)
        tok = tok + t.kl_coef * (log_rho.exp() - 1 - log_rho)
    loss = aggregate(tok, corr.mask, t.loss_agg, response_mask=mask, denominator=denominator)
    loss = loss if denominator is not None else loss * share
    m = mask.sum().clamp_min(1)
    kept = corr.mask.sum().clamp_min(1)
    stats = {"policy/loss": loss.detach(), "policy/clipfrac": (diag["clipped"] * corr.mask).sum() / kept,
             "policy/ratio_mean": (diag["ratio"] * mask).sum() / m, **corr.stats}
    return loss, stats


def _rollout_model_loss(cfg: Config, prep: Prepared, idx: torch.Tensor, roll_logits: torch.Tensor,
                        new_logits: torch.Tensor, denominator: torch.Tensor) -> tuple[torch.Tensor, dict]:
    d, t = cfg.distill, cfg.train
    mb = prep.batch.select(idx)
    mask = mb.response_mask
    logp = token_logprobs(roll_logits, mb.response_ids)
    stats = {}
    total = roll_logits.new_zeros(())
    if d.ppo:
        tok, _ = ppo_token_loss(logp, prep.rollout_old_logp[idx], prep.advantages[idx],
                                clip_eps=t.clip_eps, clip_eps_high=t.clip_eps_high)
        is_w = (prep.rollout_old_logp[idx] - mb.logprobs).clamp(-20, 20).exp().clamp_max(d.is_cap)
        ppo = aggregate(tok * is_w, mask, "token-mean", denominator=denominator)
        total = total + ppo
        stats["rollout_model/ppo_loss"] = ppo.detach()
    if d.coef > 0:
        teacher = new_logits.detach()
        kl = distill_kl(roll_logits, teacher, direction=d.direction, estimator=d.estimator,
                        is_cap=d.is_cap, **_distill_inputs(d.estimator, teacher, mb, cfg.sampling.topk))
        distill = aggregate(kl, mask, "token-mean", denominator=denominator)
        total = total + d.coef * distill
        stats["rollout_model/distill_kl"] = distill.detach()
    return total, stats


def _distill_inputs(estimator: str, teacher: torch.Tensor, mb: RolloutBatch, k: int) -> dict:
    """The teacher-side tensors each distillation estimator reads (the full one reads the logits)."""
    if estimator == "topk":
        top = torch.log_softmax(teacher, -1).topk(min(k, teacher.shape[-1]), -1)
        return {"teacher_topk_ids": top.indices, "teacher_topk_logp": top.values}
    if estimator == "sampled":
        return {"sampled_ids": mb.response_ids, "teacher_sampled_logp": token_logprobs(teacher, mb.response_ids),
                "behaviour_sampled_logp": mb.logprobs}
    return {}


def update(cfg: Config, prep: Prepared, *, policy, rollout_model, policy_opt, rollout_opt, step: int) -> dict:
    """ppo_epochs x minibatches optimizer steps over the prepared batch; returns averaged metrics."""
    t, temp = cfg.train, cfg.sampling.temperature
    joint = rollout_model is not None and cfg.distill.rollout_model == "joint"
    gen = torch.Generator().manual_seed(step_seed(t.seed, step, 2))
    records = []  # one dict per mini-batch
    for _ in range(t.ppo_epochs):
        order = torch.randperm(len(prep.batch), generator=gen)
        for mini in order.chunk(t.minibatches):
            denom_pol, denom_resp = _denominators(cfg, prep, mini)
            policy_opt.zero_grad(set_to_none=True)
            if joint:
                rollout_opt.zero_grad(set_to_none=True)
            micro = []
            for idx in mini.split(t.micro_batch_size or len(mini)):
                mb = prep.batch.select(idx)
                new_logits = _forward(policy, mb, temp)
                loss, stats = _policy_loss(cfg, prep, idx, new_logits, denom_pol, len(idx) / len(mini))
                loss.backward()
                if joint:
                    roll_loss, roll_stats = _rollout_model_loss(cfg, prep, idx, _forward(rollout_model, mb, temp),
                                                                new_logits, denom_resp)
                    roll_loss.backward()
                    stats.update(roll_stats)
                micro.append(stats)
            record = mean_of(micro)
            record.update({k: torch.stack([m[k] for m in micro]).sum() for k in _ADDITIVE if k in record})
            record["policy/grad_norm"] = _step(policy, policy_opt, t.grad_clip)
            if joint:
                record["rollout_model/grad_norm"] = _step(rollout_model, rollout_opt, t.grad_clip)
            records.append(record)
    return mean_of(records)


def _denominators(cfg: Config, prep: Prepared, mini: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Mini-batch-wide loss denominators: (policy — None if only known per micro-batch, response tokens)."""
    mask = prep.batch.response_mask[mini]
    resp = mask.sum().clamp_min(1.0)
    mode = cfg.train.loss_agg
    if mode == "seq-mean-token-mean":
        return torch.tensor(float(len(mini))), resp
    if mode == "seq-sum-norm":
        return torch.tensor(float(len(mini) * cfg.sampling.max_new_tokens)), resp
    if mode == "token-mean-all":
        return resp, resp
    # token-mean over kept tokens: known up front unless the mask depends on the current policy
    if prep.correction is None:
        return None, resp
    return prep.correction.mask[mini].sum().clamp_min(1.0), resp


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, grad_clip: float | None) -> torch.Tensor:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else float("inf"))
    opt.step()
    return norm.detach()
