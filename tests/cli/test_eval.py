"""`jackpot eval` end to end on a tiny model (as a user runs it), and its Mean@k / Pass@k against references."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jackpot.models.loading import build_tiny_qwen, save_model_and_tokenizer
from jackpot.models.tokenizer import build_byte_tokenizer
from jackpot.tasks import FileTask, pass_at_k
from jackpot.train.pretrain import pretrain

ROOT = Path(__file__).resolve().parents[2]


def _tiny_model_dir(path: Path, data: Path) -> Path:
    """A tiny byte-level model fine-tuned for a few steps to answer "7", so samples are partly right."""
    tok = build_byte_tokenizer()
    model = build_tiny_qwen(len(tok), hidden_size=32, num_layers=1, num_heads=2, seed=0,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    task = FileTask(str(data), prompt_field="q", answer_field="a", eval_fraction=0.0)
    pretrain(task, tok, model, steps=25, batch_size=8, lr=1e-2, seed=0, progress=False)
    return save_model_and_tokenizer(model, tok, path)


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "jackpot.cli", *argv], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_jackpot_eval_writes_mean_and_pass_at_k_and_every_completion(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"q": f"Q{i}?", "a": "7"}) + "\n" for i in range(6)))
    model = _tiny_model_dir(tmp_path / "model", data)
    out = tmp_path / "evals" / "e.json"
    result = _run("eval", "--model", str(model), "--k", "3", "--out", str(out), "--prompts", "9",
                  "--batch-size", "5", "--max-new-tokens", "3", "--no-progress", "task.name=file",
                  f"task.options={{path: {data}, prompt_field: q, answer_field: a, eval_fraction: 1.0}}")
    assert result.returncode == 0, result.stderr
    summary = json.loads(out.read_text())
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(len(r["completions"]) == 3 == len(r["rewards"]) for r in rows)
    assert {r["prompt"] for r in rows} == {f"Q{i}?" for i in range(6)}
    assert all(len(c) <= 3 for r in rows for c in r["completions"])  # 3 bytes: at most 3 characters
    rewards = [r["rewards"] for r in rows]
    assert 0 < sum(map(sum, rewards)) < 18, rewards  # some samples right, some wrong
    assert summary["mean@3"] == pytest.approx(sum(map(sum, rewards)) / 18)
    assert summary["pass@3"] == pytest.approx(sum(any(x > 0.5 for x in r) for r in rewards) / 6)
    assert summary["task"]["options"]["verifier"] == "math" and summary["sampling"]["max_new_tokens"] == 3
    assert "mean@3" in result.stdout
    # 9 asked of a 6-problem split: each problem once, both counts recorded, a one-line notice
    assert summary["prompts"] == 6 and summary["prompts_requested"] == 9 and "(6 problems;" in result.stdout
    assert "--prompts 9, but the eval split gave 6 distinct problems; evaluating those 6" in result.stderr


def test_jackpot_eval_bad_input_is_one_clear_error(tmp_path):
    result = _run("eval", "--model", str(tmp_path / "missing"), "--k", "2", "--out", str(tmp_path / "e.json"),
                  "task.name=addition")
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr
    result = _run("eval", "--model", "x", "--k", "0", "--out", str(tmp_path / "e.json"))
    assert result.returncode == 2 and "--k must be >= 1" in result.stderr
    result = _run("eval", "--model", "x", "--top-p", "1.5", "--out", str(tmp_path / "e.json"))
    assert result.returncode == 2 and "--top-p must be in (0, 1], got 1.5" in result.stderr
    result = _run("eval", "--model", "x", "--engine", "sglang", "--out", str(tmp_path / "e.json"))
    assert result.returncode == 2 and "--engine: invalid choice: 'sglang'" in result.stderr
    result = _run("eval", "--model", "x", "--out", str(tmp_path / "e.json"), "rollout.kv_cache_gib=2")
    assert result.returncode == 2 and "rollout.engine=hf has no such option" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("n", "c", "k"), [(10, 3, 4), (20, 0, 5), (20, 19, 2), (200, 7, 100), (8, 8, 8), (5, 1, 1)])
def test_pass_at_k_equals_the_float64_combinatorial_formula(n, c, k):
    row = [1.0] * c + [0.0] * (n - c)
    expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)  # exact integers, one float64 division
    assert pass_at_k([row], k) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def _tiny_addition_model():
    from jackpot.models.tokenizer import build_char_tokenizer
    from jackpot.tasks import AdditionTask

    tok = build_char_tokenizer()
    model = build_tiny_qwen(len(tok), hidden_size=32, num_layers=1, num_heads=2, seed=0,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    task = AdditionTask(digits=1)
    pretrain(task, tok, model, steps=40, batch_size=32, lr=3e-3, seed=0, progress=False)
    return tok, model, task


def test_sample_and_score_greedy_is_transformers_greedy_decoding():
    """The one evaluation function decodes greedily through the engine at GREEDY_TOP_P (the pre-training
    accuracy's `eval/greedy_acc_*`): the same completions as transformers' do_sample=False."""
    from jackpot.eval import GREEDY_TOP_P, sample_and_score
    from jackpot.rollout import HFRolloutEngine, decode_responses, encode_prompts

    tok, model, task = _tiny_addition_model()
    examples = task.examples("eval", 24, 0)
    scored = sample_and_score(HFRolloutEngine(model, tok), tok, task, examples, k=2, max_new_tokens=4,
                              temperature=1.0, top_p=GREEDY_TOP_P, seed=None)
    ids, mask = encode_prompts(tok, [ex.prompt for ex in examples])
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=4,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    response = out[:, ids.shape[1]:]
    ends = (response == tok.eos_token_id).long()
    greedy = decode_responses(tok, response, ((ends.cumsum(1) - ends) == 0).float())
    assert scored.completions == [c for c in greedy for _ in range(2)]
    assert scored.rewards.shape == (24, 2) and scored.rewards.dtype == torch.float64
    expected = [float(task.reward(ex, c)) for ex, c in zip(examples, greedy)]
    assert scored.mean_at_k() == pytest.approx(sum(expected) / 24)
    assert scored.pass_at_k() == pytest.approx(sum(r > 0.5 for r in expected) / 24)


def test_sample_and_score_in_batches_with_row_uniforms_equals_all_at_once():
    """With one row of uniforms per completion (the trainer's evaluation), how the completions are split into
    generate calls changes nothing; without them each call is seeded from the seed, so a run repeats."""
    from jackpot.eval import sample_and_score
    from jackpot.rollout import HFRolloutEngine

    tok, model, task = _tiny_addition_model()
    examples = task.examples("eval", 6, 1)
    u = torch.rand(18, 4, generator=torch.Generator().manual_seed(0))
    kw = dict(k=3, max_new_tokens=4, temperature=1.0, seed=5, uniforms=u)
    whole = sample_and_score(HFRolloutEngine(model, tok), tok, task, examples, **kw)
    split = sample_and_score(HFRolloutEngine(model, tok), tok, task, examples, batch_size=4, **kw)
    assert whole.completions == split.completions and torch.equal(whole.rewards, split.rewards)
    kw.pop("uniforms")
    once = sample_and_score(HFRolloutEngine(model, tok), tok, task, examples, batch_size=4, **kw)
    again = sample_and_score(HFRolloutEngine(model, tok), tok, task, examples, batch_size=4, **kw)
    assert once.completions == again.completions
