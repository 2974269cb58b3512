"""The benchmarks still run against the current API (on tiny sizes; their timings are not checked here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(("name", "argv"), [
    ("bench_weights", ["--batch", "2", "--length", "16", "--repeats", "1"]),
    ("bench_batch_lambda", ["--tokens", "500", "--repeats", "1", "--iters", "5"]),
    ("bench_normalizer", ["--positions", "8", "--vocab", "64", "--chunk-sizes", "16,64", "--k", "4", "--repeats", "1"]),
    ("bench_decoupled_speed", ["--pairs", "16x1:32x2", "--batch", "4", "--length", "4", "--vocab", "64",
                               "--steps", "1"]),
    ("bench_async", ["--pairs", "16x1:32x2", "--batch", "4", "--length", "4", "--vocab", "64", "--steps", "1"]),
    ("bench_rollout_engines", ["--hidden", "16", "--layers", "1", "--batch", "3", "--length", "4", "--vocab", "64",
                               "--repeats", "1", "--engines", "hf,hf-static"]),
    ("bench_threads", ["--steps", "1", "--threads", "1", "--overrides", "policy.hidden_size=16", "policy.num_layers=1",
                       "policy.num_heads=2", "policy.sft_steps=1", "rollout_model.hidden_size=16",
                       "rollout_model.num_layers=1", "rollout_model.num_heads=2", "rollout_model.sft_steps=1",
                       "train.prompts_per_step=2", "train.group_size=2", "train.eval_prompts=2"]),
])
def test_benchmark_runs_on_tiny_sizes(name, argv, capsys):
    code = _module(name).main(argv)
    assert code in (0, 1)  # 1: its speed goal was missed on this (shared, noisy) machine — not a test failure
    assert "verdict" in capsys.readouterr().out.lower()
