"""Shared by the TRL integration's tests (tests/integrations/test_trl*.py): the char tokenizer, prompts, tiny
Qwen3-architecture models, an arbitrary reward and a `JackpotGRPOConfig` that trains on CPU in seconds.
Imports TRL: a test module imports this after `pytest.importorskip("trl")`."""

from __future__ import annotations

import torch

from jackpot.integrations.trl import JackpotGRPOConfig
from jackpot.models.loading import build_tiny_qwen
from jackpot.models.tokenizer import build_char_tokenizer

TOK = build_char_tokenizer()
PROMPTS = [f"{a}+{b}=" for a in range(4) for b in range(4)]


def tiny_model(seed: int, hidden: int, peak: float = 1.0):
    """One layer, two heads (head_dim hidden / 2); logits scaled by `peak` (a sharper model, far from the policy)."""
    model = build_tiny_qwen(len(TOK), hidden_size=hidden, num_layers=1, num_heads=2, seed=seed,
                            pad_token_id=TOK.pad_token_id, eos_token_id=TOK.eos_token_id, bos_token_id=TOK.bos_token_id)
    with torch.no_grad():
        model.model.norm.weight.mul_(peak)
    return model


def reward(completions, **_):
    return [float(sum(map(ord, c)) % 7) for c in completions]  # arbitrary but varied, so advantages are not 0


def grpo_config(tmp_path, **kw) -> JackpotGRPOConfig:
    base = dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, per_device_train_batch_size=8,
                num_generations=4, max_completion_length=8, max_steps=3, logging_steps=1, report_to=[],
                learning_rate=1e-2, save_strategy="no", seed=0)
    base.update(kw)
    return JackpotGRPOConfig(**base)
