"""The update phase: from a scored rollout batch to optimizer steps of the policy and the rollout model.

    prepare()  (jackpot.train.prepare) once per rollout batch, no gradients: advantages, p_old (the policy
               at collection; the paper's p_ref) and p_omega_old (rollout model) at the sampled tokens,
               one uniform per token, mismatch diagnostics and — for a correction that does not depend
               on the current policy — the correction (weights, mask) of the whole batch.
    update()   ppo_epochs x minibatches optimizer steps. For each mini-batch (`_update`, top to bottom):
               its rows and their correction (target='new': recomputed from the policy being optimised,
               a gradient-free pass over the mini-batch) -> the mini-batch's loss denominators -> per
               micro-batch one forward and backward of each trained model (`_accumulate`):
                 policy:        keep * w * (PPO(p_new / p_old, A) + kl_coef * k3(p_init / p_new))
                 rollout model: PPO(p_omega / p_omega_old, A) * min(p_omega_old / p_inf, cap)
                                + coef * KL(SG(p_new) || p_omega)         (paper eq. 8)
               -> one optimizer step per model. The correction (weights w, mask keep) comes from the
               CORRECTIONS table; coef is distill.coef, or with distill.target_kl the step's value from
               jackpot.train.gap_control (adapted to the gap prepare measured on this batch).

A correction that needs the current policy (Jackpot with target='new') is recomputed here at every
mini-batch over the whole mini-batch, so lambda, kappa, Z and every loss denominator are mini-batch
quantities and micro-batching never changes the update (1 x 8 == 8 x 1, tested for every correction).

The KL penalty to the initial policy is part of the per-token loss that the correction weights and
masks: its value, k3 = (rho - 1) - log rho with rho = p_init / p_new at the kept tokens, weighted by w,
estimates KL(p_new || p_init) under the correction's target distribution (p_old or p_new); as a loss,
k3's gradient at samples of p_new is that of KL(p_init || p_new) (the usual GRPO / verl low_var_kl term).

Several processes: rows, padding and loss scaling are the distributed seam's (jackpot.train.distributed).
`prep.shard` says which rows of the global batch this rank holds; mini-batches are chunks of one
permutation of the global rows, each rank taking its own (`Shard.local`); `Collective.padded` gives every
rank as many micro-batches as the busiest (a padding micro-batch is a row with its mask zeroed: it runs
the forward and adds nothing); `Collective.backward` scales a rank's loss share for the gradient average.
Every batch quantity — the correction (lambda, kappa, Z's batch mean), the loss denominators, the metrics
— is computed from per-token tensors gathered over the ranks (`Collective.gather_rows`, the identity in
one process), and the uniforms are drawn per global row, so the update is the one a single process would
make, whatever the number of processes (tested against one process).

Both models stay in eval mode (dropout off, as TRL and verl do), so the PPO ratio is exactly 1 at the
first mini-batch; gradients flow regardless.
"""

from __future__ import annotations

import contextlib

import torch

from jackpot import metric_names as names
from jackpot.core.checks import SAFETY_BOUND
from jackpot.core.corrections import CorrectionResult
from jackpot.core.head import JointLogprobs, joint_logprobs
from jackpot.core.joint import distillation_request, rollout_model_loss_from
from jackpot.core.losses import aggregate, loss_denominator, ppo_token_loss
from jackpot.metrics import mean_of
from jackpot.models.forward import unwrap_peft
from jackpot.seeding import MINIBATCH_STREAM, step_seed
from jackpot.train.config import Config
from jackpot.train.distributed import Collective, Shard, gradient_sync, language_model
from jackpot.train.prepare import (
    Prepared,
    batch_correction,
    micro_size,
    model_head,
    needs_of,
    sampled_logp,
    target_logps,
)


@torch.no_grad()
def _current_correction(cfg: Config, coll: Collective, part: Prepared, size: int, pad: Prepared,
                        policy: torch.nn.Module) -> CorrectionResult:
    """The correction of a mini-batch (`part`: this rank's rows of it) under the policy being optimised
    (target='new'): a gradient-free pass of the policy over its micro-batches (padding included: forwards
    are collectives), then `batch_correction` over every rank's rows of the mini-batch."""
    needs, new_logp, raw_z = needs_of(cfg), [], []
    for mb in _micro_batches(coll, part, size, pad):
        head = model_head(policy, mb.batch, cfg.sampling.temperature)
        if not mb.is_padding:
            new, z = target_logps(cfg, needs, head, mb.batch)  # one pass over the head for both
            new_logp.append(new)
            raw_z.append(z)
    empty = part.batch.response_mask.new_zeros(part.batch.response_mask.shape)
    new = torch.cat(new_logp) if new_logp else empty
    z = (torch.cat(raw_z) if new_logp else empty) if needs.z == "topk" else None
    return batch_correction(cfg, needs, coll, part, new, z)



