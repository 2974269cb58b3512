"""Evaluation, in one place: `sample_and_score` samples k completions per problem with a rollout engine and
scores them with the task's reward; the trainer's periodic evaluation, `jackpot eval` (its command line:
`jackpot/eval_cli.py`) and the tiny models' pre-training accuracy all call it. It sits below the trainer: it
knows engines and tasks, never a run's config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from jackpot.rollout.base import RolloutEngine
from jackpot.rollout.text import decode_responses, encode_prompts
from jackpot.seeding import EVAL_STREAM, step_seed
from jackpot.tasks import Example, Task, mean_at_k, pass_at_k

GREEDY_TOP_P = 1e-9
"""top_p that keeps only the most likely token (TopP keeps at least one): sampling from it is greedy decoding."""


@dataclass(frozen=True)
class Scored:
    """k completions of each of n problems and their rewards: completions n * k strings, problem-major;
    rewards (n, k) float64."""

    completions: list[str]
    rewards: torch.Tensor

    @property
    def k(self) -> int:
        return self.rewards.shape[1]

    def mean_at_k(self) -> float:
        return mean_at_k(self.rewards)

    def pass_at_k(self) -> float:
        return pass_at_k(self.rewards, self.k)


@torch.no_grad()
def sample_and_score(engine: RolloutEngine, tokenizer, task: Task, examples: list[Example], *, k: int,
                     max_new_tokens: int, temperature: float, top_p: float = 1.0, seed: int | None = None,
                     chat_template: bool | None = False, batch_size: int | None = None,
                     uniforms: torch.Tensor | None = None, synced: bool = False, progress: bool = False,
                     desc: str = "eval") -> Scored:
    """Sample k completions of each of `examples` with `engine` and score them with `task.reward`.

    The n * k prompts (each problem k times in a row) go to the engine `batch_size` at a time (None: all at
    once); call c is seeded with step_seed(seed, c, EVAL_STREAM) (None: torch's RNG as it is). `uniforms`
    (n * k, >= max_new_tokens): each row's sampling draws (`RolloutEngine.generate`), so that a row's sample
    does not depend on the batch it is in; `synced`: the engine's model is sharded over processes.
    Greedy decoding: top_p=GREEDY_TOP_P.
    """
    jobs = [ex for ex in examples for _ in range(k)]
    size = batch_size or max(1, len(jobs))
    completions: list[str] = []
    for call, first in enumerate(tqdm(range(0, len(jobs), size), desc=desc, disable=not progress)):
        chunk = jobs[first:first + size]
        ids, mask = encode_prompts(tokenizer, [ex.prompt for ex in chunk], chat_template=chat_template)
        batch = engine.generate(ids, mask, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                topk=1, seed=None if seed is None else step_seed(seed, call, EVAL_STREAM),
                                uniforms=None if uniforms is None else uniforms[first:first + size], synced=synced)
        completions += decode_responses(tokenizer, batch.response_ids, batch.response_mask)
    rewards = torch.tensor([float(task.reward(ex, c)) for ex, c in zip(jobs, completions, strict=True)],
                           dtype=torch.float64)
    return Scored(completions, rewards.reshape(len(examples), k))
