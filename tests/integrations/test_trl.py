"""Jackpot inside TRL's GRPOTrainer, on CPU with tiny Qwen3-architecture models and the char tokenizer."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl", reason="TRL is in the test extra: pip install -e '.[test]'")
import trl.trainer.grpo_trainer as grpo_module  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl_helpers import PROMPTS, TOK, grpo_config, reward, tiny_model  # noqa: E402

from jackpot.core.corrections import CorrectionInputs, jackpot  # noqa: E402
from jackpot.core.losses import aggregate, ppo_token_loss  # noqa: E402
from jackpot.integrations.trl import JackpotGRPOConfig, JackpotGRPOTrainer, hf_rollout_func  # noqa: E402
from jackpot.models.tokenizer import build_char_tokenizer  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _quiet_experimental(monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")


def _trainer(tmp_path, cls=JackpotGRPOTrainer, policy=None, rollout=None, **kw):
    policy = policy if policy is not None else tiny_model(0, 64)
    rollout = rollout if rollout is not None else tiny_model(1, 32, peak=4.0)
    return cls(model=policy, reward_funcs=reward, args=grpo_config(tmp_path, **kw),
               train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=TOK,
               rollout_func=hf_rollout_func(rollout))


def test_trains_a_few_steps_on_cpu_with_a_separate_rollout_model(tmp_path):
    trainer = _trainer(tmp_path, obrs_budget=0.8)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
    logs = [h for h in trainer.state.log_history if "obrs/accept_rate" in h]
    assert len(logs) == 3
    for h in logs:
        assert h["obrs/accept_prob_mean"] == pytest.approx(0.8, abs=1e-5)  # lambda solved per batch
        assert 0.0 < h["obrs/accept_rate"] < 1.0
        assert all(math.isfinite(h[k]) for k in ("loss", "obrs/lambda", "mismatch/kl_k3", "obrs/weight_max"))
        assert h["mismatch/kl_k3"] > 0.05  # the two models really differ


class _Recording(JackpotGRPOTrainer):
    """Records, per optimizer step, the raw TRL batch, the inputs TRL's loss saw, the current policy's
    log-probs on them and the loss TRL returned."""

    raw: list[dict] = []
    seen: list[tuple[dict, torch.Tensor, torch.Tensor]] = []

    def _compute_loss(self, model, inputs):
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        with torch.no_grad():
            new, _, _ = self._get_per_token_logps_and_entropies(model, ids, att, inputs["completion_ids"].size(1))
        loss = super()._compute_loss(model, inputs)
        self.seen.append((dict(inputs), new, loss.detach()))
        return loss


def _record_raw(monkeypatch):
    """Keep rows in generation order (TRL shuffles them) and copy TRL's own output before Jackpot edits it."""
    raw: list[dict] = []
    parent = GRPOTrainer._generate_and_score_completions

    def recorded(self, inputs):
        out = parent(self, inputs)
        raw.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in out.items()})
        return out

    monkeypatch.setattr(grpo_module, "shuffle_sequence_dict", lambda d: d)
    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", recorded)
    return raw


@pytest.mark.parametrize("loss_type, mode", [("dapo", "token-mean"), ("bnpo", "token-mean"),
                                             ("grpo", "seq-mean-token-mean")])
def test_weights_and_mask_reach_trls_loss(tmp_path, monkeypatch, loss_type, mode):
    raw = _record_raw(monkeypatch)
    trainer = _trainer(tmp_path, cls=_Recording, obrs_budget=0.7, obrs_c1=1.5, loss_type=loss_type, max_steps=1)
    trainer.seen = []
    trainer.train()
    (inputs, new, loss), = trainer.seen
    (out,) = raw
    mask = out["completion_mask"].float()
    # the policy has not moved yet: TRL's anchor (computed by the subclass) is the policy's log-prob
    torch.testing.assert_close(inputs["old_per_token_logps"] * mask, new * mask)
    # the weights, recomputed independently from the raw sampling and policy log-probs (they do not
    # depend on the uniforms); the sampled mask is the one the subclass drew
    ref = jackpot(CorrectionInputs(rollout_logp=out["sampling_per_token_logps"].float(), old_logp=new.float(),
                                   mask=mask, uniforms=torch.zeros_like(mask)), budget=0.7, z="batch", c1=1.5)
    keep = inputs["obrs_mask"] * mask
    assert 0 < keep.sum() < mask.sum() and torch.all(keep <= mask)
    per_token, _ = ppo_token_loss(new.float(), inputs["old_per_token_logps"].float(), out["advantages"].float(),
                                  clip_eps=trainer.epsilon_low, clip_eps_high=trainer.epsilon_high)
    expected = aggregate(per_token * ref.weights, keep, mode)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # and the check can tell: without the weights, or without the mask, the loss would differ
    assert not torch.isclose(loss, aggregate(per_token, keep, mode), rtol=1e-3)
    assert not torch.isclose(loss, aggregate(per_token * ref.weights, mask, mode), rtol=1e-3)


