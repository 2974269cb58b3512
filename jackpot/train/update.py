"""The update phase: from a scored rollout batch to optimizer steps of the policy and the rollout model.

    prepare()  once per rollout batch, no gradients: advantages, p_ref (policy at collection) and
               p_omega_old (rollout model) at the sampled tokens, one uniform per token, mismatch
               diagnostics and — for a correction that does not depend on the current policy — the
               correction (weights, mask) of the whole batch.
    update()   ppo_epochs x minibatches optimizer steps; in each micro-batch one forward of the policy
               (and, when trained jointly, of the rollout model):
                 policy:        keep * w * (PPO(p_new / p_ref, A) + kl_coef * k3(p_init / p_new))
                 rollout model: PPO(p_omega / p_omega_old, A) * min(p_omega_old / p_inf, cap)
                                + coef * KL(SG(p_new) || p_omega)         (paper eq. 8)
               The correction (weights w, mask keep) comes from the CORRECTIONS table.

What a correction needs is declared by its table entry (`jackpot.core.corrections.Needs`) and served
here without knowing its name: a per-state Z (exact from both models' logits, or top-k scaled by kappa
over the batch the correction covers), uniforms, and the current policy. A correction that needs the
current policy (Jackpot with target='new') is recomputed at every mini-batch over the whole mini-batch
— from the forward pass itself when the mini-batch is one micro-batch, else from a gradient-free pass
over its micro-batches first — so lambda, kappa, Z and every loss denominator are mini-batch
quantities and micro-batching never changes the update (1 x 8 == 8 x 1, tested for every correction).

The KL penalty to the initial policy is part of the per-token loss that the correction weights and
masks: its value, k3 = (rho - 1) - log rho with rho = p_init / p_new at the kept tokens, weighted by w,
estimates KL(p_new || p_init) under the correction's target distribution (p_ref or p_new); as a loss,
k3's gradient at samples of p_new is that of KL(p_init || p_new) (the usual GRPO / verl low_var_kl term).

Both models stay in eval mode (dropout off, as TRL and verl do), so the PPO ratio is exactly 1 at the
first mini-batch; gradients flow regardless.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from jackpot.core import head as vocab
from jackpot.core import obrs
from jackpot.core._checks import SAFETY_BOUND
from jackpot.core.advantages import group_advantages
from jackpot.core.corrections import CorrectionInputs, CorrectionResult, Needs, apply_correction, correction_needs
from jackpot.core.divergences import kl_estimators, mismatch_metrics
from jackpot.core.head import Head
from jackpot.core.losses import aggregate, distill_kl_at, loss_denominator, ppo_token_loss
from jackpot.metrics import mean_of
from jackpot.models.forward import output_head, response_hidden
from jackpot.rollout.base import RolloutBatch
from jackpot.train.config import Config


@dataclass
class Prepared:
    """A rollout batch with everything the update needs, all (B, T) unless noted."""

    batch: RolloutBatch
    advantages: torch.Tensor          # (B,)
    ref_logp: torch.Tensor            # log p_ref(x_t): the policy at collection
    rollout_old_logp: torch.Tensor    # log p_omega_old(x_t): the rollout model before its update
    init_logp: torch.Tensor | None    # log p_init(x_t): the initial policy (kl_coef > 0)
    uniforms: torch.Tensor | None     # one U(0,1) per token, when the correction needs them
    correction: CorrectionResult | None  # the whole batch's weights and mask; None: per mini-batch
    metrics: dict[str, torch.Tensor]


def step_seed(seed: int, step: int, stream: int) -> int:
    """A deterministic seed per (run seed, step, purpose) — identical across processes, for exact resume."""
    return (seed * 1_000_003 + step) * 16 + stream


def needs_of(cfg: Config) -> Needs:
    return correction_needs(cfg.correction.name, **cfg.correction.kwargs())


def _forward(model: torch.nn.Module, batch: RolloutBatch, temperature: float) -> Head:
    """The model's last hidden states at the B x T response positions (flattened) and its output head."""
    hidden = response_hidden(model, batch.input_ids, batch.attention_mask, batch.response_len)
    weight, bias = output_head(model)
    return Head(hidden.reshape(-1, hidden.shape[-1]), weight, bias, temperature)


