"""The prepare phase: once per rollout batch, no gradients, everything the update needs.

At the sampled tokens: p_old (the policy at collection; the paper's p_ref), p_omega_old (the rollout
model before its update) and p_init (the initial policy, kl_coef > 0), computed at the sampling
temperature (the distribution the engine sampled from); group advantages; one uniform per token drawn
per global row; the mismatch diagnostics; and — for a correction that does not depend on the policy
being optimised — its weights and mask over the whole batch (`batch_correction`).

What a correction needs is declared by its table entry (`jackpot.core.corrections.Needs`) and served
here without knowing its name: a per-state Z (exact from both models' logits in one fused pass, or top-k
scaled by kappa over the batch the correction covers) and uniforms. Several processes: every batch
quantity is computed from per-token tensors gathered over the ranks (`Collective.gather_rows`, the
identity in one process), so it is the one a single process would compute.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from jackpot import metric_names as names
from jackpot.core import head as vocab
from jackpot.core import obrs
from jackpot.core.advantages import group_advantages
from jackpot.core.corrections import CorrectionInputs, CorrectionResult, Needs, apply_correction, correction_needs
from jackpot.core.divergences import clipped_kl_k3, kl_estimators, mismatch_metrics
from jackpot.core.head import Head
from jackpot.errors import InputError
from jackpot.models.forward import output_head, response_head
from jackpot.rollout.base import RolloutBatch
from jackpot.seeding import REJECTION_STREAM, row_uniforms
from jackpot.train.config import Config
from jackpot.train.distributed import Collective, Shard, language_model


@dataclass
class Prepared:
    """A rollout batch (this rank's rows of it) with everything the update needs, all (B, T) unless noted."""

    batch: RolloutBatch
    advantages: torch.Tensor                # (B,)
    old_logp: torch.Tensor                  # log p_old(x_t): the policy at collection (the paper's p_ref)
    rollout_model_old_logp: torch.Tensor    # log p_omega_old(x_t): the rollout model before its update
    init_logp: torch.Tensor | None          # log p_init(x_t): the initial policy (kl_coef > 0)
    uniforms: torch.Tensor | None           # one U(0,1) per token, when the correction needs them
    correction: CorrectionResult | None     # weights and mask; None: the policy being optimised decides them
    metrics: dict[str, torch.Tensor]
    shard: Shard                            # which rows of the global batch these are
    is_padding: bool = False                # a micro-batch that only keeps the ranks in step (see `padding`)

    def select(self, idx: torch.Tensor) -> Prepared:
        """The rows `idx` (local indices) of every per-row tensor."""
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Prepared(self.batch.select(idx), self.advantages[idx], self.old_logp[idx],
                        self.rollout_model_old_logp[idx], pick(self.init_logp), pick(self.uniforms),
                        None if self.correction is None else self.correction.select(idx), {}, self.shard)

    def padding(self) -> Prepared:
        """Row 0 with its response mask and correction zeroed: a micro-batch whose forward runs (a sharded
        model's forward is a collective) and adds nothing to any loss, gradient or metric."""
        row = self.select(torch.zeros(1, dtype=torch.long))
        zeros = torch.zeros_like(row.batch.response_mask)
        row.batch = replace(row.batch, response_mask=zeros)
        row.correction, row.is_padding = CorrectionResult(zeros, zeros), True
        return row


def needs_of(cfg: Config) -> Needs:
    return correction_needs(cfg.correction.name, **cfg.correction.kwargs())


def model_head(model: torch.nn.Module, batch: RolloutBatch, temperature: float) -> Head:
    """The model's last hidden states at the B x T response positions (flattened) and its output head.
    `model`: a Hugging Face causal LM, or one wrapped by jackpot.train.distributed (DDP / FSDP2)."""
    lm = language_model(model)
    if lm is model:
        return response_head(model, batch.input_ids, batch.attention_mask, batch.response_len, temperature)
    # through the wrapper's forward, where DDP's and FSDP2's hooks run
    hidden = model(batch.input_ids, batch.attention_mask, batch.response_len)
    weight, bias = output_head(lm)
    return Head(hidden.reshape(-1, hidden.shape[-1]), weight, bias, temperature)


def sampled_logp(cfg: Config, head: Head, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids) (B, T) from a head over the B x T positions, in chunks of train.head_chunk positions."""
    return vocab.logprobs_at(head, ids.reshape(-1), chunk=cfg.train.head_chunk).reshape(ids.shape)


def micro_size(cfg: Config, response_len: int) -> int:
    """Sequences per forward/backward: train.micro_batch_size, else what fits in train.micro_batch_tokens."""
    t = cfg.train
    return t.micro_batch_size or max(1, t.micro_batch_tokens // max(response_len, 1))


# ----------------------------------------------------------------------------- serving a correction's needs
@torch.no_grad()
def target_logps(cfg: Config, needs: Needs, tgt: Head, mb: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The target's (policy's) log-probs at the sampled tokens (B, T) and, when the correction needs top-k Z, its
    per-state top-k Z_t (B, T) from its log-probs at the engine's recorded top-K ids — both from one pass over the
    target's head (the sampled id and the K ids gathered from the same chunk of logits). Z_t is before the batch
    correction kappa (applied in `batch_correction`); exact Z comes from the fused pass in `prepare` (with
    target='new' it is refused by the config: the pre-update rollout model is not at hand)."""
    ids = mb.response_ids
    if needs.z != "topk":
        return sampled_logp(cfg, tgt, ids), None
    k = mb.topk_ids.shape[-1]
    at = torch.cat([ids.reshape(-1, 1), mb.topk_ids.reshape(-1, k)], dim=-1)
    both = vocab.logprobs_at(tgt, at, chunk=cfg.train.head_chunk)
    z = obrs.topk_normalizer(mb.topk_ids, mb.topk_logp, both[:, 1:].reshape(*ids.shape, k), needs.z_lam)
    return both[:, 0].reshape(ids.shape), z


def batch_correction(cfg: Config, needs: Needs, coll: Collective, part: Prepared, new_logp: torch.Tensor | None,
                raw_z: torch.Tensor | None) -> CorrectionResult:
    """The correction of `part` (this rank's rows of a batch or mini-batch), computed over every rank's rows
    of it (gathered), returned for this rank's rows; top-k Z is scaled by kappa = mean acceptance / mean
    Z_approx over all of those tokens (METHOD.md §4.1). Statistics are those of all ranks' rows."""
    rows, width = part.batch.response_mask.shape
    g, first = {}, 0
    for name, t, fill in (("rollout", part.batch.rollout_logp, 0.0), ("mask", part.batch.response_mask, 0.0),
                          ("old", part.old_logp, 0.0), ("new", new_logp, 0.0), ("z", raw_z, 1.0),
                          ("u", part.uniforms, 0.0)):
        g[name], first = coll.gather_rows(t, fill) if t is not None else (None, first)
    z, z_stats = g["z"], {}
    if needs.z == "topk":
        tgt_logp = g["new"] if needs.current_policy else g["old"]
        a = obrs.acceptance_prob(tgt_logp, g["rollout"], needs.z_lam)
        k = obrs.kappa(a, g["z"], g["mask"])
        m = g["mask"]
        z = k * g["z"]
        z_stats = {names.OBRS_KAPPA: k, names.OBRS_TOPK_Z_MEAN: (g["z"] * m).sum() / m.sum().clamp_min(1)}
    result = apply_correction(cfg.correction.name, CorrectionInputs(
        rollout_logp=g["rollout"], old_logp=g["old"], mask=g["mask"], new_logp=g["new"],
        uniforms=g["u"], z=z), **cfg.correction.kwargs())
    result.stats.update(z_stats)
    if coll.world == 1:
        return result
    return CorrectionResult(result.weights[first:first + rows, :width], result.mask[first:first + rows, :width],
                            result.stats)


# ----------------------------------------------------------------------------- the recorded log-probs
EXACT_DTYPES = (torch.float32, torch.float64)  # where an engine's log-probs and a forward agree to numerics


def recorded_logprobs_serve(cfg: Config, engine, model: torch.nn.Module, batch: RolloutBatch, step: int) -> bool:
    """Whether `batch.rollout_logp`, recorded by `engine` while sampling from `model` (the sampling model, as the
    trainer holds it), serves as that model's log-probs before this step's update (train.recompute_old):
    'always' never; 'auto' exactly when they are the trainer's own — the engine declares exact processed
    log-probs (`exact_logprobs`), the batch was sampled synchronously (async_steps 0, one mini-batch) by this
    step's weights, both sides in float32/float64, no nucleus, no mixed precision; 'never' always. Check steps
    (step 1 and every train.recompute_check_every after) recompute whatever the setting."""
    t = cfg.train
    if t.recompute_old == "always" or (step - 1) % t.recompute_check_every == 0:
        return False
    if not getattr(engine, "exact_logprobs", False):
        if t.recompute_old == "never":
            raise InputError(f"train.recompute_old=never: the {type(engine).__name__} records no exact processed "
                             "log-probs of the sampling model; use train.recompute_old=auto or always")
        return False
    if t.recompute_old == "never":
        return True
    trainer = next(model.parameters()).dtype
    sampler = engine.dtype if engine.holds_weights else trainer
    return (cfg.rollout.async_steps == 0 and t.minibatches == 1 and cfg.sampling.top_p == 1
            and cfg.parallel.mixed_precision is None and sampler == trainer and trainer in EXACT_DTYPES
            and batch.model_version == step)


# ----------------------------------------------------------------------------- prepare
@torch.no_grad()
def prepare(cfg: Config, batch: RolloutBatch, rewards: torch.Tensor, *, policy, rollout_model, init_policy,
            step: int, coll: Collective | None = None, shard: Shard | None = None,
            recorded_old: bool = False) -> Prepared:
    """rewards (N, G) with batch rows ordered prompt-major. rollout_model None means on-policy.

    recorded_old: the engine's recorded log-probs (`batch.rollout_logp`) serve as the sampling model's log-probs
    before the update — p_omega_old (decoupled) or p_old (on-policy) — instead of a forward of that model
    (`recorded_logprobs_serve` says when they are its own); its forward then runs only where the correction
    needs its logits anyway (exact Z), and `mismatch/rollout_model_kl_k3` is not logged (nothing was measured).

    Several processes: `batch` holds the rows `shard` of the global batch (whole groups), `coll` is the
    process group's seam. Default: one process, the batch is all of it."""
    coll = coll or Collective()
    shard = shard or Shard(range(len(batch)), len(batch))
    needs = needs_of(cfg)
    advantages = group_advantages(rewards, mode=cfg.train.advantages).reshape(-1)
    old, rollout_old, init, raw_z = _score(cfg, needs, batch, coll, policy=policy, rollout_model=rollout_model,
                                           init_policy=init_policy, recorded_old=recorded_old)
    uniforms = None
    if needs.uniforms:
        uniforms = row_uniforms(cfg.train.seed, step, REJECTION_STREAM, shard.total, cfg.sampling.max_new_tokens,
                                shard.rows)
        uniforms = uniforms[:, :batch.response_len].to(batch.response_mask.device)
    prep = Prepared(batch, advantages, old, rollout_old, init, uniforms, None, {}, shard)
    if not needs.current_policy:  # fixed for the whole batch: computed once, sliced per mini-batch
        prep.correction = batch_correction(cfg, needs, coll, prep, None, raw_z)
    rollout_logp, mask, old, rollout_old = (coll.gather_rows(t)[0] for t in (
        batch.rollout_logp, batch.response_mask, old, rollout_old))
    measured = not recorded_old or (needs.z == "exact" and not needs.current_policy)  # a forward ran
    if rollout_model is not None or measured:  # on-policy with p_old = p_inf there is no mismatch to report
        prep.metrics = {names.MISMATCH + k: v for k, v in mismatch_metrics(old, rollout_logp, mask).items()}
    if rollout_model is not None:  # the gap controller's robust signal (distill.signal, jackpot.train.gap_control)
        prep.metrics[names.MISMATCH_KL_K3_CLIPPED] = clipped_kl_k3(old, rollout_logp, mask, cap=cfg.distill.signal_cap)
    prep.metrics.update(prep.correction.stats if prep.correction is not None else {})
    prep.metrics[names.PERF_RECORDED_OLD] = torch.tensor(float(not measured))
    if measured:
        prep.metrics[names.MISMATCH_ROLLOUT_MODEL_KL_K3] = kl_estimators(rollout_old, rollout_logp, mask)[names.KL_K3]
    return prep


def _score(cfg: Config, needs: Needs, batch: RolloutBatch, coll: Collective, *, policy, rollout_model,
           init_policy, recorded_old: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """At the sampled tokens, in micro-batches: log p_old, log p_omega_old (the rollout model; p_old
    on-policy), log p_init (kl_coef > 0), and the per-state Z a fixed-target correction needs. With
    `recorded_old` the sampling model's log-probs are the engine's (`prepare`): its forward runs only for exact Z,
    and on-policy the policy's forward only for a Z."""
    temp = cfg.sampling.temperature
    fixed_z = needs.z if not needs.current_policy else None
    parts: dict[str, list] = {"old": [], "rollout_old": [], "init": [], "z": []}
    # the same micro-batch size on every rank (the longest response of all): equal numbers of forwards
    for idx in torch.arange(len(batch)).split(micro_size(cfg, coll.max_int(batch.response_len))):
        mb = batch.select(idx)
        on_policy_recorded = rollout_model is None and recorded_old
        per_state = fixed_z in ("exact", "topk")  # a Z that reads the target's (policy's) logits
        old_head = None if on_policy_recorded and not per_state else model_head(policy, mb, temp)
        if fixed_z == "exact":  # one pass over both heads' logits
            roll_head = old_head if rollout_model is None else model_head(rollout_model, mb, temp)
            old, rollout_old, z = vocab.logprobs_and_normalizer(old_head, roll_head, mb.response_ids.reshape(-1),
                                                                needs.z_lam, chunk=cfg.train.head_chunk)
            for key, value in (("old", old), ("rollout_old", rollout_old), ("z", z)):
                parts[key].append(value.reshape(mb.response_ids.shape))
        else:
            old, z = (None, None) if old_head is None else target_logps(cfg, needs, old_head, mb)
            parts["old"].append(mb.rollout_logp if on_policy_recorded else old)
            if rollout_model is None or recorded_old:
                parts["rollout_old"].append(parts["old"][-1] if rollout_model is None else mb.rollout_logp)
            else:
                parts["rollout_old"].append(sampled_logp(cfg, model_head(rollout_model, mb, temp), mb.response_ids))
            if per_state:
                parts["z"].append(z)
        if init_policy is not None:
            parts["init"].append(sampled_logp(cfg, model_head(init_policy, mb, temp), mb.response_ids))
    cat = {k: torch.cat(v) if v and v[0] is not None else None for k, v in parts.items()}
    return cat["old"], cat["rollout_old"], cat["init"], cat["z"]
