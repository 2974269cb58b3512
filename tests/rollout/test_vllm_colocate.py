"""Colocated vLLM's sleep mode, checked on CPU against a recording double of `vllm.LLM` (sleep mode itself needs
CUDA): the order of calls is sleep -> update -> wake weights -> push -> wake KV cache -> generate, and no push
ever reaches sleeping weights; level 2 pushes again after every sleep (its weights were dropped), level 1 keeps
them. Also the keywords the engine is built with (sleep mode, the external launcher under torchrun)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from jackpot.errors import InputError
from jackpot.models.loading import build_tiny_qwen
from jackpot.models.tokenizer import build_char_tokenizer
from jackpot.rollout.weights import push_weights


class RecordingLLM:
    """Stands in for `vllm.LLM`: records every call in `calls` and refuses what vLLM would get wrong while asleep."""

    def __init__(self, calls: list, **kwargs):
        self.calls, self.asleep = calls, set()
        calls.append(("build", kwargs))

    def sleep(self, level: int) -> None:
        self.calls.append(("sleep", level))
        self.asleep = {"weights", "kv_cache"}

    def wake_up(self, tags: list[str]) -> None:
        self.calls.append(("wake_up", tuple(tags)))
        self.asleep -= set(tags)

    def collective_rpc(self, method: str, kwargs: dict) -> None:
        assert "weights" not in self.asleep, "a push into sleeping weights"
        self.calls.append(("push", method))

    def reset_prefix_cache(self) -> None:
        self.calls.append(("reset_prefix_cache",))

    def generate(self, prompts, params, use_tqdm=False):
        assert not self.asleep, f"sampling with {self.asleep} asleep"
        self.calls.append(("generate", len(prompts)))
        position = {3: types.SimpleNamespace(logprob=-0.1), 4: types.SimpleNamespace(logprob=-2.0)}
        out = types.SimpleNamespace(token_ids=[3, 3], logprobs=[position, position])
        return [types.SimpleNamespace(outputs=[out]) for _ in prompts]


@pytest.fixture
def fake_vllm(monkeypatch):
    """A `vllm` module whose LLM records into the returned list, on a machine that claims CUDA."""
    calls: list = []
    module = types.ModuleType("vllm")
    module.LLM = lambda **kw: RecordingLLM(calls, **kw)
    module.SamplingParams = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return calls


@pytest.fixture
def pair():
    tok = build_char_tokenizer()
    model = build_tiny_qwen(len(tok), hidden_size=64, num_layers=1, num_heads=2, seed=0,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                            bos_token_id=tok.bos_token_id)
    return model, tok


def names(calls):
    return [c[0] if c[0] not in ("sleep", "wake_up") else f"{c[0]}:{c[1]}" for c in calls
            if c[0] != "reset_prefix_cache"]


def sample(engine):
    ids = torch.tensor([[5, 6, 7]])
    return engine.generate(ids, torch.ones_like(ids), max_new_tokens=2, temperature=1.0, top_p=1.0, topk=2, seed=0)


def step(engine, model, version):
    """What the trainer does per step: push the sampling model's weights, sample, release for the update."""
    push_weights(engine, model, version)
    batch = sample(engine)
    engine.release()
    return batch


def test_level_2_wakes_weights_pushes_then_wakes_the_kv_cache(fake_vllm, pair):
    from jackpot.rollout.vllm import VLLMRolloutEngine

    model, tok = pair
    engine = VLLMRolloutEngine(model, tok, sleep_level=2)
    for version in (1, 2, 2):  # the last: the model did not change, but level 2 dropped the weights
        step(engine, model, version)
    assert fake_vllm[0][1]["enable_sleep_mode"] is True and "distributed_executor_backend" not in fake_vllm[0][1]
    assert names(fake_vllm) == [
        "build", "generate", "sleep:2",                                        # built from version 1's weights
        "wake_up:('weights',)", "push", "wake_up:('kv_cache',)", "generate", "sleep:2",
        "wake_up:('weights',)", "push", "wake_up:('kv_cache',)", "generate", "sleep:2",
    ]


def test_level_1_keeps_the_weights_of_a_frozen_model(fake_vllm, pair):
    from jackpot.rollout.vllm import VLLMRolloutEngine

    model, tok = pair
    engine = VLLMRolloutEngine(model, tok, sleep_level=1)
    for version in (1, 1):  # a frozen sampling model: one version for the run, never pushed again
        batch = step(engine, model, version)
    assert batch.model_version == 1
    assert names(fake_vllm) == ["build", "generate", "sleep:1",
                                "wake_up:('weights',)", "wake_up:('kv_cache',)", "generate", "sleep:1"]


def test_level_0_never_sleeps_and_release_is_harmless(fake_vllm, pair):
    from jackpot.rollout.vllm import VLLMRolloutEngine

    model, tok = pair
    engine = VLLMRolloutEngine(model, tok)  # sleep_level 0
    engine.release()  # not built yet: nothing to do
    step(engine, model, 1)
    step(engine, model, 2)
    assert "enable_sleep_mode" not in fake_vllm[0][1]
    assert names(fake_vllm) == ["build", "generate", "push", "generate"]
    assert [c[0] for c in fake_vllm][2:4] == ["push", "reset_prefix_cache"]  # no KV cached from the old weights


def test_level_2_without_a_push_is_a_bug_not_garbage(fake_vllm, pair):
    from jackpot.rollout.vllm import VLLMRolloutEngine

    model, tok = pair
    engine = VLLMRolloutEngine(model, tok, sleep_level=2)
    step(engine, model, 1)
    with pytest.raises(RuntimeError, match="dropped its weights"):
        sample(engine)  # sampling from dropped weights would be silent garbage


def test_under_torchrun_the_engine_joins_the_launcher_on_the_rank_device(fake_vllm, pair, monkeypatch):
    from jackpot.rollout.vllm import VLLMRolloutEngine

    devices = []
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    model, tok = pair
    sample(VLLMRolloutEngine(model, tok))
    kwargs = fake_vllm[0][1]
    assert kwargs["distributed_executor_backend"] == "external_launcher" and kwargs["seed"] == 1 and devices == [1]


def test_sleep_level_on_cpu_and_a_fraction_too_small_are_refused(pair, monkeypatch):
    from jackpot.rollout.vllm import VLLMRolloutEngine, check_memory_fraction

    model, tok = pair
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match=r"rollout.sleep_level=1: vLLM's sleep mode exists on CUDA"):
        VLLMRolloutEngine(model, tok, sleep_level=1)
    with pytest.raises(InputError, match=r"sleep_level must be one of \[0, 1, 2\], got 3"):
        VLLMRolloutEngine(model, tok, sleep_level=3)
    # a 1.72B-parameter model in bf16 (3.2 GiB) on an 80 GiB card: 0.03 leaves vLLM 2.4 GiB
    with pytest.raises(InputError, match=r"gpu_memory_utilization=0.03 gives vLLM 2.40 GiB of the device's 80.00 "
                                         r"GiB, less than the sampling model's weights alone \(3.20 GiB\)"):
        check_memory_fraction(0.03, 1_720_000_000 * 2, 80 * 2**30)
    check_memory_fraction(0.3, 1_720_000_000 * 2, 80 * 2**30)
