"""The update phase: from a scored rollout batch to optimizer steps of the policy and the rollout model.

    prepare()  once per rollout batch, no gradients: advantages, p_old (policy at collection) and
               p_omega_old (rollout model) at the sampled tokens, one uniform per token, mismatch
               diagnostics and — for a correction that does not depend on the current policy — the
               correction (weights, mask) of the whole batch.
    update()   ppo_epochs x minibatches optimizer steps; in each micro-batch one forward of the policy
               (and, when trained jointly, of the rollout model):
                 policy:        keep * w * (PPO(p_new / p_old, A) + kl_coef * k3(p_init / p_new))
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
estimates KL(p_new || p_init) under the correction's target distribution (p_old or p_new); as a loss,
k3's gradient at samples of p_new is that of KL(p_init || p_new) (the usual GRPO / verl low_var_kl term).

Several processes (jackpot.train.distributed): each rank holds a block of the global batch's rows.
Every batch quantity — the correction (lambda, kappa, Z's batch mean), the loss denominators, the
metrics — is computed from per-token tensors gathered over the ranks (`Collective.gather_rows`, the
identity in one process), the uniforms are drawn per global row, and mini-batches are chunks of one
permutation of the global rows, each rank taking the rows it holds; so the update is the one a single
process would make, whatever the number of processes (tested against one process).

Both models stay in eval mode (dropout off, as TRL and verl do), so the PPO ratio is exactly 1 at the
first mini-batch; gradients flow regardless.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from jackpot.core import head as vocab
from jackpot.core import obrs
from jackpot.core.advantages import group_advantages
from jackpot.core.checks import SAFETY_BOUND
from jackpot.core.corrections import CorrectionInputs, CorrectionResult, Needs, apply_correction, correction_needs
from jackpot.core.divergences import kl_estimators, mismatch_metrics
from jackpot.core.head import Head
from jackpot.core.losses import aggregate, distill_kl_at, loss_denominator, ppo_token_loss
from jackpot.metrics import mean_of
from jackpot.models.forward import output_head, response_hidden
from jackpot.rollout.base import RolloutBatch
from jackpot.train.config import Config
from jackpot.train.distributed import Collective, gradient_sync, language_model


@dataclass
class Prepared:
    """A rollout batch with everything the update needs, all (B, T) unless noted."""

    batch: RolloutBatch
    advantages: torch.Tensor          # (B,)
    old_logp: torch.Tensor            # log p_old(x_t): the policy at collection
    rollout_model_old_logp: torch.Tensor    # log p_omega_old(x_t): the rollout model before its update
    init_logp: torch.Tensor | None    # log p_init(x_t): the initial policy (kl_coef > 0)
    uniforms: torch.Tensor | None     # one U(0,1) per token, when the correction needs them
    correction: CorrectionResult | None  # the whole batch's weights and mask; None: per mini-batch
    metrics: dict[str, torch.Tensor]
    first_row: int = 0                # global index of this rank's first row
    global_rows: int | None = None    # rows of the global batch (None: this batch is all of it)


def step_seed(seed: int, step: int, stream: int) -> int:
    """A deterministic seed per (run seed, step, purpose) — identical across processes, for exact resume."""
    return (seed * 1_000_003 + step) * 16 + stream


def row_uniforms(seed: int, step: int, stream: int, global_rows: int, width: int, rows: range) -> torch.Tensor:
    """U(0, 1) (len(rows), width) for the global rows `rows` of a batch of `global_rows`: one table per
    (seed, step, stream), so a row's draws do not depend on how the batch is split over processes."""
    gen = torch.Generator().manual_seed(step_seed(seed, step, stream))
    return torch.rand(global_rows, width, generator=gen)[rows.start:rows.stop]


def needs_of(cfg: Config) -> Needs:
    return correction_needs(cfg.correction.name, **cfg.correction.kwargs())


def _forward(model: torch.nn.Module, batch: RolloutBatch, temperature: float) -> Head:
    """The model's last hidden states at the B x T response positions (flattened) and its output head.
    `model`: a Hugging Face causal LM, or one wrapped by jackpot.train.distributed (DDP / FSDP2)."""
    lm = language_model(model)
    if lm is model:
        hidden = response_hidden(model, batch.input_ids, batch.attention_mask, batch.response_len)
    else:  # through the wrapper's forward, where DDP's and FSDP2's hooks run
        hidden = model(batch.input_ids, batch.attention_mask, batch.response_len)
    weight, bias = output_head(lm)
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
    return obrs.topk_normalizer(mb.topk_ids, mb.topk_logp, tgt_at_topk, needs.z_lam)


