"""A real vocabulary (Qwen3: V = 151,936) on CPU: one decoupled Jackpot step at the real Qwen3-0.6B widths
(2 layers, random weights, nothing downloaded), and `jackpot train` end to end with real-vocabulary models
given by path, whose embedding is far larger than the offline tokenizer."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from jackpot.cli import main as cli_main
from jackpot.metrics import read_metrics
from jackpot.models.loading import save_model_and_tokenizer
from jackpot.models.tokenizer import build_char_tokenizer
from jackpot.rollout.base import RolloutBatch
from jackpot.train.config import build_config
from jackpot.train.prepare import prepare
from jackpot.train.update import update

pytestmark = pytest.mark.slow

V = 151_936


def qwen3(hidden: int, inter: int, heads: int, kv: int, head_dim: int, layers: int, seed: int, **extra):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=V, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, tie_word_embeddings=True,
                      rope_theta=1e6, **extra)
    return Qwen3ForCausalLM(cfg).eval()


def test_one_decoupled_jackpot_step_at_qwen3_widths_and_vocabulary():
    policy = qwen3(1024, 3072, 16, 8, 128, layers=2, seed=0)      # Qwen3-0.6B widths
    rollout = qwen3(1024, 3072, 16, 8, 128, layers=1, seed=1)
    B, P, T = 4, 6, 8
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, V, (B, P), generator=g)
    response = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():
        from reference import response_logits

        lp = torch.log_softmax(response_logits(rollout, torch.cat([prompt, response], 1),
                                               torch.ones(B, P + T, dtype=torch.long), T), -1)
        top = lp.topk(4, -1)
        batch = RolloutBatch(prompt, torch.ones_like(prompt), response, torch.ones(B, T),
                             lp.gather(-1, response[..., None])[..., 0], top.indices, top.values)
        del lp
    cfg = build_config(None, ["train.prompts_per_step=2", "train.group_size=2", f"sampling.max_new_tokens={T}",
                              "sampling.topk=4", "train.head_chunk=8", "correction.z=exact"])
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    prep = prepare(cfg, batch, rewards, policy=policy, rollout_model=rollout, init_policy=None, step=1)
    before = [p.detach().clone() for p in (policy.model.layers[0].mlp.up_proj.weight, rollout.lm_head.weight)]
    record = update(cfg, prep, policy=policy, rollout_model=rollout, step=1,
                    policy_opt=torch.optim.SGD(policy.parameters(), lr=1e-2),
                    rollout_opt=torch.optim.SGD(rollout.parameters(), lr=1e-2))
    for key in ("obrs/accept_rate", "obrs/z_mean", "policy/loss", "rollout_model/distill_kl", "policy/grad_norm"):
        value = {**prep.metrics, **record}[key]
        assert math.isfinite(float(value)), key
    assert 0 < float(prep.metrics["obrs/z_mean"]) <= 1
    after = (policy.model.layers[0].mlp.up_proj.weight, rollout.lm_head.weight)
    assert all(not torch.equal(a, b) for a, b in zip(before, after))


@pytest.fixture(scope="module")
def real_vocab_pair(tmp_path_factory):
    """Narrow models with the real vocabulary and the offline character tokenizer (56 tokens): the models
    sample ids the tokenizer does not have."""
    root = tmp_path_factory.mktemp("real_vocab")
    tok = build_char_tokenizer()
    dirs = {}
    for name, layers, seed in (("policy", 2, 0), ("rollout", 1, 1)):
        model = qwen3(32, 64, 2, 1, 16, layers=layers, seed=seed, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        dirs[name] = save_model_and_tokenizer(model, tok, root / name)
    return dirs


def test_jackpot_train_end_to_end_with_real_vocabulary_models_by_path(tmp_path, real_vocab_pair):
    out = tmp_path / "run"
    code = cli_main(["train", "--no-progress", "--out", str(out), f"policy.path={real_vocab_pair['policy']}",
                     f"rollout_model.path={real_vocab_pair['rollout']}", "train.steps=2", "train.prompts_per_step=2",
                     "train.group_size=2", "train.eval_prompts=2", "train.eval_samples=1", "sampling.max_new_tokens=4",
                     "train.head_chunk=4", "tensorboard=false", "distill.estimator=topk"])
    assert code == 0
    last = read_metrics(out)[-1]
    assert last["step"] == 2
    for key in ("obrs/accept_rate", "mismatch/kl_k3", "rollout_model/distill_kl", "eval/accuracy"):
        assert math.isfinite(last[key]), key
