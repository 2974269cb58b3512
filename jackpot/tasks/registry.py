"""Task registry: `make_task("addition", digits=2)` builds a task by name.

    addition   AdditionTask(digits=2)              "12+34=" -> "46"
    chain_sum  ChainSumTask(terms=3, digits=1)     "3+5+2=" -> "10"
    multiply   MultiplyTask(digits=1)              "7*8="   -> "56"
    jsonl      JsonlTask(path, prompt_key, answer_key)   a local file
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jackpot.tasks.arithmetic import AdditionTask, ChainSumTask, MultiplyTask
from jackpot.tasks.base import Task
from jackpot.tasks.files import JsonlTask

TASKS: dict[str, type] = {
    "addition": AdditionTask,
    "chain_sum": ChainSumTask,
    "multiply": MultiplyTask,
    "jsonl": JsonlTask,
}


def make_task(name: str, **kwargs: Any) -> Task:
    """Instantiate the task registered as `name` with `kwargs`; ValueError for unknown names/arguments."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    cls = TASKS[name]
    allowed = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"task {name!r} got unknown argument(s) {unknown}; allowed: {sorted(allowed)}")
    return cls(**kwargs)
