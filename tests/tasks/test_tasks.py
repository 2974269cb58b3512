"""Tests for jackpot.tasks: arithmetic, file and reasoning-gym tasks, answer checking, registry, pass@k."""

from __future__ import annotations

import itertools
import json
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jackpot.tasks import (
    TASKS,
    AdditionTask,
    ChainSumTask,
    Example,
    FileTask,
    MultiplyTask,
    Task,
    default_max_new_tokens,
    extract_answer,
    final_answer,
    is_correct,
    make_task,
    mean_at_k,
    pass_at_k,
    task_options,
)

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
    assert set(TASKS) >= {"addition", "chain_sum", "multiply", "jsonl", "file", "reasoning-gym"}
    assert make_task("addition", digits=3) == AdditionTask(digits=3)
    with pytest.raises(ValueError, match="unknown task 'nope'.*addition"):
        make_task("nope")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['digitz'\]"):
        make_task("addition", digitz=2)
    with pytest.raises(ValueError, match=r"task 'file' needs option\(s\) \['path'\]"):
        make_task("file")


def test_each_task_gets_its_own_default_options():
    assert task_options("addition", {}) == {"digits": 2, "eval_fraction": 0.1}
    opts = task_options("file", {"path": "x.jsonl"})
    assert opts["verifier"] == "math" and "digits" not in opts
    with pytest.raises(ValueError, match=r"task 'jsonl' got unknown option\(s\) \['digits'\]"):
        task_options("jsonl", {"path": "x.jsonl", "digits": 2})
    assert default_max_new_tokens("addition", {}) == 6  # longest answer "198" + 3
    assert default_max_new_tokens("multiply", {"digits": 2}) == 7
    assert default_max_new_tokens("file", {"path": "x.jsonl"}) == 1024


# ------------------------------------------------------------------------------------------ file tasks

def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return path


