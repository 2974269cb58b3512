"""Rollout engines: sample responses and record token-level log-probs (see `base.RolloutBatch`).

`make_engine(name, model, tokenizer, **options)` builds the engine the config's `rollout.engine` names (with
the `rollout.*` options it takes, `engine_options`); the trainer never constructs a concrete engine itself.
Each engine's facts — how it is made, its options, what it can do, the shapes it cannot serve — are its
`engines.EngineSpec` in `ENGINE_SPECS`; each engine also declares them on itself (`base.RolloutEngine`),
gets the trained weights through `weights.push_weights` after every update, and is closed by whoever made
it. Text in and out: `text.encode_prompts`, `text.decode_responses`.

Measured alternatives (benchmarks/bench_rollout_engines.py, docs/PERFORMANCE.md): transformers'
continuous batching (`generate_batch`, paged attention) was several times slower on CPU and records no
top-k of the sampling distribution, so it is not offered.
"""

from __future__ import annotations

from jackpot.rollout.base import RolloutBatch, RolloutEngine
from jackpot.rollout.engines import (
    ENGINE_OPTIONS,
    ENGINE_SPECS,
    ENGINES,
    EngineSpec,
    engine_options,
    engine_spec,
    make_engine,
)
from jackpot.rollout.hf import HFRolloutEngine
from jackpot.rollout.text import decode_responses, encode_prompts

__all__ = ["ENGINES", "ENGINE_OPTIONS", "ENGINE_SPECS", "EngineSpec", "HFRolloutEngine", "RolloutBatch",
           "RolloutEngine", "decode_responses", "encode_prompts", "engine_options", "engine_spec", "make_engine"]