def _detached(head: Head) -> Head:
    return Head(head.hidden.detach(), head.weight.detach(), None if head.bias is None else head.bias.detach(),
                head.temperature)


def _logp(cfg: Config, head: Head, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids) (B, T) from a head over the B x T positions, in chunks of train.head_chunk positions."""
    return vocab.logprobs_at(head, ids.reshape(-1), chunk=cfg.train.head_chunk).reshape(ids.shape)


def _micro_size(cfg: Config, response_len: int) -> int:
    """Sequences per forward/backward: train.micro_batch_size, else what fits in train.micro_batch_tokens."""
    t = cfg.train
    return t.micro_batch_size or max(1, t.micro_batch_tokens // max(response_len, 1))


def _chunks(n: int, size: int) -> list[torch.Tensor]:
    return list(torch.arange(n).split(size))


# ----------------------------------------------------------------------------- serving a correction's needs
@torch.no_grad()
def _raw_z(cfg: Config, needs: Needs, tgt: Head, mb: RolloutBatch) -> torch.Tensor | None:
    """Per-state top-k Z_t before the batch correction kappa (applied in `_correction`); None when the
    correction needs no top-k Z. Exact Z comes from the fused pass in `prepare` (with target='new' it is
    refused by the config: the pre-update rollout model is not at hand)."""
    if needs.z != "topk":
        return None
    shape = mb.response_ids.shape
    k = mb.topk_ids.shape[-1]
    tgt_at_topk = vocab.logprobs_at(tgt, mb.topk_ids.reshape(-1, k), chunk=cfg.train.head_chunk).reshape(*shape, k)
    return obrs.topk_normalizer(mb.topk_ids, mb.topk_logprobs, tgt_at_topk, needs.z_lam)


def _correction(cfg: Config, needs: Needs, batch: RolloutBatch, ref_logp: torch.Tensor,
                new_logp: torch.Tensor | None, raw_z: torch.Tensor | None,
                uniforms: torch.Tensor | None) -> CorrectionResult:
    """The correction over all of `batch`; top-k Z is scaled by kappa = mean acceptance / mean Z_approx
    over the same tokens (METHOD.md §4.1)."""
    z, z_stats = raw_z, {}
    if needs.z == "topk":
        tgt_logp = new_logp if needs.current_policy else ref_logp
        a = obrs.acceptance_prob(tgt_logp, batch.logprobs, needs.z_lam)
        k = obrs.kappa(a, raw_z, batch.response_mask)
        m = batch.response_mask
        z, z_stats = k * raw_z, {"obrs/kappa": k, "obrs/topk_z_mean": (raw_z * m).sum() / m.sum().clamp_min(1)}
    result = apply_correction(cfg.correction.name, CorrectionInputs(
        rollout_logp=batch.logprobs, ref_logp=ref_logp, mask=batch.response_mask, new_logp=new_logp,
        uniforms=uniforms, z=z), **cfg.correction.kwargs())
    result.stats.update(z_stats)
    return result


# ----------------------------------------------------------------------------- prepare
@torch.no_grad()
def prepare(cfg: Config, batch: RolloutBatch, rewards: torch.Tensor, *, policy, rollout_model, init_policy,
            step: int) -> Prepared:
    """rewards (N, G) with batch rows ordered prompt-major. rollout_model None means on-policy."""
    temp, needs = cfg.sampling.temperature, needs_of(cfg)
    advantages = group_advantages(rewards, mode=cfg.train.advantages).reshape(-1)
    parts: dict[str, list] = {"ref": [], "old": [], "init": [], "z": []}
    for idx in _chunks(len(batch), _micro_size(cfg, batch.response_len)):
        mb = batch.select(idx)
        ref_head = _forward(policy, mb, temp)
        roll_head = ref_head if rollout_model is None else _forward(rollout_model, mb, temp)
        if needs.z == "exact" and not needs.current_policy:  # one pass over both heads' logits
            ref, old, z = vocab.logprobs_and_normalizer(ref_head, roll_head, mb.response_ids.reshape(-1),
                                                        needs.z_lam, chunk=cfg.train.head_chunk)
            for key, value in (("ref", ref), ("old", old), ("z", z)):
                parts[key].append(value.reshape(mb.response_ids.shape))
        else:
            parts["ref"].append(_logp(cfg, ref_head, mb.response_ids))
            parts["old"].append(parts["ref"][-1] if roll_head is ref_head else _logp(cfg, roll_head, mb.response_ids))
            if not needs.current_policy:
                parts["z"].append(_raw_z(cfg, needs, ref_head, mb))
        if init_policy is not None:
            parts["init"].append(_logp(cfg, _forward(init_policy, mb, temp), mb.response_ids))
    cat = {k: torch.cat(v) if v and v[0] is not None else None for k, v in parts.items()}
    uniforms = None
    if needs.uniforms:
        gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, step, 1))
        uniforms = torch.rand(batch.response_mask.shape, generator=gen).to(batch.response_mask.device)
    correction = None
    if not needs.current_policy:  # fixed for the whole batch: computed once, sliced per mini-batch
        correction = _correction(cfg, needs, batch, cat["ref"], None, cat["z"], uniforms)
    mask = batch.response_mask
    metrics = {f"mismatch/{k}": v for k, v in mismatch_metrics(cat["ref"], batch.logprobs, mask).items()}
    metrics.update(correction.stats if correction is not None else {})
    metrics.update({f"mismatch/rollout_model_{k}": v
                    for k, v in kl_estimators(cat["old"], batch.logprobs, mask).items() if k == "kl_k3"})
    return Prepared(batch, advantages, cat["ref"], cat["old"], cat["init"], uniforms, correction, metrics)


# ----------------------------------------------------------------------------- losses
def _policy_loss(cfg: Config, prep: Prepared, idx: torch.Tensor, new_logp: torch.Tensor,
                 corr: CorrectionResult, denominator: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The micro-batch `idx`'s share of the mini-batch policy loss (denominator: the mini-batch's)."""
    t = cfg.train
    mask = prep.batch.response_mask[idx]
    tok, diag = ppo_token_loss(new_logp, prep.ref_logp[idx], prep.advantages[idx],
                               clip_eps=t.clip_eps, clip_eps_high=t.clip_eps_high, dual_clip=t.dual_clip)
    if prep.init_logp is not None and t.kl_coef > 0:
        log_rho = (prep.init_logp[idx] - new_logp).clamp(-SAFETY_BOUND, SAFETY_BOUND)
        tok = tok + t.kl_coef * (log_rho.exp() - 1 - log_rho)
    loss = aggregate(tok * corr.weights, corr.mask, t.loss_agg, denominator=denominator)
    kept = corr.mask.sum().clamp_min(1)
    stats = {"policy/loss": loss.detach(), "policy/clipfrac": (diag["clipped"] * corr.mask).sum() / kept,
             "policy/clipfrac_lower": (diag["clipped_lower"] * corr.mask).sum() / kept,
             "policy/ratio_mean": (diag["ratio"] * mask).sum() / mask.sum().clamp_min(1)}
    return loss, stats


