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

pytestmark = pytest.mark.slow  # end-to-end runs that pre-train tiny byte-level models

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


# ------------------------------------------------------------------ the tiny model's pre-training on text
def test_a_text_tasks_sft_step_is_capped_in_tokens_and_arithmetic_steps_are_not():
    from jackpot.models.tokenizer import build_tokenizer
    from jackpot.tasks import Example, make_task
    from jackpot.train.pretrain import SFT_BATCH_TOKENS, capped_batch_size, sft_batch

    byte, char = build_tokenizer("byte"), build_tokenizer("char")
    logic = make_task("reasoning-gym", dataset="propositional_logic", size=50).examples("train", 64, 0)
    n = capped_batch_size(byte, logic)
    assert 1 <= n < 64 and sft_batch(byte, logic[:n])["input_ids"].numel() <= SFT_BATCH_TOKENS
    assert capped_batch_size(byte, [*logic[:3], Example("x" * 4 * SFT_BATCH_TOKENS, "y")]) == 1
    for name in ("addition", "chain_sum", "multiply"):  # the offline default's recipe is unchanged
        assert capped_batch_size(char, make_task(name).examples("train", 64, 0)) == 64


def test_pretraining_without_a_progress_bar_reports_step_loss_and_time_left(monkeypatch, capsys):
    from jackpot.models.loading import build_tiny_qwen
    from jackpot.models.tokenizer import build_tokenizer
    from jackpot.tasks import make_task
    from jackpot.train import pretrain as sft

    monkeypatch.setattr(sft, "LOG_EVERY_S", 0.0)  # a line at every step
    tok = build_tokenizer("byte")
    model = build_tiny_qwen(len(tok), hidden_size=16, num_layers=1, num_heads=2, seed=0,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                            bos_token_id=tok.bos_token_id)
    task = make_task("reasoning-gym", dataset="chain_sum", size=50)
    stats = sft.pretrain(task, tok, model, steps=3, batch_size=64, lr=1e-3, seed=0, progress=False)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and stats["sft/batch_size"] < 64
    assert lines[0].startswith("pre-train (SFT): step 1/3, loss ") and lines[-1].startswith("pre-train (SFT): step 3/3")
    assert all(" elapsed, about " in line and line.endswith(" left") for line in lines)
    sft.pretrain(task, tok, model, steps=2, batch_size=4, lr=1e-3, seed=0, progress=True)  # the bar instead
    assert "step 1/2" not in capsys.readouterr().err