def test_expected_mask_keeps_each_token_with_its_acceptance(tmp_path, monkeypatch):
    raw = _record_raw(monkeypatch)
    trainer = _trainer(tmp_path, cls=_Recording, obrs_lambda=1.2, obrs_sampled_mask=False, loss_type="bnpo",
                       max_steps=1)
    trainer.seen = []
    trainer.train()
    (inputs, new, loss), = trainer.seen
    (out,) = raw
    mask = out["completion_mask"].float()
    ref = jackpot(CorrectionInputs(rollout_logp=out["sampling_per_token_logps"].float(), old_logp=new.float(),
                                   mask=mask), lam=1.2, z="batch", c1=2.0, sampled_mask=False)
    torch.testing.assert_close(inputs["tool_mask"] * mask, ref.mask)
    per_token, _ = ppo_token_loss(new.float(), new.float(), out["advantages"].float())
    torch.testing.assert_close(loss, aggregate(per_token * ref.weights, ref.mask, "token-mean"), rtol=1e-5, atol=1e-6)


def test_decoupled_generations_come_from_the_rollout_model(tmp_path, monkeypatch):
    raw = _record_raw(monkeypatch)
    rollout = tiny_model(1, 32, peak=12.0)
    trainer = _trainer(tmp_path, rollout=rollout, max_steps=2, temperature=0.7)
    trainer.train()
    assert len(raw) == 2
    for out in raw:
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        att = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        T, m = out["completion_ids"].size(1), out["completion_mask"].bool()
        with torch.no_grad():
            logits = rollout(input_ids=ids, attention_mask=att).logits[:, -T - 1:-1].float() / 0.7
        rollout_lp = torch.log_softmax(logits, -1).gather(-1, out["completion_ids"].unsqueeze(-1)).squeeze(-1)
        # the recorded sampling log-probs are the rollout model's at the trainer's temperature ...
        torch.testing.assert_close(out["sampling_per_token_logps"][m], rollout_lp[m], rtol=1e-4, atol=1e-4)
        # ... and the tokens are those the (near-deterministic) rollout model picks, unlikely for the policy
        with torch.no_grad():
            policy_logits = trainer.model(input_ids=ids, attention_mask=att).logits[:, -T - 1:-1].float() / 0.7
        policy_lp = torch.log_softmax(policy_logits, -1).gather(-1, out["completion_ids"].unsqueeze(-1)).squeeze(-1)
        assert rollout_lp[m].mean() > -0.5 and policy_lp[m].mean() < -2.0


def test_one_engine_serves_every_call_each_call_a_new_weight_version(tmp_path, monkeypatch):
    """The rollout_func makes its engine once and pushes the rollout model's weights before every call (the vLLM
    counterpart's weights are checked in tests/integrations/test_trl_vllm.py)."""
    import jackpot.integrations.trl as integration

    made = []
    make = integration.make_engine
    monkeypatch.setattr(integration, "make_engine", lambda *a, **kw: made.append(make(*a, **kw)) or made[-1])
    trainer = _trainer(tmp_path)
    for _ in range(3):
        trainer.rollout_func(PROMPTS[:2], trainer)
    (engine,) = made
    assert engine.model_version == 3


def test_the_rollout_tokenizer_must_match(tmp_path):
    other = build_char_tokenizer()
    other.add_tokens(["<extra>"])
    trainer = _trainer(tmp_path)
    trainer.rollout_func = hf_rollout_func(tiny_model(1, 32), tokenizer=other)
    with pytest.raises(ValueError, match="vocabulary size"):
        trainer.train()