def _rollout_model_loss(cfg: Config, prep: Prepared, idx: torch.Tensor, roll: Head, teacher: Head,
                        teacher_logp: torch.Tensor, denominator: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """teacher: the current policy's head (detached); teacher_logp (B, T): its log-probs at the sampled tokens."""
    d, t = cfg.distill, cfg.train
    mb = prep.batch.select(idx)
    mask = mb.response_mask
    stats = {}
    total = mask.new_zeros(())
    kl = None
    if d.ppo and d.coef > 0 and d.estimator == "full":  # one pass over the rollout model's head for both terms
        logp, kl = vocab.logprobs_and_kl(roll, teacher, mb.response_ids.reshape(-1), reverse=d.direction == "reverse",
                                         chunk=t.head_chunk)
        logp, kl = logp.reshape(mask.shape), kl.reshape(mask.shape)
    else:
        logp = _logp(cfg, roll, mb.response_ids) if d.ppo or d.estimator == "sampled" else None
    if d.ppo:
        tok, _ = ppo_token_loss(logp, prep.rollout_old_logp[idx], prep.advantages[idx],
                                clip_eps=t.clip_eps, clip_eps_high=t.clip_eps_high, dual_clip=t.dual_clip)
        log_is = (prep.rollout_old_logp[idx] - mb.logprobs).clamp(-SAFETY_BOUND, SAFETY_BOUND)
        ppo = aggregate(tok * log_is.exp().clamp_max(d.is_cap), mask, "token-mean", denominator=denominator)
        total = total + ppo
        stats["rollout_model/ppo_loss"] = ppo.detach()
    if d.coef > 0:
        kl = kl if kl is not None else _distill(cfg, roll, teacher, teacher_logp, logp, mb)
        distill = aggregate(kl, mask, "token-mean", denominator=denominator)
        total = total + d.coef * distill
        stats["rollout_model/distill_kl"] = distill.detach()
    return total, stats


def _distill(cfg: Config, roll: Head, teacher: Head, teacher_logp: torch.Tensor, roll_logp: torch.Tensor | None,
             mb: RolloutBatch) -> torch.Tensor:
    """Per-position distillation KL (B, T) toward the policy, by the configured direction and estimator."""
    d, chunk, shape = cfg.distill, cfg.train.head_chunk, mb.response_ids.shape
    if d.estimator == "full":
        return vocab.kl_from_hidden(roll, teacher, reverse=d.direction == "reverse", chunk=chunk).reshape(shape)
    if d.estimator == "topk":
        t_logp, t_ids = vocab.topk(teacher, min(cfg.sampling.topk, teacher.vocab_size), chunk=chunk)
        s_logp = vocab.logprobs_at(roll, t_ids, chunk=chunk)
        return distill_kl_at(s_logp, direction=d.direction, estimator="topk", teacher_logp=t_logp).reshape(shape)
    return distill_kl_at(roll_logp, direction=d.direction, estimator="sampled", teacher_logp=teacher_logp,
                         behaviour_logp=mb.logprobs, is_cap=d.is_cap)


# ----------------------------------------------------------------------------- update
@torch.no_grad()
def _current_correction(cfg: Config, needs: Needs, prep: Prepared, mini: torch.Tensor, heads: list[Head],
                        logps: list[torch.Tensor] | None = None) -> CorrectionResult:
    """The correction of mini-batch `mini` from the current policy's heads, given in micro-batch order
    (and its log-probs at the sampled tokens, when already computed)."""
    batch = prep.batch.select(mini)
    new_logp, raw_z, start = [], [], 0
    for j, head in enumerate(heads):
        n = len(head) // batch.response_len
        part = batch.select(torch.arange(start, start + n))
        new_logp.append(logps[j] if logps is not None else _logp(cfg, head, part.response_ids))
        raw_z.append(_raw_z(cfg, needs, head, part))
        start += n
    z = torch.cat(raw_z) if raw_z[0] is not None else None
    uniforms = prep.uniforms[mini] if prep.uniforms is not None else None
    return _correction(cfg, needs, batch, prep.ref_logp[mini], torch.cat(new_logp), z, uniforms)


def _checkpointed(model: torch.nn.Module) -> bool:
    model = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model  # peft
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


def update(cfg: Config, prep: Prepared, *, policy, rollout_model, policy_opt, rollout_opt, step: int) -> dict:
    """ppo_epochs x minibatches optimizer steps over the prepared batch; returns averaged metrics."""
    with _checkpointing(policy, rollout_model if rollout_opt is not None else None):
        return _update(cfg, prep, policy=policy, rollout_model=rollout_model, policy_opt=policy_opt,
                       rollout_opt=rollout_opt, step=step)


def _update(cfg: Config, prep: Prepared, *, policy, rollout_model, policy_opt, rollout_opt, step: int) -> dict:
    t, temp, needs = cfg.train, cfg.sampling.temperature, needs_of(cfg)
    joint = rollout_model is not None and rollout_opt is not None
    gen = torch.Generator().manual_seed(step_seed(t.seed, step, 2))
    records = []  # one dict per mini-batch
    for _ in range(t.ppo_epochs):
        order = torch.randperm(len(prep.batch), generator=gen)
        for mini in order.chunk(t.minibatches):
            micros = list(mini.split(_micro_size(cfg, prep.batch.response_len)))
            corr = prep.correction.select(mini) if prep.correction is not None else None
            if corr is None and len(micros) > 1:  # current policy, several micro-batches: a gradient-free pass
                with torch.no_grad():
                    corr = _current_correction(cfg, needs, prep, mini,
                                               [_forward(policy, prep.batch.select(i), temp) for i in micros])
            policy_opt.zero_grad(set_to_none=True)
            if joint:
                rollout_opt.zero_grad(set_to_none=True)
            micro_stats, start = [], 0
            for idx in micros:
                mb = prep.batch.select(idx)
                new_head = _forward(policy, mb, temp)
                new_logp = _logp(cfg, new_head, mb.response_ids)
                if corr is None:  # current policy, one micro-batch: the forward pass itself serves it
                    corr = _current_correction(cfg, needs, prep, mini, [_detached(new_head)], [new_logp.detach()])
                if start == 0:
                    denom_pol = loss_denominator(corr.mask, t.loss_agg, response_mask=prep.batch.response_mask[mini],
                                                 norm_len=cfg.sampling.max_new_tokens)
                    denom_resp = loss_denominator(prep.batch.response_mask[mini], "token-mean")
                part = corr.select(torch.arange(start, start + len(idx)))
                start += len(idx)
                loss, stats = _policy_loss(cfg, prep, idx, new_logp, part, denom_pol)
                loss.backward()
                if joint:
                    roll_loss, roll_stats = _rollout_model_loss(cfg, prep, idx, _forward(rollout_model, mb, temp),
                                                                _detached(new_head), new_logp.detach(), denom_resp)
                    roll_loss.backward()
                    stats.update(roll_stats)
                micro_stats.append((len(idx), stats))
            record = _combine(micro_stats)
            record.update(corr.stats)
            record["policy/grad_norm"] = _step(policy, policy_opt, t.grad_clip)
            if joint:
                record["rollout_model/grad_norm"] = _step(rollout_model, rollout_opt, t.grad_clip)
            records.append(record)
    return mean_of(records)


# Losses whose per-micro-batch values are shares of the mini-batch loss: logged as their sum.
_ADDITIVE = ("policy/loss", "rollout_model/ppo_loss", "rollout_model/distill_kl")


def _combine(micro_stats: list[tuple[int, dict]]) -> dict:
    """Mini-batch metrics from micro-batch ones: losses (each a share of the mini-batch loss) add up,
    the rest are averaged weighted by sequences."""
    n = sum(size for size, _ in micro_stats)
    out = {}
    for key in micro_stats[0][1]:
        values = torch.stack([s[key] for _, s in micro_stats])
        if key in _ADDITIVE:
            out[key] = values.sum()
        else:
            out[key] = (values * torch.tensor([size / n for size, _ in micro_stats], dtype=values.dtype)).sum()
    return out


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, grad_clip: float | None) -> torch.Tensor:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else float("inf"))
    opt.step()
    return norm.detach()
