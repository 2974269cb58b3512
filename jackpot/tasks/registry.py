"""Task registry: `make_task("addition", digits=2)` builds a task by name.

    addition        AdditionTask(digits=2)                 "12+34=" -> "46"
    chain_sum       ChainSumTask(terms=3, digits=1)        "3+5+2=" -> "10"
    multiply        MultiplyTask(digits=1)                 "7*8="   -> "56"
    file            FileTask(path, prompt_field, answer_field, template, ...)   your data (jsonl, parquet,
                    arrow, a datasets directory, a hub name), math answers checked with math-verify
    jsonl           the same as `file` (its former name)
    reasoning-gym   ReasoningGymTask(dataset, **that dataset's settings)   pip install "jackpot[reasoning]"

Each task has its own default options: `task_options(name, options)` fills them in (so a run's config
records every option it ran with, the verifier included) and refuses options the task does not take —
options of one task never reach another.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jackpot.errors import InputError
from jackpot.tasks.arithmetic import AdditionTask, ChainSumTask, MultiplyTask
from jackpot.tasks.base import Task
from jackpot.tasks.files import FileTask
from jackpot.tasks.gym import ReasoningGymTask

TASKS: dict[str, type] = {
    "addition": AdditionTask,
    "chain_sum": ChainSumTask,
    "multiply": MultiplyTask,
    "file": FileTask,
    "jsonl": FileTask,
    "reasoning-gym": ReasoningGymTask,
}


def _task_class(name: str) -> type:
    if name not in TASKS:
        raise InputError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]


def task_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """`options` completed with task `name`'s defaults; ValueError for an unknown task, option or a missing one."""
    cls = _task_class(name)
    if hasattr(cls, "resolve_options"):
        return cls.resolve_options(dict(options))
    fields = [f for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(options) - {f.name for f in fields})
    if unknown:
        raise InputError(f"task {name!r} got unknown option(s) {unknown}; "
                         f"its options: {sorted(f.name for f in fields)}")
    missing = [f.name for f in fields if f.name not in options
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise InputError(f"task {name!r} needs option(s) {missing}, e.g. task.options='{{{missing[0]}: ...}}'")
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    return {**defaults, **options}


def make_task(name: str, **kwargs: Any) -> Task:
    """Instantiate the task registered as `name` with `kwargs`; ValueError for unknown names/arguments."""
    return _task_class(name)(**task_options(name, kwargs))


def default_max_new_tokens(name: str, options: dict[str, Any]) -> int:
    """The response budget task `name` needs with `options` (the default of sampling.max_new_tokens)."""
    return _task_class(name).default_max_new_tokens(**task_options(name, options))


def tiny_tokenizer(name: str) -> str:
    """The tokenizer a tiny offline model gets for task `name`: 'char' for arithmetic, 'byte' (any text) else."""
    return _task_class(name).tiny_tokenizer
