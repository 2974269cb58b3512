"""The rollout source (jackpot.train.rollout_source): where a step's batch comes from, for both schedules.

What is pinned here: the asynchronous schedule hands the generator a snapshot of the sampling weights, not the
live tensors — a batch stamped version n is sampled by version n's weights even when the generator reads them
only after the trainer's update has changed the module (the test holds the generator until then); the source
closes every engine it made at the end of a run; the synchronous source's batch and examples belong together.
The schedule's other facts (staleness, resume, Ctrl-C, failures): tests/train/test_async.py.
"""

from __future__ import annotations

import copy
import threading

import torch
from cli_helpers import TINY
from reference import response_logits

from jackpot.rollout.hf import HFRolloutEngine
from jackpot.train import loop
from jackpot.train.config import build_config

LR = ["policy.lr=1e-2", "rollout_model.lr=1e-2"]  # updates large enough that a version's log-probs are its own


def _cfg(cache, *extra):
    return build_config(None, [*TINY, *LR, f"cache_dir={cache}", *extra])


def _recorded_vs(model, batch) -> float:
    """Largest |recorded log p_inf - log-prob under `model`| over the batch's response tokens."""
    with torch.no_grad():
        logits = response_logits(model, batch.input_ids, batch.attention_mask, batch.response_len)
    logp = torch.log_softmax(logits.float(), -1).gather(-1, batch.response_ids[..., None])[..., 0]
    m = batch.response_mask.bool()
    return (batch.rollout_logp[m] - logp[m]).abs().max().item()


def test_the_generator_samples_the_snapshot_even_when_it_reads_it_after_the_update(tmp_path, cache, monkeypatch):
    """async_steps=1: the weights sent with step n + 1's batch (version n) reach the generator's engine only once
    the update of step n has run. Handing the generator the live tensors would sample that batch with version
    n + 1's weights under version n's stamp; the snapshot keeps them version n's."""
    run = loop.setup(_cfg(cache, "rollout.async_steps=1"), tmp_path)
    object.__setattr__(run.task, "reward", lambda example, completion: len(completion) % 3 + completion.count("1"))
    updated = {step: threading.Event() for step in range(1, 6)}  # set once the update of `step` has run
    real_sync, real_update, real_prepare = HFRolloutEngine.sync_weights, loop.update, loop.prepare

    def sync_after_the_update(engine, weights, version):
        if engine.holds_weights and version >= 2:  # the generator's copy; version 1 is sent before any update
            assert updated[version].wait(timeout=120), f"the update of step {version} never ran"
        real_sync(engine, weights, version)

    def update_then_release(cfg, prep, *, step, **kw):
        out = real_update(cfg, prep, step=step, **kw)
        updated[step].set()
        return out

    seen = {}

    def spy(cfg, batch, rewards, **kw):
        seen["batch"] = batch
        return real_prepare(cfg, batch, rewards, **kw)

    monkeypatch.setattr(HFRolloutEngine, "sync_weights", sync_after_the_update)
    monkeypatch.setattr(loop, "update", update_then_release)
    monkeypatch.setattr(loop, "prepare", spy)
    versions = {1: copy.deepcopy(run.actor)}  # the sampling model's weights by version (version v: v - 1 updates)
    try:
        for step in range(1, 5):
            loop.train_step(run, step)
            batch, version = seen["batch"], max(1, step - 1)
            assert batch.model_version == version
            assert _recorded_vs(versions[version], batch) < 1e-5, step  # sampled by exactly that version
            versions[step + 1] = copy.deepcopy(run.actor)
        assert _recorded_vs(versions[4], batch) > 1e-3  # and the versions differ: the check has teeth
    finally:
        run.source.close()


def test_a_run_closes_every_engine_it_made(tmp_path, cache, monkeypatch):
    """The sampling engines (one per model that generates, evaluation included) and the generator's copy."""
    closed = []
    real_close = HFRolloutEngine.close

    def counting_close(engine):
        closed.append(engine.holds_weights)
        real_close(engine)

    monkeypatch.setattr(HFRolloutEngine, "close", counting_close)
    loop.train(_cfg(cache, "train.steps=1", "rollout.async_steps=1"), tmp_path / "run", progress=False)
    assert sorted(closed) == [False, False, True]  # policy's and rollout model's engines, the generator's copy


def test_a_synchronous_batch_comes_with_its_examples_and_the_sampling_time(tmp_path, cache):
    run = loop.setup(_cfg(cache), tmp_path)
    batch, examples, timings = run.source.take(1)
    assert len(examples) == len(batch) == run.cfg.train.prompts_per_step * run.cfg.train.group_size
    assert examples == run.source.step_prompts(1).examples and batch.model_version == 1
    assert set(timings) == {"perf/rollout_s"}
    assert run.source.state() == ({}, None)
    run.source.close()