def _correction(cfg: Config, needs: Needs, coll: Collective, rollout_logp: torch.Tensor, mask: torch.Tensor,
                old_logp: torch.Tensor, new_logp: torch.Tensor | None, raw_z: torch.Tensor | None,
                uniforms: torch.Tensor | None) -> CorrectionResult:
    """The correction of the rows given on every rank, computed over all ranks' rows (gathered), returned
    for this rank's rows; top-k Z is scaled by kappa = mean acceptance / mean Z_approx over all of those
    tokens (METHOD.md §4.1). Statistics are those of all ranks' rows."""
    rows, width = mask.shape
    g, first = {}, 0
    for name, t, fill in (("rollout", rollout_logp, 0.0), ("mask", mask, 0.0), ("old", old_logp, 0.0),
                          ("new", new_logp, 0.0), ("z", raw_z, 1.0), ("u", uniforms, 0.0)):
        g[name], first = coll.gather_rows(t, fill) if t is not None else (None, first)
    z, z_stats = g["z"], {}
    if needs.z == "topk":
        tgt_logp = g["new"] if needs.current_policy else g["old"]
        a = obrs.acceptance_prob(tgt_logp, g["rollout"], needs.z_lam)
        k = obrs.kappa(a, g["z"], g["mask"])
        m = g["mask"]
        z, z_stats = k * g["z"], {"obrs/kappa": k, "obrs/topk_z_mean": (g["z"] * m).sum() / m.sum().clamp_min(1)}
    result = apply_correction(cfg.correction.name, CorrectionInputs(
        rollout_logp=g["rollout"], old_logp=g["old"], mask=g["mask"], new_logp=g["new"],
        uniforms=g["u"], z=z), **cfg.correction.kwargs())
    result.stats.update(z_stats)
    if coll.world == 1:
        return result
    return CorrectionResult(result.weights[first:first + rows, :width], result.mask[first:first + rows, :width],
                            result.stats)


# ----------------------------------------------------------------------------- prepare
@torch.no_grad()
def prepare(cfg: Config, batch: RolloutBatch, rewards: torch.Tensor, *, policy, rollout_model, init_policy,
            step: int, coll: Collective | None = None, first_row: int = 0,
            global_rows: int | None = None) -> Prepared:
    """rewards (N, G) with batch rows ordered prompt-major. rollout_model None means on-policy.

    Several processes: `batch` is this rank's rows `first_row ... first_row + len(batch) - 1` of a global
    batch of `global_rows` (whole groups), `coll` the process group's seam."""
    coll = coll or Collective()
    global_rows = len(batch) if global_rows is None else global_rows
    temp, needs = cfg.sampling.temperature, needs_of(cfg)
    advantages = group_advantages(rewards, mode=cfg.train.advantages).reshape(-1)
    parts: dict[str, list] = {"old": [], "rollout_old": [], "init": [], "z": []}
    # the same micro-batch size on every rank (the longest response of all): equal numbers of forwards
    for idx in _chunks(len(batch), _micro_size(cfg, coll.max_int(batch.response_len))):
        mb = batch.select(idx)
        old_head = _forward(policy, mb, temp)
        roll_head = old_head if rollout_model is None else _forward(rollout_model, mb, temp)
        if needs.z == "exact" and not needs.current_policy:  # one pass over both heads' logits
            old, rollout_old, z = vocab.logprobs_and_normalizer(old_head, roll_head, mb.response_ids.reshape(-1),
                                                                needs.z_lam, chunk=cfg.train.head_chunk)
            for key, value in (("old", old), ("rollout_old", rollout_old), ("z", z)):
                parts[key].append(value.reshape(mb.response_ids.shape))
        else:
            parts["old"].append(_logp(cfg, old_head, mb.response_ids))
            parts["rollout_old"].append(parts["old"][-1] if roll_head is old_head else
                                        _logp(cfg, roll_head, mb.response_ids))
            if not needs.current_policy:
                parts["z"].append(_raw_z(cfg, needs, old_head, mb))
        if init_policy is not None:
            parts["init"].append(_logp(cfg, _forward(init_policy, mb, temp), mb.response_ids))
    cat = {k: torch.cat(v) if v and v[0] is not None else None for k, v in parts.items()}
    uniforms = None
    if needs.uniforms:
        rows = range(first_row, first_row + len(batch))
        uniforms = row_uniforms(cfg.train.seed, step, 1, global_rows, cfg.sampling.max_new_tokens, rows)
        uniforms = uniforms[:, :batch.response_len].to(batch.response_mask.device)
    correction = None
    if not needs.current_policy:  # fixed for the whole batch: computed once, sliced per mini-batch
        correction = _correction(cfg, needs, coll, batch.rollout_logp, batch.response_mask, cat["old"], None,
                                 cat["z"], uniforms)
    rollout_logp, mask, ref, old = (coll.gather_rows(t)[0] for t in (batch.rollout_logp, batch.response_mask,
                                                                      cat["old"], cat["rollout_old"]))
    metrics = {f"mismatch/{k}": v for k, v in mismatch_metrics(ref, rollout_logp, mask).items()}
    metrics.update(correction.stats if correction is not None else {})
    metrics.update({f"mismatch/rollout_model_{k}": v
                    for k, v in kl_estimators(old, rollout_logp, mask).items() if k == "kl_k3"})
    return Prepared(batch, advantages, cat["old"], cat["rollout_old"], cat["init"], uniforms, correction, metrics,
                    first_row, global_rows)