def test_jsonl_task_reads_splits_and_rewards(tmp_path):
    rows = [{"q": f"what is {i}+1?", "a": str(i + 1)} for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    task = make_task("jsonl", path=str(path), prompt_field="q", answer_field="a", eval_fraction=0.5)
    train, evals = task.examples("train", 100, 0), task.examples("eval", 5, 0)
    assert len(train) == 100 and len(evals) == 5
    assert not {e.prompt for e in train} & {e.prompt for e in evals}
    assert task.examples("eval", 5, 0) == evals
    ex = evals[0]
    assert task.reward(ex, f" {ex.answer}\n") == 1.0
    assert task.reward(ex, "-1") == 0.0


def test_file_task_scores_the_final_answer_of_the_whole_completion(tmp_path):
    gsm = {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
           "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72.\n#### 72"}
    task = FileTask(str(write_jsonl(tmp_path / "gsm.jsonl", [gsm])), prompt_field="question", eval_fraction=1.0,
                    template="Question: {prompt}\nAnswer:")
    ex = task.examples("eval", 1, 0)[0]
    assert ex.prompt == "Question: " + gsm["question"] + "\nAnswer:"
    assert task.reward(ex, "Step 1: 48/2=24\n48+24=72") == 1.0          # last number, not the first line
    assert task.reward(ex, "48/2 = 24, so 24 + 48 = 72 clips.\n#### 72") == 1.0
    assert task.reward(ex, "the total is \\boxed{72}. Check: 70") == 1.0  # \\boxed wins over the last number
    assert task.reward(ex, "72 clips in May? No: 24 in May") == 0.0
    assert task.reward(ex, gsm["answer"]) == 1.0
    assert task.reward(ex, "") == 0.0


@pytest.mark.parametrize(("completion", "reference", "math", "exact"), [
    ("so \\boxed{\\frac{1}{2}}", "0.5", True, False),       # LaTeX fraction vs decimal
    ("I think 1/2", "\\frac{1}{2}", True, False),
    ("3,000 dollars", "3000", True, True),                 # thousands separator
    ("#### 72\nthen 5", "72", True, True),                 # #### beats a later number
    ("\\boxed{x^2+1}", "\\boxed{1+x^2}", True, False),      # symbolic equality
    ("The answer is 73", "#### 72", False, False),
    ("no number here", "72", False, False),
    ("-3", "-3", True, True),
])
def test_math_verify_on_worked_examples(completion, reference, math, exact):
    assert is_correct(completion, reference, "math") is math
    assert is_correct(completion, reference, "exact") is exact


@pytest.mark.parametrize(("text", "answer"), [
    ("a \\boxed{\\frac{1}{2}} b", "\\frac{1}{2}"), ("x #### 72\nmore 5", "72"), ("1, then 2,500.", "2500"),
    ("\\boxed{1} and \\boxed{2}", "2"), ("nothing", None), ("-0.5 and 3/4", "3/4"),
])
def test_final_answer_extraction(text, answer):
    assert final_answer(text) == answer


def test_format_reward_and_exact_verifier(tmp_path):
    path = str(write_jsonl(tmp_path / "m.jsonl", [{"prompt": "p", "answer": "72"}]))
    task = FileTask(path, eval_fraction=1.0, format_reward=0.25)
    ex = task.examples("eval", 1, 0)[0]
    assert task.reward(ex, "#### 72") == 1.25 and task.reward(ex, "72") == 1.0 and task.reward(ex, "#### 7") == 0.25
    exact = FileTask(path, eval_fraction=1.0, verifier="exact")
    assert exact.reward(ex, "so 72") == 1.0 and exact.reward(ex, "72.0") == 0.0
    with pytest.raises(ValueError, match="format_reward"):
        FileTask(path, format_reward=0.5)
    with pytest.raises(ValueError, match="verifier must be one of"):
        FileTask(path, verifier="fuzzy")


def test_math_verifier_without_math_verify_is_refused(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_math_verify(name, *args, **kwargs):
        if name == "math_verify":
            raise ImportError("no math_verify")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_math_verify)
    path = str(write_jsonl(tmp_path / "m.jsonl", [{"prompt": "p", "answer": "72"}]))
    with pytest.raises(ImportError, match="pip install math-verify.*verifier=exact"):
        FileTask(path)
    assert FileTask(path, verifier="exact", eval_fraction=1.0).examples("eval", 1, 0)[0].answer == "72"


@pytest.mark.parametrize(("line", "message"), [
    ('{"prompt": "x"}', r"bad.jsonl:2: missing field 'answer'; the row has \['prompt'\]"),
    ('{"prompt": null, "answer": "1"}', r"bad.jsonl:2: field 'prompt' is null"),
    ('{"prompt": "x", "answer": null}', r"bad.jsonl:2: field 'answer' is null"),
    ('["x", "1"]', r"bad.jsonl:2: expected a JSON object.*got list"),
    ('"just text"', r"bad.jsonl:2: expected a JSON object.*got str"),
    ('{"prompt": ["x"], "answer": "1"}', r"bad.jsonl:2: field 'prompt' must be text or a number, got list"),
    ('{"prompt": "x", "answer": 1', r"bad.jsonl:2: not valid JSON"),
])
def test_bad_lines_are_refused_with_file_line_and_field(tmp_path, line, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok", "answer": "1"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        FileTask(str(bad))


def test_file_task_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        FileTask(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        FileTask(str(tmp_path / "nope.parquet"))
    one_row = str(write_jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "answer": "1"}]))
    with pytest.raises(ValueError, match="no examples in split 'eval'"):
        FileTask(one_row, eval_fraction=0.0).examples("eval", 1, 0)
    with pytest.raises(ValueError, match=r"t.jsonl:1: template .* names field 'context'"):
        FileTask(one_row, template="{context}: {prompt}")
    with pytest.raises(ValueError, match="named fields"):
        FileTask(one_row, template="{}")
    assert FileTask(one_row, answer_field="prompt", eval_fraction=1.0).examples("eval", 1, 0)[0].answer == "p"


