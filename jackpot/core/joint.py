"""The rollout model's share of the joint objective (paper eq. 8), from hidden states and output heads.

    L(omega) = PPO(p_omega / p_omega_old, A) * min(p_omega_old / p_inf, is_cap) + distill_coef * KL(SG(p_new), p_omega)

on the same trajectories as the policy's loss (no extra rollouts), per response token, each term a token-mean over
the response mask. The PPO term is the rollout model's own: its ratio to itself before the update, its
importance weight to the distribution that actually sampled (p_inf, recorded by the engine; ~1 up to engine
numerics when the rollout model sampled), the policy's group advantages unweighted by the correction (the
rejection is the policy's, not the rollout model's). The distillation pulls the rollout model toward the current
policy, in the direction and with the estimator chosen (`jackpot.core.losses`, METHOD.md §5):

    estimator "full"     exact KL over the vocabulary, streamed from both heads a chunk of positions at a time
    estimator "topk"     the KL terms on the policy's top-k tokens at each position
    estimator "sampled"  the sampled token only, importance-weighted from p_inf (truncated at is_cap)

Both models enter as `jackpot.core.head.Head`s over the same B x T response positions (row-major), so nothing of
size B x T x V is ever held: the rollout model's log-probs at the sampled tokens and the full KL share one pass over
its logits (`head.logprobs_and_kl`). The policy's head is the teacher: detached, no gradient reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from jackpot import metric_names as names
from jackpot.core import head as vocab
from jackpot.core.checks import SAFETY_BOUND, check_same_shape
from jackpot.core.head import DEFAULT_ROW_CHUNK, Head
from jackpot.core.losses import KL_DIRECTIONS, KL_ESTIMATORS, aggregate, distill_kl_at, ppo_token_loss


@dataclass(frozen=True)
class RolloutModelLoss:
    """loss: () with gradient to the rollout model; ppo_loss, distill_kl: its two terms, detached (distill_kl
    before distill_coef), None for a term that is off."""

    loss: torch.Tensor
    ppo_loss: torch.Tensor | None = None
    distill_kl: torch.Tensor | None = None

    def metrics(self) -> dict[str, torch.Tensor]:
        """The terms under the trainer's metric names (`rollout_model/...`), the ones that are on."""
        named = {names.ROLLOUT_MODEL_PPO_LOSS: self.ppo_loss, names.ROLLOUT_MODEL_DISTILL_KL: self.distill_kl}
        return {k: v for k, v in named.items() if v is not None}