# ----------------------------------------------------------------------------- losses
def _policy_loss(cfg: Config, prep: Prepared, idx: torch.Tensor, new_logp: torch.Tensor,
                 corr: CorrectionResult, denominator: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The micro-batch `idx`'s share of the mini-batch policy loss (denominator: the mini-batch's)."""
    t = cfg.train
    mask = prep.batch.response_mask[idx]
    tok, diag = ppo_token_loss(new_logp, prep.old_logp[idx], prep.advantages[idx],
                               clip_eps=t.clip_eps, clip_eps_high=t.clip_eps_high, dual_clip=t.dual_clip)
    if prep.init_logp is not None and t.kl_coef > 0:
        log_rho = (prep.init_logp[idx] - new_logp).clamp(-SAFETY_BOUND, SAFETY_BOUND)
        tok = tok + t.kl_coef * (log_rho.exp() - 1 - log_rho)
    loss = aggregate(tok * corr.weights, corr.mask, t.loss_agg, denominator=denominator)
    kept = corr.mask.sum()
    stats = {"policy/loss": (loss.detach(), None), "policy/clipfrac": ((diag["clipped"] * corr.mask).sum(), kept),
             "policy/clipfrac_lower": ((diag["clipped_lower"] * corr.mask).sum(), kept),
             "policy/ratio_mean": ((diag["ratio"].detach() * mask).sum(), mask.sum())}
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
        tok, _ = ppo_token_loss(logp, prep.rollout_model_old_logp[idx], prep.advantages[idx],
                                clip_eps=t.clip_eps, clip_eps_high=t.clip_eps_high, dual_clip=t.dual_clip)
        log_is = (prep.rollout_model_old_logp[idx] - mb.rollout_logp).clamp(-SAFETY_BOUND, SAFETY_BOUND)
        ppo = aggregate(tok * log_is.exp().clamp_max(d.is_cap), mask, "token-mean", denominator=denominator)
        total = total + ppo
        stats["rollout_model/ppo_loss"] = (ppo.detach(), None)
    if d.coef > 0:
        kl = kl if kl is not None else _distill(cfg, roll, teacher, teacher_logp, logp, mb)
        distill = aggregate(kl, mask, "token-mean", denominator=denominator)
        total = total + d.coef * distill
        stats["rollout_model/distill_kl"] = (distill.detach(), None)
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
                         rollout_logp=mb.rollout_logp, is_cap=d.is_cap)


# ----------------------------------------------------------------------------- update
@torch.no_grad()
def _current_correction(cfg: Config, needs: Needs, coll: Collective, prep: Prepared, mini: torch.Tensor,
                        heads: list[Head], logps: list[torch.Tensor] | None = None) -> CorrectionResult:
    """The correction of mini-batch `mini` (this rank's rows of it) from the current policy's heads, given in
    micro-batch order (and its log-probs at the sampled tokens, when already computed); computed over all
    ranks' rows of the mini-batch."""
    batch = prep.batch.select(mini)
    new_logp, raw_z, start = [], [], 0
    for j, head in enumerate(heads):
        n = len(head) // batch.response_len
        part = batch.select(torch.arange(start, start + n))
        new_logp.append(logps[j] if logps is not None else _logp(cfg, head, part.response_ids))
        raw_z.append(_raw_z(cfg, needs, head, part))
        start += n
    empty = batch.response_mask.new_zeros(batch.response_mask.shape)
    new = torch.cat(new_logp) if new_logp else empty
    z = (torch.cat(raw_z) if heads else empty) if needs.z == "topk" else None
    uniforms = prep.uniforms[mini] if prep.uniforms is not None else None
    return _correction(cfg, needs, coll, batch.rollout_logp, batch.response_mask, prep.old_logp[mini], new, z, uniforms)


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


def update(cfg: Config, prep: Prepared, *, policy, rollout_model, policy_opt, rollout_opt, step: int,
           coll: Collective | None = None) -> dict:
    """ppo_epochs x minibatches optimizer steps over the prepared batch; returns averaged metrics.
    policy / rollout_model: Hugging Face models, or wrapped by jackpot.train.distributed (several processes)."""
    with _checkpointing(language_model(policy), language_model(rollout_model) if rollout_opt is not None else None):
        return _update(cfg, prep, policy=policy, rollout_model=rollout_model, policy_opt=policy_opt,
                       rollout_opt=rollout_opt, step=step, coll=coll or Collective())


def _update(cfg: Config, prep: Prepared, *, policy, rollout_model, policy_opt, rollout_opt, step: int,
            coll: Collective) -> dict:
    t, temp, needs = cfg.train, cfg.sampling.temperature, needs_of(cfg)
    joint = rollout_model is not None and rollout_opt is not None
    gen = torch.Generator().manual_seed(step_seed(t.seed, step, 2))
    n_global = prep.global_rows or len(prep.batch)
    size = _micro_size(cfg, coll.max_int(prep.batch.response_len))
    records = []  # one dict per mini-batch
    for _ in range(t.ppo_epochs):
        order = torch.randperm(n_global, generator=gen)
        for global_mini in order.chunk(t.minibatches):
            # this rank's rows of the mini-batch, in the permutation's order
            mine = (global_mini >= prep.first_row) & (global_mini < prep.first_row + len(prep.batch))
            mini = global_mini[mine] - prep.first_row
            micros = list(mini.split(size))
            # every rank runs as many micro-batches as the busiest one; the extra ones carry zero weight
            micros += [None] * (coll.max_int(len(micros)) - len(micros))
            corr = prep.correction.select(mini) if prep.correction is not None else None
            if corr is None and (len(micros) > 1 or coll.world > 1):  # current policy: a gradient-free pass
                with torch.no_grad():
                    heads = [_forward(policy, prep.batch.select(_or_first(i)), temp) for i in micros]
                    corr = _current_correction(cfg, needs, coll, prep, mini,
                                               [h for h, i in zip(heads, micros) if i is not None])
            policy_opt.zero_grad(set_to_none=True)
            if joint:
                rollout_opt.zero_grad(set_to_none=True)
            micro_stats, start = [], 0
            for j, idx in enumerate(micros):
                real = idx is not None
                mb = prep.batch.select(_or_first(idx))
                last = j == len(micros) - 1
                with gradient_sync(policy, last):
                    new_head = _forward(policy, mb, temp)
                    new_logp = _logp(cfg, new_head, mb.response_ids)
                    if corr is None:  # current policy, one process, one micro-batch: the pass itself serves it
                        corr = _current_correction(cfg, needs, coll, prep, mini, [_detached(new_head)],
                                                   [new_logp.detach()])
                    if j == 0:
                        denom_pol, denom_resp = _denominators(cfg, coll, corr.mask, prep.batch.response_mask[mini])
                    part = corr.select(torch.arange(start, start + len(idx))) if real else \
                        CorrectionResult(torch.zeros_like(new_logp), torch.zeros_like(new_logp))
                    start += len(idx) if real else 0
                    loss, stats = _policy_loss(cfg, prep, _or_first(idx), new_logp, part, denom_pol)
                    if joint:  # before the policy's backward, which reshards an FSDP2 policy's head (the teacher)
                        with gradient_sync(rollout_model, last):
                            roll_loss, roll_stats = _rollout_model_loss(
                                cfg, prep, _or_first(idx), _forward(rollout_model, mb, temp), _detached(new_head),
                                new_logp.detach(), denom_resp)
                            (roll_loss * (coll.world if real else 0.0)).backward()
                        stats.update(roll_stats)
                    (loss * coll.world).backward()  # DDP / FSDP2 average over ranks; the loss is a share
                micro_stats.append(stats if real else _zeroed(stats))
            record = _combine(micro_stats, coll)
            record.update(corr.stats)
            record["policy/grad_norm"] = _step(policy, policy_opt, t.grad_clip)
            if joint:
                record["rollout_model/grad_norm"] = _step(rollout_model, rollout_opt, t.grad_clip)
            records.append(record)
    return mean_of(records)


def _zeroed(stats: dict) -> dict:
    """A padding micro-batch's statistics: present (every rank sums the same keys), contributing nothing."""
    return {k: (n * 0, None if d is None else d * 0) for k, (n, d) in stats.items()}


def _or_first(idx: torch.Tensor | None) -> torch.Tensor:
    """A micro-batch's rows; row 0 for a padding micro-batch (which enters the loss with weight 0)."""
    return idx if idx is not None else torch.zeros(1, dtype=torch.long)


def _denominators(cfg: Config, coll: Collective, keep: torch.Tensor, response_mask: torch.Tensor):
    """The policy loss's and the rollout model's (token-mean) denominators over all ranks' rows of a
    mini-batch."""
    keep_all, resp_all = coll.gather_rows(keep)[0], coll.gather_rows(response_mask)[0]
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
