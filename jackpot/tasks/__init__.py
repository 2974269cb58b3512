"""Tasks: prompts with reference answers and verifiable rewards (see `registry.TASKS`)."""

from jackpot.tasks.arithmetic import AdditionTask, ChainSumTask, MultiplyTask
from jackpot.tasks.base import Example, Task, extract_answer
from jackpot.tasks.files import JsonlTask
from jackpot.tasks.metrics import mean_at_k, pass_at_k
from jackpot.tasks.registry import TASKS, make_task

__all__ = [
    "TASKS", "AdditionTask", "ChainSumTask", "Example", "JsonlTask", "MultiplyTask", "Task",
    "extract_answer", "make_task", "mean_at_k", "pass_at_k",
]
