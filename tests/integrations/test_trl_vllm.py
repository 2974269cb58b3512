"""`vllm_rollout_func` (jackpot.integrations.trl): TRL's `rollout_func` served by the vLLM engine.

vLLM needs an environment of its own (`.venv-vllm`, with TRL); tests/rollout/test_vllm_in_its_env.py runs this
file there from the main suite; elsewhere it skips (`needs_vllm`). The models have head_dim 32 (hidden 64,
2 heads): vLLM's CPU attention serves no smaller one. LOGPROB_TOL as in tests/rollout/test_vllm_engine.py: the
engine's processed log-probs and a float32 teacher-forced forward agreed within 5e-7 when measured.
"""

from __future__ import annotations

import copy

import pytest
import torch
from cli_helpers import needs_vllm
from transformers.generation import TopPLogitsWarper

pytest.importorskip("trl", reason="TRL: pip install -e '.[trl]' (in .venv-vllm too)")
import trl.trainer.grpo_trainer as grpo_module  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOTrainer  # noqa: E402
from trl_helpers import PROMPTS, TOK, grpo_config, reward, tiny_model  # noqa: E402

from jackpot.integrations.trl import JackpotGRPOTrainer, vllm_rollout_func  # noqa: E402

pytestmark = [pytest.mark.integration, needs_vllm]

LOGPROB_TOL = 1e-5
TEMPERATURE = 0.7
ENGINE = {"kv_cache_gib": 0.25}  # tiny models: a small KV cache per engine


@pytest.fixture(autouse=True)
def _quiet_experimental(monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")


@pytest.fixture(scope="module")
def kept():
    """Every trainer (its rollout_func holds a vLLM engine) lives until the module ends: dropping an in-process
    vLLM engine while another lives breaks the other."""
    return []


def _trainer(tmp_path, kept, rollout, top_p=1.0, joint=None, **kw):
    """A JackpotGRPOTrainer sampling from `rollout` through vLLM; `joint`: rollout_model and rollout_optimizer."""
    trainer = JackpotGRPOTrainer(model=tiny_model(0, 64), reward_funcs=reward, processing_class=TOK,
                                 train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                                 args=grpo_config(tmp_path, temperature=TEMPERATURE, top_p=top_p, **kw),
                                 rollout_func=vllm_rollout_func(rollout, **ENGINE), **(joint or {}))
    kept.append(trainer)
    return trainer


def teacher_forced(model, prompts: list[list[int]], completions: list[list[int]], top_p: float = 1.0):
    """log q of every completion token under `model`'s teacher-forced forward, q = softmax(top_p(logits / T)),
    one row at a time (no padding): a list of (len(completion),) tensors."""
    rows = []
    for p, c in zip(prompts, completions, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1].float() / TEMPERATURE
        if top_p < 1:
            logits = TopPLogitsWarper(top_p)(None, logits)
        rows.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0])
    return rows


def assert_rows_close(got: list, expected: list[torch.Tensor]) -> None:
    assert [len(g) for g in got] == [len(e) for e in expected]
    torch.testing.assert_close(torch.tensor([x for g in got for x in g]), torch.cat(expected), atol=LOGPROB_TOL,
                               rtol=0)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_logprobs_are_the_rollout_models_at_the_trainers_temperature(tmp_path, kept, top_p):
    rollout = tiny_model(1, 64, peak=4.0)
    trainer = _trainer(tmp_path, kept, rollout, top_p=top_p)
    out = trainer.rollout_func(PROMPTS[:8], trainer)
    assert out["prompt_ids"] == TOK(PROMPTS[:8])["input_ids"]
    assert all(1 <= len(c) <= trainer.max_completion_length for c in out["completion_ids"])
    assert_rows_close(out["logprobs"], teacher_forced(rollout, out["prompt_ids"], out["completion_ids"], top_p))


def test_the_next_call_samples_from_the_rollout_models_new_weights(tmp_path, kept):
    rollout = tiny_model(1, 64, peak=4.0)
    before = copy.deepcopy(rollout)
    trainer = _trainer(tmp_path, kept, rollout)
    trainer.rollout_func(PROMPTS[:8], trainer)
    rollout.load_state_dict(tiny_model(2, 64, peak=4.0).state_dict())  # changed in place, no trainer step
    out = trainer.rollout_func(PROMPTS[:8], trainer)
    assert_rows_close(out["logprobs"], teacher_forced(rollout, out["prompt_ids"], out["completion_ids"]))
    # the check can tell: the former weights give these tokens other log-probs
    old = torch.cat(teacher_forced(before, out["prompt_ids"], out["completion_ids"]))
    assert (old - torch.tensor([x for row in out["logprobs"] for x in row])).abs().mean() > 0.1


def test_joint_training_reaches_the_engine_before_every_generation(tmp_path, kept, monkeypatch):
    """The rollout model trained jointly (rollout_optimizer): every generation batch's sampling log-probs are the
    rollout model's as it is at that generation, which moves from one generation to the next."""
    rollout = tiny_model(1, 64, peak=4.0)
    initial = copy.deepcopy(rollout)
    seen: list[tuple[list, list]] = []  # per generation: (its sampling log-probs, the former weights' forward)
    parent = GRPOTrainer._generate_and_score_completions

    def recorded(self, inputs):
        out = parent(self, inputs)
        rows = [(p[pm.bool()].tolist(), c[cm.bool()].tolist(), s[cm.bool()]) for p, pm, c, cm, s in zip(
            out["prompt_ids"], out["prompt_mask"], out["completion_ids"], out["completion_mask"],
            out["sampling_per_token_logps"], strict=True)]
        prompts, completions, sampling = zip(*rows, strict=True)
        assert_rows_close([s.tolist() for s in sampling], teacher_forced(rollout, prompts, completions))
        seen.append((torch.cat(sampling), torch.cat(teacher_forced(initial, prompts, completions))))
        return out

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", recorded)
    monkeypatch.setattr(grpo_module, "shuffle_sequence_dict", lambda d: d)
    joint = {"rollout_model": rollout, "rollout_optimizer": torch.optim.Adam(rollout.parameters(), lr=3e-2)}
    trainer = _trainer(tmp_path, kept, rollout, joint=joint, max_steps=3, learning_rate=0.0)
    trainer.train()
    assert len(seen) == 3
    # the first generation samples the initial weights; the later ones weights that moved far enough to tell
    torch.testing.assert_close(seen[0][0], seen[0][1], atol=LOGPROB_TOL, rtol=0)
    assert all((sampling - former).abs().max() > 0.05 for sampling, former in seen[1:])