@pytest.mark.parametrize("template", ["{prompt[9]}", "{prompt.upper}", "Q: {answer[0]}"])
def test_templates_that_reach_into_a_field_are_refused(tmp_path, template):
    one_row = str(write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a long enough prompt", "answer": "1"}]))
    with pytest.raises(ValueError, match=rf"template '{re.escape(template)}': field .* reaches into a field"):
        FileTask(one_row, template=template)


def test_a_pretty_printed_json_array_reads_like_json_lines(tmp_path):
    rows = [{"question": f"what is {i} plus {i}?", "answer": f"#### {2 * i}"} for i in range(12)]
    as_lines = FileTask(str(write_jsonl(tmp_path / "d.jsonl", rows)), prompt_field="question")
    (tmp_path / "d.json").write_text("\n" + json.dumps(rows, indent=2))
    as_array = FileTask(str(tmp_path / "d.json"), prompt_field="question")
    assert as_array._pool == as_lines._pool and len(as_array._pool["train"] + as_array._pool["eval"]) == 12
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))  # JSON lines named .json
    assert FileTask(str(tmp_path / "lines.json"), prompt_field="question")._pool == as_lines._pool
    (tmp_path / "bad.json").write_text('[\n  {"prompt": "x", "answer": "1"},\n  {"prompt": "y",\n]')
    with pytest.raises(ValueError, match=r"bad.json:4: not valid JSON .*one JSON array of objects, or as JSON lines"):
        FileTask(str(tmp_path / "bad.json"))
    (tmp_path / "obj.json").write_text('{\n  "prompt": "x",\n  "answer": "1"\n}')
    with pytest.raises(ValueError, match=r"obj.json:1: not valid JSON .*one JSON array of objects, or as JSON lines"):
        FileTask(str(tmp_path / "obj.json"))
    (tmp_path / "item.json").write_text('[{"prompt": "x", "answer": "1"}, {"prompt": "y"}]')
    with pytest.raises(ValueError, match=r"item.json item 2: missing field 'answer'"):
        FileTask(str(tmp_path / "item.json"))


def test_numbers_are_read_as_text(tmp_path):
    task = FileTask(str(write_jsonl(tmp_path / "n.jsonl", [{"prompt": "p", "answer": 72}])), eval_fraction=1.0)
    assert task.examples("eval", 1, 0)[0].answer == "72"


ROWS = [{"question": f"what is {i} plus {i}?", "answer": f"#### {2 * i}", "id": i} for i in range(30)]


def test_parquet_and_arrow_and_datasets_directory_give_the_same_examples(tmp_path):
    datasets = pytest.importorskip("datasets")
    reference = FileTask(str(write_jsonl(tmp_path / "d.jsonl", ROWS)), prompt_field="question")
    data = datasets.Dataset.from_list(ROWS)
    data.to_parquet(str(tmp_path / "d.parquet"))
    data.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": data, "test": data.select(range(5))}).save_to_disk(str(tmp_path / "dict"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for source in (tmp_path / "d.parquet", arrow, tmp_path / "saved", tmp_path / "dict"):
        task = FileTask(str(source), prompt_field="question")
        assert task.examples("train", 40, 1) == reference.examples("train", 40, 1), source
        assert task.examples("eval", 5, 1) == reference.examples("eval", 5, 1), source
    with_test = FileTask(str(tmp_path / "dict"), prompt_field="question", eval_split="test")
    assert {e.prompt for e in with_test.examples("eval", 20, 0)} == {r["question"] for r in ROWS[:5]}
    assert len({e.prompt for e in with_test.examples("train", 200, 0)}) == 30
    with pytest.raises(ValueError, match=r"no split 'validation'; it has \['test', 'train'\]"):
        FileTask(str(tmp_path / "dict"), prompt_field="question", eval_split="validation")


def test_bad_parquet_rows_name_file_row_and_field(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"q": "a", "answer": "1"}, {"q": None, "answer": "2"}]).to_parquet(
        str(tmp_path / "b.parquet"))
    with pytest.raises(ValueError, match=r"b.parquet row 2: field 'q' is null"):
        FileTask(str(tmp_path / "b.parquet"), prompt_field="q")
    with pytest.raises(ValueError, match=r"b.parquet row 1: missing field 'question'"):
        FileTask(str(tmp_path / "b.parquet"), prompt_field="question")


