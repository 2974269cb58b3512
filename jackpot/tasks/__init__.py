"""Tasks: prompts with reference answers and verifiable rewards (see `registry.TASKS`)."""

from jackpot.tasks.answers import final_answer, is_correct
from jackpot.tasks.arithmetic import AdditionTask, ChainSumTask, MultiplyTask
from jackpot.tasks.base import Example, Task, extract_answer
from jackpot.tasks.files import FileTask, JsonlTask
from jackpot.tasks.gym import ReasoningGymTask
from jackpot.tasks.metrics import mean_at_k, pass_at_k
from jackpot.tasks.registry import TASKS, default_max_new_tokens, make_task, task_options, tiny_tokenizer

__all__ = [
    "TASKS", "AdditionTask", "ChainSumTask", "Example", "FileTask", "JsonlTask", "MultiplyTask",
    "ReasoningGymTask", "Task", "default_max_new_tokens", "extract_answer", "final_answer", "is_correct",
    "make_task", "mean_at_k", "pass_at_k", "task_options", "tiny_tokenizer",
]
