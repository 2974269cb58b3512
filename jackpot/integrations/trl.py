"""Jackpot (OBRS) inside TRL: a `GRPOTrainer` subclass, and a `rollout_func` for a separate rollout model.

`JackpotGRPOTrainer` corrects the mismatch between the distribution that sampled the completions
(TRL's `sampling_per_token_logps`: vLLM's log-probs, or those a `rollout_func` returns) and the policy
at collection time (`old_per_token_logps`, computed here when TRL skipped it). Once per generation
batch, before TRL splits it into steps, it calls `jackpot.core.corrections.batch_jackpot` (Jackpot
with target="old" and z="batch": lam fixed with the batch's mean acceptance as Z, or lam solved for a
target acceptance `obrs_budget`, METHOD.md §4.2): one uniform per token, Mask = 1[u < min(1, r/lam)],
weight min(Z * max(lam, r), c1)). It hands them to TRL's unchanged `_compute_loss` through two inputs
that method already consumes:

- the weight multiplies the advantages, which become (B, T) (TRL: "To support subclasses that provide
  advantages with shape (B, T)"). Every TRL loss type is linear in A at fixed ratio, and w > 0, so
  -min(r * wA, clip(r) * wA) = w * -min(rA, clip(r)A): the per-token loss is exactly w * PPO_clip;
  the KL term (beta) is not weighted;
- the mask multiplies `tool_mask` (TRL's "tokens the model produced" mask, which `rollout_func` sets
  as `env_mask`), so a rejected token leaves both the sum and the denominator of every loss type, as
  Jackpot's "token-mean over accepted tokens"; `num_items_in_batch` (dapo/cispo) is recounted.

TRL's own IS correction (`vllm_importance_sampling_correction`) must be off: both would weight twice.

`hf_rollout_func(rollout_model)` is the decoupled mode: a separate (smaller) Hugging Face model
generates every completion through `jackpot.rollout.hf.HFRolloutEngine` and returns the log-probs of
the distribution it sampled from (after temperature / top-p), which become `sampling_per_token_logps`.
`vllm_rollout_func(rollout_model)` is the same served by vLLM: one engine for the run, given the rollout
model's current weights before every generation batch (so joint training, below, reaches it too).

Joint training (paper eq. 8), optional: given `rollout_model` and `rollout_optimizer`, every training
micro-batch also updates the rollout model on the same trajectories with the trainer's loss,
`jackpot.core.joint.rollout_model_loss`: L(omega) = L_PPO(omega) + rollout_distill_coef * KL(SG(p_new) || p_omega)
(forward KL over the full vocabulary, streamed from both models' hidden states and heads a chunk of positions
at a time — no B x T x V logits; its PPO with the unweighted advantages and p_omega_old = the sampling
log-probs), one rollout-optimizer step per micro-batch, logged as `rollout_model/ppo_loss` and
`rollout_model/distill_kl` (the trainer's names).

What TRL's API does not let this do (docs/integrations/trl.md): a per-state Z (needs top-k of both
models per position; vLLM through TRL returns the sampled token's only) and target="new" (the
weights are fixed per generation batch, before the policy moves).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.data_utils import is_conversational

from jackpot import metric_names as names
from jackpot.core.corrections import CorrectionResult, batch_jackpot
from jackpot.core.divergences import mismatch_metrics
from jackpot.core.head import logprobs_at
from jackpot.core.joint import rollout_model_loss
from jackpot.models.forward import response_head
from jackpot.models.tokenizer import check_same_tokenizer
from jackpot.rollout import engine_spec, make_engine
from jackpot.rollout.weights import push_weights


@dataclass
class JackpotGRPOConfig(GRPOConfig):
    """`GRPOConfig` plus the Jackpot settings (all `obrs_*`); TRL's IS correction is off by default."""

    obrs_lambda: float = field(default=1.0, metadata={"help": "Jackpot: fixed lambda (used when obrs_budget is None)."})
    obrs_budget: float | None = field(default=None, metadata={
        "help": "Jackpot: target mean acceptance in (0, 1]; lambda is then solved per generation batch."})
    obrs_c1: float | None = field(default=2.0, metadata={
        "help": "Jackpot: clip of the OBRS weight Z * max(lambda, r) (TIS on top of OBRS, Algorithm 1); None: none."})
    obrs_sampled_mask: bool = field(default=True, metadata={
        "help": "Jackpot: Mask ~ Bernoulli(a) once per batch (paper); False: keep each token with the fraction a."})
    vllm_importance_sampling_correction: bool = field(default=False, metadata={
        "help": "TRL's own IS correction; must stay False with Jackpot, which replaces it."})
    rollout_distill_coef: float = field(default=1.0, metadata={
        "help": "Joint training: weight of KL(SG(p_new) || p_rollout) in the rollout model's loss (eq. 8)."})
    rollout_ppo: bool = field(default=True, metadata={
        "help": "Joint training: include the rollout model's own PPO loss on the same trajectories (eq. 8)."})