# ----------------------------------------------------------------------------- losses
def policy_loss(cfg: Config, mb: Prepared, new_logp: torch.Tensor, denominator: torch.Tensor
                ) -> tuple[torch.Tensor, dict]:
    """A micro-batch's share of the mini-batch policy loss (denominator: the mini-batch's) and its metric
    (numerator, denominator) pairs; `mb.correction` holds its weights and mask."""
    t, corr, mask = cfg.train, mb.correction, mb.batch.response_mask
    tok, diag = ppo_token_loss(new_logp, mb.old_logp, mb.advantages,
                               clip_eps=t.clip_eps, clip_eps_high=t.clip_eps_high, dual_clip=t.dual_clip)
    if mb.init_logp is not None and t.kl_coef > 0:
        log_rho = (mb.init_logp - new_logp).clamp(-SAFETY_BOUND, SAFETY_BOUND)
        tok = tok + t.kl_coef * (log_rho.exp() - 1 - log_rho)
    loss = aggregate(tok * corr.weights, corr.mask, t.loss_agg, denominator=denominator)
    kept = corr.mask.sum()
    stats = {names.POLICY_LOSS: (loss.detach(), None),
             names.POLICY_CLIPFRAC: ((diag["clipped"] * corr.mask).sum(), kept),
             names.POLICY_CLIPFRAC_LOWER: ((diag["clipped_lower"] * corr.mask).sum(), kept),
             names.POLICY_RATIO_MEAN: ((diag["ratio"].detach() * mask).sum(), mask.sum())}
    return loss, stats


def _rollout_model_loss(cfg: Config, mb: Prepared, logs: JointLogprobs, denominator: torch.Tensor,
                        distill_coef: float) -> tuple[torch.Tensor, dict]:
    """The rollout model's share of the mini-batch loss (jackpot.core.joint: PPO + distillation toward the
    policy, paper eq. 8) from the micro-batch's one pass over both heads (`logs`, whose policy log-probs are the
    teacher's at the sampled tokens)."""
    d, t, batch = cfg.distill, cfg.train, mb.batch
    out = rollout_model_loss_from(logs, batch.response_ids.shape, batch.response_mask, mb.advantages,
                                  mb.rollout_model_old_logp, batch.rollout_logp, ppo=d.ppo, distill_coef=distill_coef,
                                  direction=d.direction, estimator=d.estimator, clip_eps=t.clip_eps,
                                  clip_eps_high=t.clip_eps_high, dual_clip=t.dual_clip, is_cap=d.is_cap,
                                  denominator=denominator)
    return out.loss, {k: (v, None) for k, v in out.metrics().items()}


# ----------------------------------------------------------------------------- update
def _checkpointed(model: torch.nn.Module) -> bool:
    model = unwrap_peft(model)
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(model, flag, False))


@contextlib.contextmanager
def _checkpointing(*models):
    """Hugging Face runs gradient checkpointing only in train mode: switch the models that enabled it to
    train mode for the update (their dropout is 0, see jackpot.train.loop), back to eval mode after."""
    switched = [m for m in models if m is not None and _checkpointed(m)]
    for m in switched:
        m.train()
    try:
        yield
    finally:
        for m in switched:
            m.eval()


def update(cfg: Config, prep: Prepared, *, policy, rollout_model, policy_opt, rollout_opt, step: int,
           coll: Collective | None = None, distill_coef: float | None = None) -> dict:
    """ppo_epochs x minibatches optimizer steps over the prepared batch; returns averaged metrics.
    policy / rollout_model: Hugging Face models, or wrapped by jackpot.train.distributed (several processes);
    the rollout model is trained when `rollout_opt` is given, with the distillation coefficient `distill_coef`
    (None: distill.coef; the loop passes jackpot.train.gap_control's)."""
    trained = rollout_model if rollout_opt is not None else None
    coef = cfg.distill.coef if distill_coef is None else distill_coef
    with _checkpointing(language_model(policy), None if trained is None else language_model(trained)):
        return _update(cfg, prep, policy=policy, rollout_model=trained, policy_opt=policy_opt,
                       rollout_opt=rollout_opt, step=step, coll=coll or Collective(), distill_coef=coef)


def _update(cfg: Config, prep: Prepared, *, policy, rollout_model, policy_opt, rollout_opt, step: int,
            coll: Collective, distill_coef: float) -> dict:
    t = cfg.train
    size, pad = micro_size(cfg, coll.max_int(prep.batch.response_len)), prep.padding()
    records = []  # one dict per mini-batch
    for mini in _minibatches(prep.shard, t.ppo_epochs, t.minibatches, step_seed(t.seed, step, MINIBATCH_STREAM)):
        part = prep.select(mini)  # this rank's rows of the mini-batch, with their part of the batch's correction
        if part.correction is None:  # target='new': the policy being optimised decides it
            part.correction = _current_correction(cfg, coll, part, size, pad, policy)
        denominators = _denominators(cfg, coll, part)
        for opt in (policy_opt, rollout_opt):
            if opt is not None:
                opt.zero_grad(set_to_none=True)
        micros = _micro_batches(coll, part, size, pad)
        stats = [_accumulate(cfg, mb, denominators, coll, policy=policy, rollout_model=rollout_model,
                             distill_coef=distill_coef, sync=j == len(micros) - 1) for j, mb in enumerate(micros)]
        record = {**_combine(stats, coll), **part.correction.stats,
                  names.POLICY_GRAD_NORM: _step(policy, policy_opt, t.grad_clip)}
        if rollout_model is not None:
            record[names.ROLLOUT_MODEL_GRAD_NORM] = _step(rollout_model, rollout_opt, t.grad_clip)
        records.append(record)
    return mean_of(records)