@pytest.mark.parametrize("kw, args_cls, match", [
    ({"rollout_func": None}, JackpotGRPOConfig, "sampling distribution's log-probs"),
    ({}, GRPOConfig, "JackpotGRPOConfig"),
    ({"vllm_importance_sampling_correction": True}, JackpotGRPOConfig, "TRL's IS weights"),
    ({"obrs_budget": 1.5}, JackpotGRPOConfig, "obrs_budget"),
])
def test_misconfiguration_fails_with_one_clear_error(tmp_path, kw, args_cls, match):
    rollout_func = kw.pop("rollout_func", hf_rollout_func(tiny_model(1, 32)))
    args = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=4, num_generations=4,
                max_completion_length=4, report_to=[], **kw)
    with pytest.raises(ValueError, match=match):
        JackpotGRPOTrainer(model=tiny_model(0, 32), reward_funcs=reward, args=args_cls(**args),
                           train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=TOK,
                           rollout_func=rollout_func)


def _probe_kl(policy, rollout):
    """Mean forward KL(p_policy || p_rollout) over the positions of fixed probe sequences."""
    from reference import distill_kl, response_logits

    enc = TOK([p + "12" for p in PROMPTS], padding=True, return_tensors="pt")
    with torch.no_grad():
        t = response_logits(policy, enc["input_ids"], enc["attention_mask"], 3)
        s = response_logits(rollout, enc["input_ids"], enc["attention_mask"], 3)
        return distill_kl(s, t).mean().item()


@pytest.mark.parametrize("ppo", [False, True])
def test_joint_training_moves_the_rollout_model_toward_the_policy(tmp_path, ppo):
    policy, rollout = tiny_model(0, 64), tiny_model(1, 32, peak=4.0)
    before_kl = _probe_kl(policy, rollout)
    policy_before = [p.detach().clone() for p in policy.parameters()]
    opt = torch.optim.Adam(rollout.parameters(), lr=3e-3)
    trainer = JackpotGRPOTrainer(model=policy, reward_funcs=reward,
                                 train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                                 args=grpo_config(tmp_path, learning_rate=0.0, max_steps=6, rollout_ppo=ppo),
                                 processing_class=TOK, rollout_model=rollout, rollout_optimizer=opt)
    trainer.train()
    assert all(torch.equal(a, p) for a, p in zip(policy_before, policy.parameters()))  # policy lr 0: a fixed teacher
    kls = [h["rollout_model/distill_kl"] for h in trainer.state.log_history if "rollout_model/distill_kl" in h]
    assert len(kls) == 6 and all(math.isfinite(k) for k in kls)
    assert _probe_kl(policy, rollout) < 0.5 * before_kl  # distillation toward the policy works


def test_rollout_optimizer_needs_its_model(tmp_path):
    with pytest.raises(ValueError, match="rollout_optimizer needs rollout_model"):
        JackpotGRPOTrainer(model=tiny_model(0, 32), reward_funcs=reward, args=grpo_config(tmp_path),
                           train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=TOK,
                           rollout_func=hf_rollout_func(tiny_model(1, 32)),
                           rollout_optimizer=torch.optim.SGD(tiny_model(2, 32).parameters(), lr=0.1))


def test_a_rollout_optimizer_with_nothing_to_train_is_refused(tmp_path):
    rollout = tiny_model(1, 32)
    with pytest.raises(ValueError, match="no loss"):
        JackpotGRPOTrainer(model=tiny_model(0, 32), reward_funcs=reward, processing_class=TOK,
                           train_dataset=Dataset.from_dict({"prompt": PROMPTS}), rollout_model=rollout,
                           rollout_optimizer=torch.optim.SGD(rollout.parameters(), lr=0.1),
                           args=grpo_config(tmp_path, rollout_distill_coef=0.0, rollout_ppo=False))


