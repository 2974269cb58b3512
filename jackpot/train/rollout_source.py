"""Where a step's batch comes from: `RolloutSource.take(step)`, whatever the schedule.

A step's prompts are drawn from (seed, step) and split by rank in whole groups; each row's sampling uniforms
come from its global index (`step_prompts`), so a batch does not depend on how it is split over processes.
The source owns everything that samples them: the engines (one per model that generates, for sampling and
evaluation alike, closed at the end), the asynchronous generator and its weight snapshots, the batches in
flight that a checkpoint holds, and the resume checks. The loop asks it for the step's batch (`take`), lets
it finish its work before evaluating (`drain`), saves and restores it with a checkpoint (`state`, `restore`)
and closes it; it never asks which schedule runs.

Two schedules, one fixed by `rollout.async_steps = k`:

    k = 0   synchronous: at step n the sampling model (weights version n: n - 1 updates) samples the batch of
            step n in the trainer's thread; `rollout/staleness` is 0.
    k > 0   asynchronous (`jackpot.train.pipeline.Generator`): at step n the trainer hands the generator the
            batches up to step n + k (at step 1, those of steps 1 .. 1 + k) together with a snapshot of the
            sampling model's weights as they are then, version n, and takes the batch of step n, sampled by
            version max(1, n - k): `rollout/staleness` is min(n - 1, k). The corrections see the recorded
            p_inf, as in a synchronous run; only the distance between p_inf and the policy grows.

The snapshot is a copy (`_weights_now` clones the checkpoint tensors): the update that follows changes the
trained module in place, and the generator may read the weights only after it (`tests/train/
test_rollout_source.py` holds it there). The generator samples from an engine of its own that holds a copy
(`hf` with `own_copy`, or an engine that always holds one), so the trainer's updates never race with
sampling. Its thread runs `rollout.threads` torch threads beside the trainer's `train.threads`: on a CPU keep
their sum at most the cores. Under torchrun every process has its own generator over its rows; the snapshots
are gathered (FSDP2) in the trainer's thread, in step on every process.

The batches generated but not yet trained on belong to a checkpoint (`state`: `inflight`, per rank), so a
resumed run trains on exactly the batches the uninterrupted one would; a checkpoint written with another
`async_steps` is refused (its batches in flight follow that schedule).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from jackpot.errors import InputError
from jackpot.metric_names import PERF_GENERATOR_IDLE_S, PERF_ROLLOUT_S, PERF_ROLLOUT_WAIT_S
from jackpot.models.forward import language_model
from jackpot.rollout import RolloutEngine, make_engine
from jackpot.rollout.base import RolloutBatch, release_all
from jackpot.rollout.text import encode_prompts
from jackpot.rollout.weights import Weights, checkpoint_weights, push_weights
from jackpot.seeding import PROMPT_STREAM, SAMPLING_STREAM, row_uniforms, step_seed
from jackpot.tasks import Example, Task
from jackpot.train.config import Config
from jackpot.train.config_checks import engine_options
from jackpot.train.distributed import Collective, Shard, gathered_for_generation
from jackpot.train.pipeline import Generator

ASYNC_STEPS_STATE = "async_steps"  # checkpoint state.json: the schedule its batches in flight follow


@dataclass
class Prompts:
    """One step's prompts for this rank: the task examples (each repeated group_size times), their ids and mask
    (left-padded), the rows' sampling uniforms (from their global index) and the call's seed."""

    examples: list[Example]
    ids: torch.Tensor
    mask: torch.Tensor
    uniforms: torch.Tensor
    seed: int


def sample(engine: RolloutEngine, prompts: Prompts, cfg: Config, synced: bool = False) -> RolloutBatch:
    """`engine`'s responses to `prompts`, rollout.batch_size rows per generate call (equal shares: every rank
    runs as many calls)."""
    s, size = cfg.sampling, cfg.rollout.batch_size or len(prompts.examples)
    parts = [engine.generate(prompts.ids[i:i + size], prompts.mask[i:i + size], max_new_tokens=s.max_new_tokens,
                             temperature=s.temperature, top_p=s.top_p, topk=s.topk, seed=prompts.seed,
                             uniforms=prompts.uniforms[i:i + size], synced=synced)
             for i in range(0, len(prompts.examples), size)]
    return parts[0] if len(parts) == 1 else RolloutBatch.cat(parts)


class RolloutSource:
    """The batches of a run's steps, sampled by `actor` (the sampling model as the update runs it); see the
    module docstring. `engine(model, version)` serves evaluation from the same engines."""

    def __init__(self, cfg: Config, task: Task, tokenizer, coll: Collective, actor: torch.nn.Module):
        self.cfg, self.task, self.tokenizer, self.coll, self.actor = cfg, task, tokenizer, coll, actor
        self.engines: dict[int, RolloutEngine] = {}  # by id of the model they sample
        self.generator: Generator | None = None  # async_steps > 0: made at the first take (or restore)
        self._examples: dict[int, list[Example]] = {}  # the examples of each batch in flight, by step

    # ---------------------------------------------------------------- prompts
    @property
    def shard(self) -> Shard:
        """The rows of the global rollout batch this rank holds (whole groups: its share of the prompts)."""
        t = self.cfg.train
        return self.coll.shard(t.prompts_per_step * t.group_size)

    def step_prompts(self, step: int) -> Prompts:
        """This rank's share of the prompts_per_step prompts of `step` (drawn from (seed, step)), group_size
        times each."""
        t, s = self.cfg.train, self.cfg.sampling
        examples = self.task.examples("train", t.prompts_per_step, step_seed(t.seed, step, PROMPT_STREAM))
        share = self.coll.share(t.prompts_per_step, "train.prompts_per_step")
        repeated = [ex for ex in examples[share.start:share.stop] for _ in range(t.group_size)]
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, [ex.prompt for ex in repeated],
                                                 chat_template=self.cfg.task.chat_template)
        shard = self.shard
        uniforms = row_uniforms(t.seed, step, SAMPLING_STREAM, shard.total, s.max_new_tokens, shard.rows)
        return Prompts(repeated, prompt_ids, prompt_mask, uniforms, step_seed(t.seed, step, SAMPLING_STREAM))

    # ---------------------------------------------------------------- the step's batch
    def take(self, step: int) -> tuple[RolloutBatch, list[Example], dict[str, float]]:
        """(the batch of `step` for this rank, its examples row by row, timings): sampled now by the weights after
        step - 1 updates, or generated ahead (async_steps > 0), queueing the next ones."""
        if self.cfg.rollout.async_steps:
            return self._take_ahead(step)
        start = time.perf_counter()
        prompts = self.step_prompts(step)
        engine = self.engine(self.actor, version=step)  # the actor's weights after the previous step's update
        with gathered_for_generation(self.actor, engine) as synced:
            batch = sample(engine, prompts, self.cfg, synced)
        return batch, prompts.examples, {PERF_ROLLOUT_S: time.perf_counter() - start}

    def _take_ahead(self, step: int) -> tuple[RolloutBatch, list[Example], dict[str, float]]:
        """Hand the generator the batches up to step + k with a snapshot of the weights now (version `step`),
        then take the batch of `step`, generated earlier."""
        g = self._generator()
        weights = None
        for n in range(g.last_step + 1, step + self.cfg.rollout.async_steps + 1):  # past train.steps too: a
            prompts = self.step_prompts(n)                                         # resume may extend the run
            self._examples[n] = prompts.examples
            first = weights is None
            weights = self._weights_now(g.engine) if first else weights
            g.submit(n, step, weights if first else None,
                     lambda engine, prompts=prompts: sample(engine, prompts, self.cfg))
        generated, waited = g.result(step)
        return generated.batch, self._examples.pop(step), {
            PERF_ROLLOUT_S: generated.seconds, PERF_ROLLOUT_WAIT_S: waited, PERF_GENERATOR_IDLE_S: generated.idle_s}

    def _weights_now(self, engine: RolloutEngine) -> Weights:
        """A snapshot of the sampling model's weights in `engine`'s dtype: a copy, since the update that follows
        changes the trained module in place before the generator may read them."""
        return [(name, t.clone()) for name, t in checkpoint_weights(language_model(self.actor), engine.dtype)]

    def _generator(self) -> Generator:
        if self.generator is None:
            engine = make_engine(self.cfg.rollout.engine, language_model(self.actor), self.tokenizer, own_copy=True,
                                 **engine_options(self.cfg))
            self.generator = Generator(engine, self.cfg.rollout.threads or 1)
        return self.generator

    @property
    def sampling_engine(self) -> RolloutEngine:
        """The engine that sampled the batches `take` returns: the generator's copy, else the sampling model's."""
        return self.generator.engine if self.generator is not None else self.engines[id(self.actor)]

    def engine(self, model: torch.nn.Module, version: int) -> RolloutEngine:
        """The engine that samples from `model` (as the update runs it), holding its weights `version`: one per
        model for the whole run, sampling and evaluation alike (an engine holding its own weights is built once
        and pushed to, never rebuilt; in-process vLLM engines must outlive each other)."""
        if id(model) not in self.engines:
            self.engines[id(model)] = make_engine(self.cfg.rollout.engine, language_model(model), self.tokenizer,
                                                  **engine_options(self.cfg))
        engine = self.engines[id(model)]
        release_all(e for e in self.engines.values() if e is not engine)  # colocated vLLM: one engine awake
        push_weights(engine, language_model(model), version)
        return engine

    # ---------------------------------------------------------------- evaluation, checkpoints, the end
    def drain(self) -> None:
        """Wait for the batches in flight (before evaluating: in-process vLLM engines share state)."""
        if self.generator is not None:
            self.generator.inflight()

    def state(self) -> tuple[dict, dict | None]:
        """(what the checkpoint's state.json holds of the source, this rank's local state: the batches generated
        ahead, None when there are none)."""
        if not self.cfg.rollout.async_steps:
            return {}, None
        inflight = self.generator.inflight() if self.generator is not None else {}
        return {ASYNC_STEPS_STATE: self.cfg.rollout.async_steps}, {
            "inflight": {n: dataclasses.asdict(batch) for n, batch in inflight.items()}}

    def restore(self, state: dict, local: dict | None) -> None:
        """Continue from a checkpoint's `state` (state.json) and this rank's `local` state; InputError if it was
        written with another schedule."""
        saved, k = state.get(ASYNC_STEPS_STATE, 0), self.cfg.rollout.async_steps
        if saved != k:
            raise InputError(f"--resume: the checkpoint was written with rollout.async_steps={saved}, the run asks "
                             f"for {k}; resume with rollout.async_steps={saved}")
        if k:
            batches = {int(step): RolloutBatch(**batch) for step, batch in local["inflight"].items()}
            self._examples.update({step: self.step_prompts(step).examples for step in batches})
            self._generator().restore(batches)

    def close(self) -> None:
        """Stop the generator (its queue dropped) and free every engine."""
        if self.generator is not None:
            self.generator.close()
            self.generator.engine.close()
        for engine in self.engines.values():
            engine.close()