def _accumulate(cfg: Config, mb: Prepared, denominators: tuple[torch.Tensor, torch.Tensor], coll: Collective, *,
                policy, rollout_model, distill_coef: float, sync: bool) -> dict:
    """One micro-batch's forward and backward: its share of the mini-batch's losses (gradients are
    synchronised over ranks at the last micro-batch, `sync`); returns its metric (numerator, denominator)s.
    With the rollout model trained, one pass over both heads (`joint_logprobs`) gives the policy its log-probs
    and the rollout model its log-probs and distillation terms, the teacher's distribution read from the policy's
    own logits; one backward of the sum of both losses then recomputes each head once per chunk."""
    temp, ids = cfg.sampling.temperature, mb.batch.response_ids
    with gradient_sync(policy, sync), _gradient_sync_of(rollout_model, sync):
        head = model_head(policy, mb.batch, temp)
        if rollout_model is None:
            new_logp = sampled_logp(cfg, head, ids)
        else:
            d = cfg.distill
            request = distillation_request(distill_coef > 0, d.direction, d.estimator,
                                           min(cfg.sampling.topk, head.vocab_size))
            logs = joint_logprobs(head, model_head(rollout_model, mb.batch, temp), ids.reshape(-1),
                                  chunk=cfg.train.head_chunk, **request)
            new_logp = logs.policy.reshape(ids.shape)
        loss, stats = policy_loss(cfg, mb, new_logp, denominators[0])
        if rollout_model is not None:
            roll_loss, roll_stats = _rollout_model_loss(cfg, mb, logs, denominators[1], distill_coef)
            loss = loss + roll_loss  # the two models share no parameter: one backward serves both
            stats.update(roll_stats)
        coll.backward(loss)
    return stats


def _gradient_sync_of(model, sync: bool):
    return contextlib.nullcontext() if model is None else gradient_sync(model, sync)


def _minibatches(shard: Shard, epochs: int, minibatches: int, seed: int):
    """Each epoch, one permutation of the global batch's rows in `minibatches` chunks; yields this rank's
    rows of each chunk (local indices, in the permutation's order)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for rows in torch.randperm(shard.total, generator=gen).chunk(minibatches):
            yield shard.local(rows)


def _micro_batches(coll: Collective, part: Prepared, size: int, pad: Prepared) -> list[Prepared]:
    """`part` in micro-batches of `size` rows, padded with `pad` to as many as the busiest rank runs."""
    return coll.padded([part.select(i) for i in torch.arange(len(part.batch)).split(size)], pad)


def _denominators(cfg: Config, coll: Collective, part: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy loss's and the rollout model's (token-mean) denominators over all ranks' rows of a
    mini-batch."""
    keep_all = coll.gather_rows(part.correction.mask)[0]
    resp_all = coll.gather_rows(part.batch.response_mask)[0]
    policy = loss_denominator(keep_all, cfg.train.loss_agg, response_mask=resp_all,
                              norm_len=cfg.sampling.max_new_tokens)
    return policy, loss_denominator(resp_all, "token-mean")


def _combine(micro_stats: list[dict], coll: Collective) -> dict:
    """Mini-batch metrics from micro-batch (numerator, denominator) pairs summed over micro-batches and
    ranks: a loss (each micro-batch's value a share of the mini-batch loss, denominator None) is the sum;
    the rest are ratios of the sums (token fractions over the whole mini-batch, whatever the micro-batching)."""
    keys = list(micro_stats[0])
    sums = torch.stack([torch.stack([sum(stats[k][i].double().cpu() for stats in micro_stats)
                                     if micro_stats[0][k][i] is not None else torch.ones((), dtype=torch.float64)
                                     for i in (0, 1)]) for k in keys])
    sums = coll.sum(sums)
    return {k: (sums[n, 0] if micro_stats[0][k][1] is None else sums[n, 0] / sums[n, 1].clamp_min(1e-12)).float()
            for n, k in enumerate(keys)}


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, grad_clip: float | None) -> torch.Tensor:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else float("inf"))
    opt.step()
    full = getattr(norm, "full_tensor", None)  # FSDP2: the norm over all shards
    return (full() if callable(full) else norm).detach()

