"""`jackpot train` on a user's GSM8K-style JSONL and on a reasoning-gym task, end to end on tiny byte-level models."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jackpot.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "policy.hidden_size=32", "policy.num_layers=1", "policy.num_heads=2", "policy.sft_steps=2",
    "rollout_model.hidden_size=16", "rollout_model.num_layers=1", "rollout_model.num_heads=2",
    "rollout_model.sft_steps=2", "train.prompts_per_step=2", "train.group_size=2", "train.eval_prompts=2",
    "train.eval_samples=2", "train.steps=1", "tensorboard=false", "train.threads=1",
    "sampling.max_new_tokens=12",
]
GSM = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
               "$<<0.2*50=10>>10.\n#### 10"},
] * 10


def _train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "jackpot.cli", "train", "--out", str(tmp_path / "run"),
                           "--no-progress", *TINY, f"cache_dir={tmp_path / 'cache'}", *overrides],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def _check_run(run: Path) -> dict:
    records = read_metrics(run)
    assert [r["step"] for r in records] == [0, 1]
    for key in ("reward/mean", "obrs/accept_rate", "eval/accuracy"):
        assert math.isfinite(records[-1][key]), key
    return yaml.safe_load((run / "config.yaml").read_text())


def test_gsm8k_style_jsonl_trains_from_the_cli(tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in GSM))
    template = "'Question: {prompt}\\nAnswer:'"
    options = f"{{path: {data}, prompt_field: question, template: {template}}}"
    result = _train(tmp_path, "task.name=file", f"task.options={options}")
    assert result.returncode == 0, result.stderr[-3000:]
    config = _check_run(tmp_path / "run")
    assert config["task"]["options"]["verifier"] == "math" and "digits" not in config["task"]["options"]
    tokenizer = json.loads(next((tmp_path / "cache").glob("policy-*/tokenizer.json")).read_text())
    assert len(tokenizer["model"]["vocab"]) == 260  # byte-level: the English questions encode without <unk>


def test_reasoning_gym_task_trains_from_the_cli(tmp_path):
    pytest.importorskip("reasoning_gym")
    result = _train(tmp_path, "task.name=reasoning-gym", "task.options={dataset: chain_sum, size: 200, max_terms: 3}")
    assert result.returncode == 0, result.stderr[-3000:]
    config = _check_run(tmp_path / "run")
    assert config["task"]["options"]["dataset"] == "chain_sum" and config["task"]["options"]["seed"] == 0


def test_a_file_task_without_its_path_is_one_clear_error(tmp_path):
    result = _train(tmp_path, "task.name=jsonl")
    assert result.returncode == 2 and "needs option(s) ['path']" in result.stderr and "Traceback" not in result.stderr
