"""Tests for jackpot.tasks: arithmetic tasks, splits, rewards, registry, jsonl files, pass@k."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jackpot.tasks import (
    TASKS,
    AdditionTask,
    ChainSumTask,
    Example,
    JsonlTask,
    MultiplyTask,
    Task,
    extract_answer,
    make_task,
    mean_at_k,
    pass_at_k,
)
from jackpot.tasks import files as files_module

# ------------------------------------------------------------------------------------------ arithmetic


ALL_TASKS = [AdditionTask(digits=2), ChainSumTask(terms=3, digits=1), MultiplyTask(digits=1)]


@pytest.mark.parametrize("task", ALL_TASKS)
def test_examples_are_correct_reproducible_and_satisfy_protocol(task):
    assert isinstance(task, Task)
    train = task.examples("train", 50, seed=3)
    assert len(train) == 50 and train == task.examples("train", 50, seed=3)
    assert train != task.examples("train", 50, seed=4)
    for ex in train:
        assert ex.prompt.endswith("=")
        assert str(eval(ex.prompt[:-1])) == ex.answer  # the prompt is a Python expression
        assert len(ex.answer) <= task.max_answer_len
        assert task.reward(ex, ex.answer) == 1.0


@pytest.mark.parametrize("task", [AdditionTask(digits=2), ChainSumTask(terms=3, digits=1)])
def test_train_and_eval_are_disjoint(task):
    train = {ex.prompt for ex in task.examples("train", 2000, seed=0)}
    evals = {ex.prompt for ex in task.examples("eval", 200, seed=0)}
    assert evals and not train & evals


def test_addition_example_format():
    assert AdditionTask(digits=2).reward(Example("12+34=", "46"), "46") == 1.0
    assert ChainSumTask().reward(Example("3+5+2=", "10"), "10\n3+1=4") == 1.0


@pytest.mark.parametrize("completion,expected", [
    ("46", 1.0), (" 46 ", 1.0), ("46<eos>", 1.0), ("46\n99", 1.0), ("46<eos>garbage", 1.0),
    ("046", 0.0), ("46.0", 0.0), ("4 6", 0.0), ("", 0.0), ("\n46", 0.0), ("47", 0.0),
])
def test_reward_parses_first_line_exactly(completion, expected):
    assert AdditionTask().reward(Example("12+34=", "46"), completion) == expected


def test_extract_answer_cuts_at_first_stop():
    assert extract_answer(" 12 <eos>\n3") == "12"
    assert extract_answer("7<|im_end|>") == "7"


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="digits"):
        AdditionTask(digits=0)
    with pytest.raises(ValueError, match="terms"):
        ChainSumTask(terms=1)
    with pytest.raises(ValueError, match="split"):
        AdditionTask().examples("test", 3, 0)
    with pytest.raises(ValueError, match="n must be"):
        AdditionTask().examples("train", -1, 0)


def test_registry_and_make_task():
    assert set(TASKS) >= {"addition", "chain_sum", "multiply", "jsonl"}
    assert make_task("addition", digits=3) == AdditionTask(digits=3)
    with pytest.raises(ValueError, match="unknown task 'nope'.*addition"):
        make_task("nope")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['digitz'\]"):
        make_task("addition", digitz=2)


# ----------------------------------------------------------------------------------------------- jsonl

def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return path


def test_jsonl_task_reads_splits_and_rewards(tmp_path):
    rows = [{"q": f"what is {i}+1?", "a": str(i + 1)} for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    task = JsonlTask(path, prompt_key="q", answer_key="a", eval_fraction=0.5)
    train, evals = task.examples("train", 100, 0), task.examples("eval", 5, 0)
    assert len(train) == 100 and len(evals) == 5
    assert not {e.prompt for e in train} & {e.prompt for e in evals}
    assert task.examples("eval", 5, 0) == evals
    ex = evals[0]
    assert task.reward(ex, f" {ex.answer}\nbecause") == 1.0
    assert task.reward(ex, "-1") == 0.0


def test_jsonl_task_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        JsonlTask(tmp_path / "nope.jsonl")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing key\(s\) \['answer'\]"):
        JsonlTask(bad)
    one_row = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "answer": "1"}])
    only_train = JsonlTask(one_row, eval_fraction=0.0)
    with pytest.raises(ValueError, match="no examples in split 'eval'"):
        only_train.examples("eval", 1, 0)


def test_jsonl_math_verify_equivalence_when_available(tmp_path):
    pytest.importorskip("math_verify")
    task = JsonlTask(write_jsonl(tmp_path / "m.jsonl", [{"prompt": "half?", "answer": "\\frac{1}{2}"}]),
                     eval_fraction=1.0)
    ex = task.examples("eval", 1, 0)[0]
    assert task.reward(ex, "0.5") == 1.0
    assert task.reward(ex, "0.6") == 0.0
    assert JsonlTask(task.path, eval_fraction=1.0, use_math_verify=False).reward(ex, "0.5") == 0.0


def test_jsonl_exact_match_without_math_verify(tmp_path, monkeypatch):
    monkeypatch.setattr(files_module, "math_verify", None)
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "p", "answer": " 72 "}])
    task = JsonlTask(path, eval_fraction=1.0)
    ex = task.examples("eval", 1, 0)[0]
    assert task.reward(ex, "72") == 1.0 and task.reward(ex, "72.0") == 0.0


# --------------------------------------------------------------------------------------------- metrics

def slow_pass_at_k(row, k):
    """Reference: fraction of all k-subsets of the n samples containing at least one correct one."""
    subsets = list(itertools.combinations(range(len(row)), k))
    return sum(any(row[i] > 0.5 for i in s) for s in subsets) / len(subsets)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0.0, 1.0]), min_size=6, max_size=6), min_size=1, max_size=4),
       st.integers(1, 6))
def test_pass_at_k_matches_subset_enumeration(rows, k):
    expected = sum(slow_pass_at_k(r, k) for r in rows) / len(rows)
    assert pass_at_k(np.array(rows), k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_hand_worked():
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5 ; n=4, c=0: 0 ; c=3, k=2: 1 (n-c=1 < k)
    rewards = [[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 1]]
    assert pass_at_k(rewards, 2) == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert pass_at_k(rewards, 1) == pytest.approx(mean_at_k(rewards))
    assert mean_at_k([[1.0, 0.0], [1.0, 1.0]]) == 0.75
    big = np.zeros((1, 200))
    big[0, :3] = 1
    assert pass_at_k(big, 100) == pytest.approx(1 - math.comb(197, 100) / math.comb(200, 100))


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="k must be in"):
        pass_at_k([[1, 0]], 3)
    with pytest.raises(ValueError, match="rewards must be"):
        mean_at_k([1.0, 0.0])