def test_separate_eval_file(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS[:20])
    evals = write_jsonl(tmp_path / "eval.jsonl", ROWS[20:])
    task = FileTask(str(train), prompt_field="question", eval_path=str(evals))
    assert {e.prompt for e in task.examples("eval", 50, 0)} == {r["question"] for r in ROWS[20:]}
    assert {e.prompt for e in task.examples("train", 100, 0)} == {r["question"] for r in ROWS[:20]}


# ------------------------------------------------------------------------------------------ reasoning-gym

@pytest.mark.parametrize("dataset", ["gsm_symbolic", "basic_arithmetic", "chain_sum", "countdown"])
def test_reasoning_gym_tasks_offline_seeded_and_scored_by_their_own_scorer(dataset):
    pytest.importorskip("reasoning_gym")
    task = make_task("reasoning-gym", dataset=dataset, size=60)
    train = task.examples("train", 8, 0)
    assert train == make_task("reasoning-gym", dataset=dataset, size=60).examples("train", 8, 0)
    assert not {e.prompt for e in train} & {e.prompt for e in task.examples("eval", 20, 0)}
    for ex in train[:3]:
        assert task.reward(ex, ex.answer) == 1.0
        assert task.reward(ex, f"thinking...<answer>{ex.answer}</answer>") == 1.0
        assert task.reward(ex, "<answer>certainly not this</answer>") < 0.5


def test_reasoning_gym_options_are_that_datasets_settings():
    pytest.importorskip("reasoning_gym")
    opts = task_options("reasoning-gym", {"dataset": "chain_sum", "max_terms": 3})
    assert opts == {"dataset": "chain_sum", "eval_fraction": 0.1, "template": "{question}", "seed": 0, "size": 1000,
                    "max_terms": 3}
    task = make_task("reasoning-gym", **{**opts, "size": 40, "min_terms": 2, "template": "Q: {question}"})
    assert all(ex.prompt.startswith("Q: ") and ex.prompt.count("+") + ex.prompt.count("-") <= 2
               for ex in task.examples("train", 10, 0))
    with pytest.raises(ValueError, match=r"no setting\(s\) \['digits'\]"):
        task_options("reasoning-gym", {"dataset": "chain_sum", "digits": 2})
    with pytest.raises(ValueError, match="needs options.dataset.*got 'nope'"):
        task_options("reasoning-gym", {"dataset": "nope"})
    with pytest.raises(ValueError, match="invalid settings"):
        make_task("reasoning-gym", dataset="chain_sum", min_terms=5, max_terms=2)


@pytest.mark.parametrize("template, match", [
    ("Q: {prompt}", r"template 'Q: \{prompt\}' names field \{prompt\}; allowed: \{question\}"),
    ("Q: {question[0]}", r"\{question\[0\]\} reaches into a field"),
    ("Q: {}", "named fields")])
def test_reasoning_gym_templates_may_name_only_the_question(template, match):
    pytest.importorskip("reasoning_gym")
    with pytest.raises(ValueError, match=match):
        task_options("reasoning-gym", {"dataset": "chain_sum", "template": template})
    with pytest.raises(ValueError, match=match):
        make_task("reasoning-gym", dataset="chain_sum", size=5, template=template)


@pytest.mark.parametrize("settings", [{"min_terms": "abc"}, {"size": "ten"}, {"min_terms": 5, "max_terms": 2}])
def test_reasoning_gym_settings_it_rejects_give_one_value_error_naming_them(settings):
    pytest.importorskip("reasoning_gym")
    key, value = next(iter(settings.items()))
    with pytest.raises(ValueError, match=rf"reasoning-gym dataset 'chain_sum': invalid settings .*'{key}': {value!r}"):
        make_task("reasoning-gym", dataset="chain_sum", **settings)


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


def test_exact_verifier_reads_the_reference_as_it_reads_the_completion():
    """Thousands separators: the completion's number loses them (last_number), so must the reference's."""
    from jackpot.tasks.answers import is_correct

    assert is_correct("the total is 1,234", "1,234", "exact")
    assert is_correct("#### 1234", "1,234", "exact")
    assert not is_correct("the total is 1,235", "1,234", "exact")
