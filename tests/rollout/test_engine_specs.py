"""One spec per engine (jackpot.rollout.engines): what the config, evaluation and the integrations read instead
of an engine's name. Pinned here: each spec says what its engines say of themselves (`per_row_uniforms`,
`holds_weights`, `exact_logprobs`), `engine_options` gives an engine the options it takes and its top-K cap,
the config's checks follow the specs, and closing an engine frees its copy and never the trainer's module.
The vLLM engine itself runs in tests/rollout/test_vllm_engine.py (its own environment)."""

from __future__ import annotations

import pytest

from jackpot.errors import InputError
from jackpot.models.loading import build_tiny_qwen
from jackpot.models.tokenizer import build_char_tokenizer
from jackpot.rollout import ENGINE_OPTIONS, ENGINE_SPECS, ENGINES, engine_options, engine_spec, make_engine
from jackpot.rollout.vllm import VLLMRolloutEngine
from jackpot.train.config import build_config
from jackpot.train.config_checks import check_training_models


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_qwen(len(tok), hidden_size=16, num_layers=1, num_heads=2, seed=0, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id).eval()


@pytest.mark.parametrize("name", ["hf", "hf-static"])
def test_an_hf_engine_is_what_its_spec_says(model, tok, name):
    spec = engine_spec(name)
    for own_copy in (False, True):
        engine = make_engine(name, model, tok, own_copy=own_copy)
        assert engine.per_row_uniforms == spec.per_row_uniforms and engine.exact_logprobs == spec.exact_logprobs
        assert engine.holds_weights == (own_copy or spec.holds_weights)


def test_the_vllm_spec_is_what_its_engine_says():
    """Read from the class: building one needs vLLM."""
    spec = engine_spec("vllm")
    assert VLLMRolloutEngine.per_row_uniforms == spec.per_row_uniforms is False
    assert VLLMRolloutEngine.holds_weights == spec.holds_weights is True
    assert VLLMRolloutEngine.exact_logprobs == spec.exact_logprobs is True


def test_engine_options_are_the_options_an_engine_takes_and_its_top_k_cap():
    hf, vllm = build_config(None, ["sampling.topk=7"]), build_config(None, ["rollout.engine=vllm", "sampling.topk=7",
                                                                            "rollout.dtype=float32"])
    assert engine_options(hf.rollout, hf.sampling.topk) == {}
    assert engine_options(vllm.rollout, vllm.sampling.topk) == {"dtype": "float32", "enforce_eager": True,
                                                                 "max_topk": 7}  # null options left to the engine
    assert ENGINES == {n: s.make for n, s in ENGINE_SPECS.items()}  # the old tables, kept as views
    assert ENGINE_OPTIONS == {n: s.options for n, s in ENGINE_SPECS.items()}
    with pytest.raises(InputError, match="unknown rollout engine 'sglang'"):
        engine_spec("sglang")


def test_the_config_checks_read_the_specs():
    with pytest.raises(InputError, match=r"rollout.dtype='float32': rollout.engine=hf has no such option \(an "
                                         r"option of rollout.engine=vllm\)"):
        build_config(None, ["rollout.dtype=float32"])
    # an engine holding its own copy gets both models' weights pushed: LoRA + FSDP2 cannot be merged for it
    with pytest.raises(InputError, match="policy.lora_rank with parallel.policy=fsdp cannot push its weights to "
                                         "rollout.engine=vllm"):
        build_config(None, ["rollout.engine=vllm", "policy.lora_rank=4", "parallel.policy=fsdp"])
    build_config(None, ["policy.lora_rank=4", "parallel.policy=fsdp"])  # hf samples the module itself
    # a shape the engine cannot serve (vLLM's CPU attention: head dimension 64 // 4 = 16), before pre-training
    with pytest.raises(InputError, match="head dimensions"):
        check_training_models(build_config(None, ["rollout.engine=vllm", "rollout_model.num_heads=4"]))
    check_training_models(build_config(None, []))


def test_closing_an_engine_frees_its_copy_and_never_the_trainers_module(model, tok):
    shared, copied = make_engine("hf", model, tok), make_engine("hf", model, tok, own_copy=True)
    shared.close()
    copied.close()
    assert shared.model is model and copied.model is None


def test_the_derived_config_properties():
    for mode, training, decoupled, trained in [("decoupled", "joint", True, True), ("decoupled", "frozen", True, False),
                                               ("on-policy", "joint", False, False)]:
        cfg = build_config(None, [f"train.mode={mode}", f"distill.rollout_model={training}"])
        assert (cfg.decoupled, cfg.trains_rollout_model) == (decoupled, trained)
        assert cfg.actor_role == ("rollout_model" if decoupled else "policy")