def jackpot_trl_correction(
    old_logps: torch.Tensor,
    sampling_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    lam: float = 1.0,
    budget: float | None = None,
    c1: float | None = 2.0,
    sampled_mask: bool = True,
    uniforms: torch.Tensor | None = None,
) -> CorrectionResult:
    """The Jackpot correction of one generation batch from TRL's tensors.

    old_logps (B, T): log p_old (the policy when the batch was generated); sampling_logps (B, T): the
    log-probs of the distribution that sampled (NaN where the engine could not score a token: those get
    ratio 1); mask (B, T): tokens that can enter the loss; uniforms (B, T): drawn from torch's default
    generator when None. Returns jackpot.core's `CorrectionResult` (weights, mask, obrs/* stats).
    """
    sampling = torch.where(torch.isnan(sampling_logps), old_logps, sampling_logps)
    return batch_jackpot(old_logps, sampling, mask, lam=lam, budget=budget, c1=c1, sampled_mask=sampled_mask,
                         uniforms=uniforms)


class JackpotGRPOTrainer(GRPOTrainer):
    """`GRPOTrainer` whose policy loss is Jackpot-corrected (module docstring). Takes a `JackpotGRPOConfig`.

    The sampling log-probs must exist: run with `use_vllm=True`, or pass a `rollout_func` (e.g.
    `hf_rollout_func(rollout_model)` or `vllm_rollout_func(rollout_model)` for the decoupled mode). Text
    prompts only (no images).
    `rollout_model` alone is shorthand for `rollout_func=hf_rollout_func(rollout_model)`; with
    `rollout_optimizer` (over its parameters) it is also trained jointly (module docstring).
    """

    def __init__(self, *args: Any, rollout_model: Any = None, rollout_optimizer: Any = None, **kwargs: Any):
        if rollout_optimizer is not None and rollout_model is None:
            raise ValueError("rollout_optimizer needs rollout_model (the model it updates)")
        if rollout_model is not None and kwargs.get("rollout_func") is None:
            kwargs["rollout_func"] = hf_rollout_func(rollout_model)
        super().__init__(*args, **kwargs)
        self.rollout_model, self.rollout_optimizer = rollout_model, rollout_optimizer
        if not isinstance(self.args, JackpotGRPOConfig):
            raise ValueError(f"JackpotGRPOTrainer needs args=JackpotGRPOConfig(...), got {type(self.args).__name__}")
        if self.args.vllm_importance_sampling_correction:
            raise ValueError("vllm_importance_sampling_correction=True would apply TRL's IS weights on top of "
                             "Jackpot's; set it to False (JackpotGRPOConfig's default)")
        if not (self.use_vllm or self.rollout_func is not None):
            raise ValueError("JackpotGRPOTrainer needs the sampling distribution's log-probs: use_vllm=True, or a "
                             "rollout_func that returns them (e.g. jackpot.integrations.trl.hf_rollout_func)")
        if self.args.obrs_budget is not None and not 0.0 < self.args.obrs_budget <= 1.0:
            raise ValueError(f"obrs_budget must be in (0, 1], got {self.args.obrs_budget}")
        if rollout_optimizer is not None and not (self.args.rollout_ppo or self.args.rollout_distill_coef > 0):
            raise ValueError("rollout_optimizer is given but the rollout model has no loss: set rollout_ppo=True or "
                             "rollout_distill_coef > 0")

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        out = super()._generate_and_score_completions(inputs)
        sampling = out.get("sampling_per_token_logps")
        if sampling is None:
            raise ValueError("no sampling_per_token_logps in this batch: the generation backend returned no "
                             "log-probs (a rollout_func must return 'logprobs')")
        completion_mask = out["completion_mask"]
        tool_mask = out.get("tool_mask")
        mask = completion_mask if tool_mask is None else completion_mask * tool_mask
        old = out.get("old_per_token_logps")
        if old is None:
            old = self._old_logps(out)
            out["old_per_token_logps"] = old
        args = self.args
        result = jackpot_trl_correction(old, sampling, mask, lam=args.obrs_lambda, budget=args.obrs_budget,
                                        c1=args.obrs_c1, sampled_mask=args.obrs_sampled_mask)
        advantages = out["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        out["advantages"] = advantages * result.weights.to(advantages.dtype)
        keep = result.mask.to(torch.float32)
        out["tool_mask"] = keep if tool_mask is None else tool_mask.to(torch.float32) * keep
        out["num_items_in_batch"] = self.accelerator.gather((completion_mask * out["tool_mask"]).sum()).sum()
        out["obrs_weights"], out["obrs_mask"] = result.weights, keep
        out["rollout_advantages"], out["rollout_mask"] = advantages, mask.float()
        self._log_obrs(result, old, sampling, mask)
        return out

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        if self.rollout_optimizer is not None and self.model.training:
            self._update_rollout_model(model, inputs)
        return loss

    def _update_rollout_model(self, model, inputs: dict[str, Any]) -> None:
        """One optimizer step of the rollout model on this micro-batch: PPO(omega) + coef * KL(SG(p_new)||p_omega)
        (`jackpot.core.joint.rollout_model_loss`, from both models' heads)."""
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        completion = inputs["completion_ids"]
        mask = inputs["rollout_mask"]  # every model-produced token: the rejection is the policy's, not omega's
        with torch.no_grad():
            teacher = response_head(self.accelerator.unwrap_model(model), ids, att, completion.size(1),
                                    self.temperature)
        self.rollout_model.train()
        student = response_head(self.rollout_model, ids, att, completion.size(1), self.temperature)
        # p_omega_old = the sampling log-probs; a token the engine could not score (NaN) gets p_omega's (ratio 1)
        sampling = inputs["sampling_per_token_logps"]
        if torch.isnan(sampling).any():
            with torch.no_grad():
                current = logprobs_at(student, completion.reshape(-1)).reshape(completion.shape)
            sampling = torch.where(torch.isnan(sampling), current, sampling)
        out = rollout_model_loss(student, teacher, completion, mask, inputs["rollout_advantages"].expand_as(mask),
                                 sampling, sampling, ppo=self.args.rollout_ppo,
                                 distill_coef=self.args.rollout_distill_coef, clip_eps=self.epsilon_low,
                                 clip_eps_high=self.epsilon_high)
        self.rollout_optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.rollout_optimizer.step()
        self.rollout_model.eval()
        for name, value in out.metrics().items():
            self._metrics["train"][name].append(value.item())

    @torch.no_grad()
    def _old_logps(self, out: dict[str, Any]) -> torch.Tensor:
        """log p_old of the completions under the policy as it is now (before this batch's update)."""
        input_ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        attention_mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        mode = "train" if self.model.training else "eval"
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        logps, _, _ = self._get_per_token_logps_and_entropies(self.model, input_ids, attention_mask,
                                                              out["completion_ids"].size(1), batch_size=batch_size)
        return logps

    def _log_obrs(self, result: CorrectionResult, old: torch.Tensor, sampling: torch.Tensor,
                  mask: torch.Tensor) -> None:
        mode = "train" if self.model.training else "eval"
        sampling = torch.where(torch.isnan(sampling), old, sampling)
        stats = dict(result.stats)
        mismatch = mismatch_metrics(old.float(), sampling.float(), mask.float())
        stats.update({names.MISMATCH + k: mismatch[k] for k in (names.KL_K1, names.KL_K3, names.CHI2_TOKEN, names.ESS,
                                                                  names.LOG_PPL_DIFF)})
        for name, value in stats.items():
            value = self.accelerator.gather(value.detach().float().reshape(1)).mean().item()
            self._metrics[mode][name].append(value)


def hf_rollout_func(rollout_model: Any, tokenizer: Any = None, *, topk: int = 1):
    """A TRL `rollout_func`: `rollout_model` (a Hugging Face causal LM) samples one completion per prompt
    with transformers' `generate` (`jackpot.rollout.hf.HFRolloutEngine`, sampling from the module itself).

    Sampling uses the trainer's temperature, top_p and max_completion_length, so the returned log-probs
    are those of the distribution sampled from, on the temperature the policy's log-probs use.
    `tokenizer` (default: the trainer's) must be identical to the trainer's. Prompts are tokenized as
    TRL's own generation path does (`_rollout_prompt_ids`). Settings this sampler cannot honour raise a
    ValueError: top_k, min_p, repetition_penalty != 1 and a non-empty generation_kwargs.
    """
    return _rollout_func("hf", rollout_model, tokenizer, topk=topk)


def vllm_rollout_func(rollout_model: Any, tokenizer: Any = None, *, topk: int = 1, **engine_options: Any):
    """`hf_rollout_func`'s contract served by vLLM (`jackpot.rollout.vllm.VLLMRolloutEngine`, in this process).

    The engine is built at the first call and kept in the returned function; before every call it is given
    `rollout_model`'s current weights (`jackpot.rollout.weights.push_weights`: LoRA merged, FSDP2 gathered, in
    the engine's dtype), so a rollout model trained jointly (`JackpotGRPOTrainer(rollout_optimizer=...)`) or
    changed in any other way samples with the weights it has at that call. `engine_options`: the engine's
    options (the `rollout.*` ones of `jackpot train`: dtype, max_model_len, kv_cache_gib,
    gpu_memory_utilization, enforce_eager). Keep the returned function alive for the whole process: dropping an
    in-process vLLM engine while another lives breaks the other. Needs vLLM (README: "The vLLM engine").
    """
    return _rollout_func("vllm", rollout_model, tokenizer, topk=topk, **engine_options)


def _rollout_func(engine_name: str, rollout_model: Any, tokenizer: Any, *, topk: int, **engine_options: Any):
    """A TRL `rollout_func` over the rollout engine registered as `engine_name` (`jackpot.rollout.ENGINE_SPECS`;
    an engine whose top-K is fixed when made gets `topk` as its cap).

    The engine is made at the first call (it needs the trainer's tokenizer and EOS ids) and kept. Every call
    pushes the rollout model's weights stamped with the call's number (`push_weights`: an engine that samples
    from the module itself gets the version only) and draws the call's seed from torch's RNG, which TRL seeds
    per process (`set_seed(args.seed, device_specific=True)`): reproducible, and no two processes sample alike.
    """
    if engine_spec(engine_name).caps_topk:
        engine_options = {"max_topk": topk, **engine_options}
    engine, calls = None, 0

    def rollout_func(prompts: list[Any], trainer: GRPOTrainer) -> dict[str, Any]:
        nonlocal engine, calls
        tok = tokenizer if tokenizer is not None else trainer.processing_class
        if tokenizer is not None:
            check_same_tokenizer(tokenizer, trainer.processing_class, names=("rollout", "policy"))
        if getattr(trainer, "tools", None):
            raise ValueError("a rollout model's rollout_func cannot serve TRL's tool-call loop: TRL generates the "
                             "turn after a tool call with its own generation path (the policy or vLLM), not the "
                             "rollout model, so the batch would mix two samplers; train without tools in decoupled "
                             "mode")
        args = trainer.args
        _check_sampling_settings(args, engine_name)
        prompt_ids, prompt_mask = _left_pad(_rollout_prompt_ids(prompts, trainer, tok), tok.pad_token_id)
        if engine is None:
            engine = make_engine(engine_name, rollout_model, tok, eos_token_ids=list(trainer.eos_token_ids),
                                 **engine_options)
        calls += 1
        push_weights(engine, rollout_model, calls)
        batch = engine.generate(prompt_ids.to(rollout_model.device), prompt_mask.to(rollout_model.device),
                                max_new_tokens=trainer.max_completion_length, temperature=trainer.temperature,
                                top_p=args.top_p, topk=topk, seed=int(torch.randint(2**62, ())))
        keep_p, keep_r = batch.prompt_mask.bool().cpu(), batch.response_mask.bool().cpu()
        ids, resp, lps = batch.prompt_ids.cpu(), batch.response_ids.cpu(), batch.rollout_logp.cpu()
        return {
            "prompt_ids": [row[k].tolist() for row, k in zip(ids, keep_p, strict=True)],
            "completion_ids": [row[k].tolist() for row, k in zip(resp, keep_r, strict=True)],
            "logprobs": [row[k].tolist() for row, k in zip(lps, keep_r, strict=True)],
        }

    return rollout_func


def _check_sampling_settings(args: Any, engine_name: str) -> None:
    """ValueError for every GRPOConfig sampling setting a rollout model's `rollout_func` would otherwise ignore."""
    refused = []
    if args.top_k:
        refused.append(f"top_k={args.top_k} (set 0)")
    if args.min_p:
        refused.append(f"min_p={args.min_p} (set None)")
    if args.repetition_penalty != 1.0:
        refused.append(f"repetition_penalty={args.repetition_penalty} (set 1.0)")
    if args.generation_kwargs:
        refused.append(f"generation_kwargs={args.generation_kwargs!r} (set None)")
    if refused:
        raise ValueError(f"the rollout model's rollout_func ({engine_name} engine) samples with temperature and "
                         "top_p only; it cannot honour "
                         + ", ".join(refused))


def _rollout_prompt_ids(prompts: list[Any], trainer: GRPOTrainer, tok: Any) -> list[list[int]]:
    """Token ids of each prompt, as TRL 1.16's `GRPOTrainer._tokenize_prompts` makes them for text models.

    Conversational prompts: one `apply_chat_template(tokenize=True, add_generation_prompt=True)` call with
    the trainer's chat_template and chat_template_kwargs (tools are refused; no special tokens on top, so a
    template that starts with BOS gives one BOS). Plain text: the tokenizer's own call (its special tokens).
    """
    if is_conversational({"prompt": prompts[0]}):
        tokenized = tok.apply_chat_template(
            conversation=prompts, chat_template=getattr(trainer, "chat_template", None), add_generation_prompt=True,
            tokenize=True, return_dict=True, **(getattr(trainer, "chat_template_kwargs", None) or {}))
        return [list(row) for row in tokenized["input_ids"]]
    return [list(row) for row in tok(text=prompts)["input_ids"]]


def _left_pad(rows: list[list[int]], pad_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists: -> prompt_ids (B, P) long, prompt_mask (B, P) long."""
    if pad_id is None:
        raise ValueError("tokenizer has no pad token; set tokenizer.pad_token before rollouts")
    if not rows or min(len(r) for r in rows) == 0:
        raise ValueError("every prompt needs at least one token")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


__all__ = ["JackpotGRPOConfig", "JackpotGRPOTrainer", "hf_rollout_func", "jackpot_trl_correction", "vllm_rollout_func"]