def rollout_model_loss(
    student: Head,
    teacher: Head,
    response_ids: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    *,
    teacher_logp: torch.Tensor | None = None,
    ppo: bool = True,
    distill_coef: float = 1.0,
    direction: str = "forward",
    estimator: str = "full",
    topk: int = 20,
    clip_eps: float | None = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    is_cap: float = 2.0,
    denominator: torch.Tensor | float | None = None,
    chunk: int = DEFAULT_ROW_CHUNK,
) -> RolloutModelLoss:
    """The rollout model's loss on one (micro-)batch of B responses of T tokens (module docstring).

    student: the rollout model's head over the B * T response positions, with gradient; teacher: the current
        policy's head over the same positions (used detached).
    response_ids (B, T) the sampled tokens; mask (B, T) the response mask; advantages (B,) or (B, T);
    old_logp (B, T) log p_omega_old, the rollout model before this update; rollout_logp (B, T) log p_inf;
    teacher_logp (B, T) log p_new at the sampled tokens: needed by estimator "sampled" only.
    ppo / distill_coef: the terms (distill_coef 0 leaves distillation out); direction, estimator, topk (the
    policy's top-k for estimator "topk", at most the vocabulary), is_cap (the IS truncation of both the PPO
    weight and the sampled estimator): as in the module docstring. clip_eps, clip_eps_high, dual_clip: PPO's.
    denominator: both terms' token-mean denominator (pass the mini-batch's when accumulating micro-batches;
        None: this batch's response tokens). chunk: positions per chunk of logits.
    """
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"direction must be one of {KL_DIRECTIONS}, got {direction!r}")
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    check_same_shape(response_ids=response_ids, mask=mask, old_logp=old_logp, rollout_logp=rollout_logp,
                     teacher_logp=teacher_logp)
    if len(student) != response_ids.numel() or len(teacher) != len(student):
        raise ValueError(f"the heads must cover the B x T = {response_ids.numel()} response positions, got "
                         f"{len(student)} (rollout model) and {len(teacher)} (policy)")
    distill = distill_coef > 0
    if distill and estimator == "sampled" and teacher_logp is None:
        raise ValueError("estimator='sampled' needs teacher_logp (the policy's log-probs at the sampled tokens)")
    shape, ids, reverse = response_ids.shape, response_ids.reshape(-1), direction == "reverse"
    logp = kl = None
    if ppo and distill and estimator == "full":  # one pass over the rollout model's logits for both terms
        logp, kl = vocab.logprobs_and_kl(student, teacher, ids, reverse=reverse, chunk=chunk)
        logp, kl = logp.reshape(shape), kl.reshape(shape)
    elif ppo or (distill and estimator == "sampled"):
        logp = vocab.logprobs_at(student, ids, chunk=chunk).reshape(shape)
    total = mask.new_zeros(())
    ppo_loss = distill_kl = None
    if ppo:
        tok, _ = ppo_token_loss(logp, old_logp, advantages, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
                                dual_clip=dual_clip)
        log_is = (old_logp - rollout_logp).clamp(-SAFETY_BOUND, SAFETY_BOUND)
        ppo_loss = aggregate(tok * log_is.exp().clamp_max(is_cap), mask, "token-mean", denominator=denominator)
        total = total + ppo_loss
    if distill:
        if kl is None:
            kl = distillation_kl(student, teacher, shape, direction=direction, estimator=estimator, topk=topk,
                                 student_logp=logp if estimator == "sampled" else None, teacher_logp=teacher_logp,
                                 rollout_logp=rollout_logp, is_cap=is_cap, chunk=chunk)
        distill_kl = aggregate(kl, mask, "token-mean", denominator=denominator)
        total = total + distill_coef * distill_kl
    return RolloutModelLoss(total, None if ppo_loss is None else ppo_loss.detach(),
                            None if distill_kl is None else distill_kl.detach())


def distillation_kl(student: Head, teacher: Head, shape: torch.Size | tuple[int, int], *, direction: str = "forward",
                    estimator: str = "full", topk: int = 20, student_logp: torch.Tensor | None = None,
                    teacher_logp: torch.Tensor | None = None, rollout_logp: torch.Tensor | None = None,
                    is_cap: float = 2.0, chunk: int = DEFAULT_ROW_CHUNK) -> torch.Tensor:
    """Per-position distillation KL (B, T) = `shape` of the student (rollout model) toward the teacher (policy),
    with gradient to the student only. Estimator "sampled" takes the student's and the teacher's log-probs at the
    sampled tokens and rollout_logp (log p_inf), each (B, T); the others read the heads alone."""
    if estimator == "full":
        return vocab.kl_from_hidden(student, teacher, reverse=direction == "reverse", chunk=chunk).reshape(shape)
    if estimator == "topk":
        t_logp, t_ids = vocab.topk(teacher, min(topk, teacher.vocab_size), chunk=chunk)
        s_logp = vocab.logprobs_at(student, t_ids, chunk=chunk)
        return distill_kl_at(s_logp, direction=direction, estimator="topk", teacher_logp=t_logp).reshape(shape)
    if student_logp is None or teacher_logp is None or rollout_logp is None:
        raise ValueError("estimator='sampled' needs student_logp, teacher_logp and rollout_logp")
    return distill_kl_at(student_logp, direction=direction, estimator="sampled", teacher_logp=teacher_logp,
                         rollout_logp=rollout_logp, is_cap=is_cap)


__all__ = ["RolloutModelLoss", "distillation_kl", "rollout_model_loss"]
