"""FLOPs and modelled GPU seconds of a step (jackpot.train.costs): against hand counts on a tiny model, and as the
trainer logs them and the summary adds them up."""

from __future__ import annotations

import json
import math

import pytest
import torch
from cli_helpers import TINY_MODELS

from jackpot.cli import main as cli_main
from jackpot.metrics import read_metrics
from jackpot.train.config import build_config
from jackpot.train.costs import (
    PHASES,
    CostMeter,
    ModelSize,
    Roofline,
    forward_flops,
    generation_flops,
    generation_seconds,
    step_flops,
)

# hidden 8, 1 layer, 2 heads of 4, 1 KV head, MLP 16, vocabulary 10, tied head. Matrix products by hand:
# q 8x8 = 64, k 8x4 = 32, v 8x4 = 32, o 8x8 = 64, gate, up, down 8x16 = 128 each, head 8x10 = 80: N = 656, H = 80.
# KV bytes a token: 2 (K, V) x 1 layer x 1 head x 4 x 2 bytes = 16.
HAND = ModelSize(matmul_params=656, head_params=80, kv_bytes_per_token=16)
PROMPT, RESPONSE = torch.tensor([3, 2]), torch.tensor([2, 0])


def _tiny_model():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1, head_dim=4, intermediate_size=16,
                                        tie_word_embeddings=True))


def test_model_size_is_the_hand_count():
    assert ModelSize.of(_tiny_model()) == HAND


def test_flops_are_the_hand_count():
    # forward: 2 x 576 x (3 + 2 + 2 + 0) + 2 x 80 x 2 = 8,064 + 320; generation feeds P + R - 1 = 4 tokens of row 0,
    # none of row 1 (no response): 2 x 576 x 4 + 2 x 80 x 2
    assert forward_flops(HAND, PROMPT, RESPONSE) == 8384
    assert generation_flops(HAND, PROMPT, RESPONSE) == 4928
    decoupled = step_flops(sampler=HAND, policy=HAND, rollout_model=HAND, trained_rollout=True, prompt=PROMPT,
                           response=RESPONSE, epochs=2)
    assert decoupled == {"generation": 4928, "prepare": 2 * 8384, "update_policy": 2 * 3 * 8384,
                         "update_rollout_model": 2 * 3 * 8384}
    on_policy = step_flops(sampler=HAND, policy=HAND, rollout_model=None, trained_rollout=False, prompt=PROMPT,
                           response=RESPONSE, epochs=1, init_policy=True, current_policy=True)
    assert on_policy == {"generation": 4928, "prepare": 2 * 8384, "update_policy": 4 * 8384,
                         "update_rollout_model": 0.0}


@pytest.mark.parametrize("bandwidth, expected", [
    # compute-bound: prefill 2 x 576 x 3 + 2 x 80 x 1 = 3,616 FLOPs / 50 = 72.32 s (weights 1,312 B / 1,000 = 1.3 s);
    # step t = 2, row 0 only: 2 x 656 = 1,312 FLOPs / 50 = 26.24 s (bytes 1,312 + 16 x (3 + 1) = 1,376: 1.4 s)
    (1000.0, 72.32 + 26.24),
    # memory-bound: prefill 1,312 B / 10 = 131.2 s, step t = 2: 1,376 B / 10 = 137.6 s
    (10.0, 131.2 + 137.6),
])
def test_generation_seconds_are_the_roofline_by_hand(bandwidth, expected):
    card = Roofline(bandwidth=bandwidth, peak_flops=100.0, efficiency=0.5, weight_bytes=2)
    assert generation_seconds(HAND, PROMPT, RESPONSE, card) == pytest.approx(expected, rel=1e-12)


def test_bad_lengths_are_refused():
    with pytest.raises(ValueError, match="non-negative"):
        forward_flops(HAND, torch.tensor([1, 2]), torch.tensor([1]))
    with pytest.raises(ValueError, match="non-negative"):
        generation_flops(HAND, torch.tensor([1]), torch.tensor([-1]))


def test_the_trainer_logs_each_phase_and_the_summary_adds_them_up(tmp_path, cache):
    """Two steps of the tiny default: every phase's FLOPs logged, the totals their sums; the generation FLOPs and
    the rollout model's update are the sampler's (the rollout model's), sized from the trained models."""
    out = tmp_path / "run"
    args = [*TINY_MODELS, "train.prompts_per_step=2", "train.group_size=2", "train.eval_prompts=4",
            "train.eval_samples=2", "tensorboard=false", f"cache_dir={cache}", "train.steps=2"]
    assert cli_main(["train", "--out", str(out), "--no-progress", *args]) == 0
    steps = [r for r in read_metrics(out) if r["step"] > 0]
    for r in steps:
        phases = [r[f"perf/flops_{p}"] for p in PHASES]
        assert all(v > 0 for v in phases) and r["perf/flops"] == pytest.approx(sum(phases), rel=1e-12)
        seconds = [r[f"perf/gpu_model_s_{p}"] for p in PHASES]
        assert r["perf/gpu_model_s"] == pytest.approx(sum(seconds), rel=1e-12)
        # 3 forwards' worth for each trained model; the policy is the larger one
        assert r["perf/flops_update_policy"] > r["perf/flops_update_rollout_model"] > r["perf/flops_generation"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["flops"] == pytest.approx(sum(r["perf/flops"] for r in steps), rel=1e-12)
    assert summary["flops_by_phase"]["generation"] == pytest.approx(
        sum(r["perf/flops_generation"] for r in steps), rel=1e-12)
    assert "modelled" in summary["gpu_model"] and math.isfinite(summary["gpu_model_s"])


def test_the_meter_uses_the_sampler_of_the_mode():
    """On-policy the policy samples and nothing else is trained; decoupled the rollout model samples."""
    small = ModelSize(matmul_params=100, head_params=10, kv_bytes_per_token=4)
    on = CostMeter.of(build_config(None, ["train.mode=on-policy"]), _tiny_model(), None)
    assert on.metrics(PROMPT, RESPONSE)["perf/flops_generation"] == 4928
    assert on.metrics(PROMPT, RESPONSE)["perf/flops_update_rollout_model"] == 0
    meter = CostMeter(HAND, small, trained_rollout=True, epochs=1, init_policy=False, current_policy=False)
    assert meter.metrics(PROMPT, RESPONSE)["perf/flops_generation"] == generation_flops(small, PROMPT, RESPONSE)
