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
size B x T x V is ever held: the rollout model's log-probs at the sampled tokens and every distillation estimator
come from one pass over both heads (`head.joint_logprobs`), the teacher's distribution read from the policy's
logits of that pass. The policy's head is the teacher: no gradient of this loss reaches it. In the trainer the same
pass also gives the policy its own log-probs with gradient (`rollout_model_loss_from`), so a joint update forms
each head's logits once per chunk forward and once backward.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from jackpot import metric_names as names
from jackpot.core import head as vocab
from jackpot.core.checks import SAFETY_BOUND, check_same_shape
from jackpot.core.head import DEFAULT_ROW_CHUNK, Head, JointLogprobs
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


def distillation_request(distill: bool, direction: str, estimator: str, topk: int) -> dict:
    """The keyword arguments of `jackpot.core.head.joint_logprobs` that serve a distillation term: the exact KL
    for estimator "full", the policy's top-k for "topk", nothing for "sampled" (or no distillation)."""
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"direction must be one of {KL_DIRECTIONS}, got {direction!r}")
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    return {"kl": direction if distill and estimator == "full" else None,
            "topk": topk if distill and estimator == "topk" else 0}


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
    topk: int = 20,
    chunk: int = DEFAULT_ROW_CHUNK,
    **terms,
) -> RolloutModelLoss:
    """The rollout model's loss on one (micro-)batch of B responses of T tokens (module docstring).

    student: the rollout model's head over the B * T response positions, with gradient; teacher: the current
        policy's head over the same positions (used detached).
    response_ids (B, T) the sampled tokens; mask (B, T) the response mask; advantages (B,) or (B, T);
    old_logp (B, T) log p_omega_old, the rollout model before this update; rollout_logp (B, T) log p_inf;
    teacher_logp (B, T) log p_new at the sampled tokens (estimator "sampled"; None: read from the teacher's head).
    topk: the policy's top-k for estimator "topk" (at most the vocabulary); chunk: positions per chunk of logits.
    terms: the keyword arguments of `rollout_model_loss_from` — ppo, distill_coef, direction, estimator, is_cap,
        clip_eps, clip_eps_high, dual_clip, denominator — with its defaults.

    The trainer, whose policy forward is at hand with gradient, calls `jackpot.core.head.joint_logprobs` itself
    (one pass over both heads for both models' losses) and `rollout_model_loss_from` on its result.
    """
    check_same_shape(response_ids=response_ids, mask=mask, old_logp=old_logp, rollout_logp=rollout_logp,
                     teacher_logp=teacher_logp)
    if len(student) != response_ids.numel() or len(teacher) != len(student):
        raise ValueError(f"the heads must cover the B x T = {response_ids.numel()} response positions, got "
                         f"{len(student)} (rollout model) and {len(teacher)} (policy)")
    unknown = set(terms) - set(_TERMS)
    if unknown:
        raise TypeError(f"rollout_model_loss got unexpected keyword arguments {sorted(unknown)}")
    given = {**_TERMS, **terms}
    distill, direction, estimator = given["distill_coef"] > 0, given["direction"], given["estimator"]
    ids = response_ids.reshape(-1)
    request = distillation_request(distill, direction, estimator, min(topk, teacher.vocab_size))
    if distill:
        logs = vocab.joint_logprobs(vocab.detached(teacher), student, ids, chunk=chunk, **request)
    else:  # PPO alone: the teacher's head is not needed
        logs = JointLogprobs(None, vocab.logprobs_at(student, ids, chunk=chunk))
    return rollout_model_loss_from(logs, response_ids.shape, mask, advantages, old_logp, rollout_logp,
                                   teacher_logp=teacher_logp, **terms)


def rollout_model_loss_from(
    logs: JointLogprobs,
    shape: torch.Size | tuple[int, int],
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
    clip_eps: float | None = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    is_cap: float = 2.0,
    denominator: torch.Tensor | float | None = None,
) -> RolloutModelLoss:
    """`rollout_model_loss` from the pass over both heads (`jackpot.core.head.joint_logprobs`, asked for what
    `distillation_request` names) at the B x T = `shape` response positions; teacher_logp (B, T) defaults to
    the pass's policy log-probs (detached)."""
    distill = distill_coef > 0
    distillation_request(distill, direction, estimator, 0)  # checks direction and estimator
    missing = {"full": logs.kl is None, "topk": logs.student_at_top is None,
               "sampled": teacher_logp is None and logs.policy is None}[estimator]
    if distill and missing:
        raise ValueError(f"estimator={estimator!r} needs the pass over both heads to carry what "
                         f"distillation_request asks for (kl, topk) or teacher_logp")
    logp = logs.student.reshape(shape)
    total = mask.new_zeros(())
    ppo_loss = distill_kl = None
    if ppo:
        tok, _ = ppo_token_loss(logp, old_logp, advantages, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
                                dual_clip=dual_clip)
        log_is = (old_logp - rollout_logp).clamp(-SAFETY_BOUND, SAFETY_BOUND)
        ppo_loss = aggregate(tok * log_is.exp().clamp_max(is_cap), mask, "token-mean", denominator=denominator)
        total = total + ppo_loss
    if distill:
        if estimator == "full":
            kl = logs.kl.reshape(shape)
        elif estimator == "topk":
            kl = distill_kl_at(logs.student_at_top, direction=direction, estimator="topk",
                               teacher_logp=logs.policy_top).reshape(shape)
        else:
            t_logp = logs.policy.detach().reshape(shape) if teacher_logp is None else teacher_logp
            kl = distill_kl_at(logp, direction=direction, estimator="sampled", teacher_logp=t_logp,
                               rollout_logp=rollout_logp, is_cap=is_cap)
        distill_kl = aggregate(kl, mask, "token-mean", denominator=denominator)
        total = total + distill_coef * distill_kl
    return RolloutModelLoss(total, None if ppo_loss is None else ppo_loss.detach(),
                            None if distill_kl is None else distill_kl.detach())


_TERMS = {name: p.default for name, p in inspect.signature(rollout_model_loss_from).parameters.items()
          if p.kind is p.KEYWORD_ONLY and name != "teacher_logp"}  # what rollout_model_loss passes on, defaults

__all__ = ["RolloutModelLoss", "distillation_request", "rollout_model_loss", "rollout_model_loss_from"]
