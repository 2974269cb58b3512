"""The trainer's side of colocation, with the real loop on tiny models: after sampling, every engine is released
before prepare and update run, and sampling after an update starts with a push of the new weights — the order a
sleeping vLLM needs (sleep -> update -> wake + push -> generate; tests/rollout/test_vllm_colocate.py checks the
engine's side). Recorded on the `hf` engine, whose `release` is a no-op, and under train.mixed_precision=bf16."""

from __future__ import annotations

import pytest
import torch
from cli_helpers import TINY

from jackpot.rollout.hf import HFRolloutEngine
from jackpot.train import loop
from jackpot.train.config import build_config


@pytest.mark.parametrize("mode", ["decoupled", "on-policy"])
def test_release_comes_between_sampling_and_the_update(tmp_path, cache, monkeypatch, mode):
    calls = []
    for name in ("release", "sync_weights", "generate"):
        original = getattr(HFRolloutEngine, name)

        def recorded(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(HFRolloutEngine, name, recorded)
    for name in ("prepare", "update"):
        original = getattr(loop, name)
        monkeypatch.setattr(loop, name, lambda *a, _name=name, _original=original, **k: (calls.append(_name),
                                                                                       _original(*a, **k))[1])
    cfg = build_config(None, [*TINY, f"cache_dir={cache}", f"train.mode={mode}", "train.steps=2",
                              "train.eval_every=100", "train.mixed_precision=bf16"])
    run = loop.setup(cfg, tmp_path / "run")
    for step in (1, 2):
        loop.train_step(run, step)
    run.logger.close()
    steps = "".join({"generate": "g", "release": "r", "prepare": "p", "update": "u", "sync_weights": "s"}[c]
                    for c in calls)
    # per step: push (s), generate (g), release (r), prepare (p), update (u); before them, pre-training's evaluation
    assert steps.endswith("sgrpu" * 2), steps
    assert all(p.dtype == torch.float32 for p in run.policy.parameters())