def _former_rollout_model_loss(policy, rollout, inputs, *, temperature, coef, ppo, eps_low, eps_high):
    """The integration's former rollout-model loss, from full (B, T, V) logits: kept as the slow reference."""
    from reference import distill_kl, response_logits

    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    T, mask = inputs["completion_ids"].size(1), inputs["rollout_mask"]
    with torch.no_grad():
        teacher = response_logits(policy, ids, att, T, temperature)
    student = response_logits(rollout, ids, att, T, temperature)
    kl = aggregate(distill_kl(student, teacher), mask, "token-mean")
    loss, ppo_loss = coef * kl, None
    if ppo:
        logp = torch.log_softmax(student, -1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
        sampling = inputs["sampling_per_token_logps"]
        sampling = torch.where(torch.isnan(sampling), logp.detach(), sampling)
        tok, _ = ppo_token_loss(logp, sampling, inputs["rollout_advantages"].expand_as(logp), clip_eps=eps_low,
                                clip_eps_high=eps_high)
        ppo_loss = aggregate(tok, mask, "token-mean")
        loss = loss + ppo_loss
    return loss, kl, ppo_loss


@pytest.mark.parametrize("ppo, coef", [(True, 1.0), (True, 0.0), (False, 0.5)])
def test_rollout_model_update_equals_the_former_full_logits_formula_in_float64(ppo, coef):
    """The joint update runs on the chunked heads (jackpot.core.joint, as the trainer's); on a tiny float64 case
    its loss terms and gradients equal the former (B, T, V) formula's, NaN sampling log-probs included."""
    from collections import defaultdict
    from types import SimpleNamespace

    policy, rollout = tiny_model(0, 32).double(), tiny_model(1, 16, peak=3.0).double()
    g = torch.Generator().manual_seed(0)
    B, P, T, temperature = 3, 4, 5, 0.7
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[1, 3:] = 0  # a response that ended early
    ids = torch.randint(3, len(TOK), (B, P + T), generator=g)
    inputs = {"prompt_ids": ids[:, :P], "prompt_mask": prompt_mask, "completion_ids": ids[:, P:],
              "completion_mask": completion_mask, "rollout_mask": completion_mask.double(),
              "rollout_advantages": torch.randn(B, 1, generator=g, dtype=torch.float64)}
    with torch.no_grad():  # the engine's log-probs: the rollout model's, moved so that the PPO clip binds
        from reference import response_logits

        own = torch.log_softmax(response_logits(rollout, ids, torch.cat([prompt_mask, completion_mask], 1), T,
                                                temperature), -1).gather(-1, ids[:, P:, None])[..., 0]
    sampling = (own + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp_max(0.0)
    sampling[0, 1] = sampling[2, 4] = float("nan")  # tokens the engine could not score
    inputs["sampling_per_token_logps"] = sampling

    ref_loss, ref_kl, ref_ppo = _former_rollout_model_loss(policy, rollout, inputs, temperature=temperature,
                                                           coef=coef, ppo=ppo, eps_low=0.2, eps_high=0.28)
    ref_grads = torch.autograd.grad(ref_loss, list(rollout.parameters()), allow_unused=True)
    trainer = SimpleNamespace(args=SimpleNamespace(rollout_ppo=ppo, rollout_distill_coef=coef),
                              temperature=temperature, epsilon_low=0.2, epsilon_high=0.28, rollout_model=rollout,
                              rollout_optimizer=torch.optim.SGD(rollout.parameters(), lr=0.0),
                              accelerator=SimpleNamespace(unwrap_model=lambda m: m),
                              _metrics={"train": defaultdict(list)})
    JackpotGRPOTrainer._update_rollout_model(trainer, policy, inputs)
    logged = trainer._metrics["train"]
    if ppo:
        assert logged["rollout_model/ppo_loss"] == [pytest.approx(ref_ppo.item(), rel=1e-10, abs=1e-12)]
    if coef > 0:
        assert logged["rollout_model/distill_kl"] == [pytest.approx(ref_kl.item(), rel=1e-10, abs=1e-12)]
    assert set(logged) == {k for k, on in (("rollout_model/ppo_loss", ppo), ("rollout_model/distill_kl", coef > 0))
                           if on}
    for p, ref in zip(rollout.parameters(), ref_grads, strict=True):
        if ref is None or p.grad is None:
            assert ref is None or not ref.any()
            continue
        torch.testing.assert_close(p.grad, ref, rtol=1e-9, atol=1e-12)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in rollout.parameters())


def test_rollout_models_ppo_uses_the_unweighted_advantages_on_every_produced_token(tmp_path, monkeypatch):
    raw = _record_raw(monkeypatch)
    rollout = tiny_model(1, 32, peak=4.0)
    trainer = JackpotGRPOTrainer(model=tiny_model(0, 64), reward_funcs=reward, processing_class=TOK,
                                 train_dataset=Dataset.from_dict({"prompt": PROMPTS}), rollout_model=rollout,
                                 rollout_optimizer=torch.optim.SGD(rollout.parameters(), lr=0.0),
                                 args=grpo_config(tmp_path, max_steps=1, rollout_distill_coef=0.0, obrs_budget=0.6))
    trainer.train()
    (out,) = raw
    (logged,) = [h["rollout_model/ppo_loss"] for h in trainer.state.log_history if "rollout_model/ppo_loss" in h]
    mask = out["completion_mask"].float()
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    att = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    with torch.no_grad():
        logits = rollout(input_ids=ids, attention_mask=att).logits[:, -mask.shape[1] - 1:-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, out["completion_ids"].unsqueeze(-1)).squeeze(-1)
    per_token, _ = ppo_token_loss(logp, out["sampling_per_token_logps"].float(),
                                  out["advantages"].float().unsqueeze(1).expand_as(logp))
    assert logged == pytest.approx(aggregate(per_token, mask, "token-mean").item(), rel=1e-4, abs=1e-6)
    assert logged != pytest.approx(0.0, abs=1e-4)


def _llama_style_tokenizer():
    """The char tokenizer made Llama-like: encoding adds BOS, and the chat template starts with BOS.

    The template writes `!` when enable_thinking is False (as Qwen3's writes an empty think block) and
    `t<number of tools>` when tools are given; `:` is the generation prompt."""
    from tokenizers import processors

    tok = build_char_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    tok.chat_template = ("{{ bos_token }}{% if tools %}t{{ tools | length }}{% endif %}"
                         "{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if enable_thinking is defined and not enable_thinking %}!{% endif %}"
                         "{% if add_generation_prompt %}:{% endif %}")
    return tok


def _add(a: int, b: int) -> int:
    """Add two numbers.

    Args:
        a: the first number
        b: the second number
    """
    return a + b


def test_conversational_prompts_are_tokenized_as_trl_tokenizes_them(tmp_path):
    tok = _llama_style_tokenizer()
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS[:4]]
    trainer = JackpotGRPOTrainer(model=tiny_model(0, 32), reward_funcs=reward, processing_class=tok,
                                 train_dataset=Dataset.from_dict({"prompt": prompts}),
                                 args=grpo_config(tmp_path, chat_template_kwargs={"enable_thinking": False}),
                                 rollout_func=hf_rollout_func(tiny_model(1, 32)))
    out = trainer.rollout_func(prompts, trainer)
    trl_ids, _, _ = trainer._tokenize_prompts(prompts)  # TRL's own path when it generates
    assert out["prompt_ids"] == [list(r) for r in trl_ids]
    for row, p in zip(out["prompt_ids"], PROMPTS[:4], strict=True):
        assert row == [tok.bos_token_id, *tok(p, add_special_tokens=False)["input_ids"],
                       *tok("!:", add_special_tokens=False)["input_ids"]]  # one BOS; thinking off
    plain = trainer.rollout_func(PROMPTS[:2], trainer)["prompt_ids"]  # text prompts: the tokenizer's own call
    assert plain == tok(PROMPTS[:2])["input_ids"]


@pytest.mark.parametrize("kw, match", [({"top_k": 5}, "top_k=5"), ({"min_p": 0.1}, "min_p=0.1"),
                                       ({"repetition_penalty": 1.2}, "repetition_penalty=1.2"),
                                       ({"generation_kwargs": {"no_repeat_ngram_size": 2}}, "generation_kwargs")])
def test_sampling_settings_the_rollout_model_cannot_honour_are_refused(tmp_path, kw, match):
    trainer = _trainer(tmp_path, **kw)
    with pytest.raises(ValueError, match=match):
        trainer.rollout_func(PROMPTS[:2], trainer)


def test_rollout_func_refuses_tools():
    """TRL would generate the turn after a tool call with its own path: refused before anything runs."""
    from types import SimpleNamespace

    from jackpot.integrations.trl import hf_rollout_func

    trainer = SimpleNamespace(tools=[_add], processing_class=None, args=None)
    with pytest.raises(ValueError, match="tool-call loop"):
        hf_rollout_func(object())(["1+1="], trainer)
