"""benchmarks/memory_plan.py and jackpot.models.shapes: parameter counts against transformers' own models
(built on the meta device: no memory, no download), and the plan's parts by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from jackpot.models.shapes import SHAPES, VOCAB, parameters

GiB = 1024 ** 3


def _plan():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "memory_plan.py"
    spec = importlib.util.spec_from_file_location("memory_plan", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", list(SHAPES))
def test_parameter_count_matches_the_transformers_model(name):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    h, inter, heads, kv, hd, layers, tied = SHAPES[name]
    qwen3 = name.startswith("qwen3")
    config_cls, model_cls = (Qwen3Config, Qwen3ForCausalLM) if qwen3 else (Qwen2Config, Qwen2ForCausalLM)
    extra = {"head_dim": hd} if qwen3 else {}
    config = config_cls(vocab_size=VOCAB, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied, **extra)
    with torch.device("meta"):
        model = model_cls(config)
    assert parameters(name) == sum(p.numel() for p in model.parameters())


def test_plan_parts_by_hand():
    plan = _plan()
    kw = dict(gpus=8, prompts=64, group=8, prompt_len=512, response=8192, micro_tokens=16384, head_chunk=1024,
              topk=20)
    p = plan.parts("qwen3-1.7b", "qwen3-8b", **kw)
    assert p["states"] == pytest.approx(16 * (parameters("qwen3-8b") + parameters("qwen3-1.7b")) / 8 / GiB)
    # 64 sequences per GPU x 8704 positions x 28 layers x (K and V) x 8 kv heads x 128 x 2 bytes
    assert p["kv cache"] == pytest.approx(64 * 8704 * 28 * 2 * 8 * 128 * 2 / GiB)
    assert p["head"] == pytest.approx(3 * 1024 * VOCAB * 4 / GiB)
    chunked = plan.parts("qwen3-1.7b", "qwen3-8b", **kw, gen_batch=16)
    assert chunked["kv cache"] == pytest.approx(p["kv cache"] / 4)
    frozen = plan.parts("qwen3-1.7b", "qwen3-8b", **kw, joint=False)
    assert frozen["states"] < p["states"] and frozen["activations"] < p["activations"]
