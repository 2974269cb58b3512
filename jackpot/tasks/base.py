"""What a task is: prompts with reference answers, and a verifiable reward for a completion.

A task knows nothing about models or tokens. `reward(example, completion)` returns 1.0 when the
completion's answer is correct and 0.0 otherwise; the completion is the decoded response text,
with or without a trailing end-of-sequence marker.

Train and eval splits are disjoint by construction: each task assigns a problem to a split from a
stable hash of its prompt (`split_of`), never from Python's salted `hash`.
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from jackpot.errors import InputError

SPLITS = ("train", "eval")
# Decoded completions end at the first of these; the answer is what precedes it, stripped.
STOP_STRINGS = ("\n", "<eos>", "<|endoftext|>", "<|im_end|>", "</s>")


@dataclass(frozen=True)
class Example:
    """One problem: the text shown to the model and the reference answer."""

    prompt: str
    answer: str
    meta: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    """What the task's scorer needs beyond the answer (e.g. a reasoning-gym entry's index); not compared."""


@runtime_checkable
class Task(Protocol):
    """A source of examples with a verifiable reward."""

    name: str

    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        """`n` examples of `split` ("train" or "eval"), reproducible given `seed`."""
        ...

    def reward(self, example: Example, completion: str) -> float:
        """1.0 if `completion` answers `example` correctly, else 0.0."""
        ...

    @classmethod
    def default_max_new_tokens(cls, **options: Any) -> int:
        """The response budget the task needs with these constructor options (`sampling.max_new_tokens`'s default)."""
        ...


def check_split(split: str, n: int) -> None:
    """ValueError unless `split` is "train"/"eval" and `n` >= 0."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")


def draw(pool: list[Example], n: int, key: str) -> list[Example]:
    """n examples from `pool` in an order seeded by `key`: shuffled passes over the pool, so every example
    comes once before any comes twice."""
    rng = random.Random(key)
    out: list[Example] = []
    while len(out) < n:
        order = list(pool)
        rng.shuffle(order)
        out.extend(order[: n - len(out)])
    return out


def draw_split(pools: dict[str, list[Example]], split: str, n: int, seed: int, *, source: str,
               empty: str) -> list[Example]:
    """`n` examples of `split` from a task's fixed pools (a seeded shuffle, `draw` keyed by source/split/seed);
    InputError `empty` when the split has none."""
    check_split(split, n)
    if n and not pools[split]:
        raise InputError(empty)
    return draw(pools[split], n, f"{source}/{split}/{seed}")


def split_of(prompt: str, eval_fraction: float) -> str:
    """"eval" for a stable `eval_fraction` of prompts (by BLAKE2 hash), "train" for the rest."""
    digest = hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    return "eval" if u < eval_fraction else "train"


def check_template(template: str, allowed: set[str] | None = None) -> list[str]:
    """The field names of a prompt `template` (a `str.format` string); ValueError naming the template when
    it is not one, uses positional fields ({} / {0}), reaches into a field ({prompt[0]}, {prompt.upper}),
    or names a field outside `allowed` (when given)."""
    if not isinstance(template, str):
        raise InputError(f"template must be text, got {type(template).__name__}")
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise InputError(f"template {template!r} is not a valid format string: {e}") from None
    for name in names:
        if name == "" or name.isdigit():
            raise InputError(f"template {template!r}: use named fields like {{prompt}}, not {{}} or {{0}}")
        if "." in name or "[" in name:
            raise InputError(f"template {template!r}: field {{{name}}} reaches into a field (attribute or index "
                             f"access); name whole fields only, like {{{name.split('.')[0].split('[')[0]}}}")
        if allowed is not None and name not in allowed:
            raise InputError(f"template {template!r} names field {{{name}}}; allowed: "
                             f"{', '.join('{' + a + '}' for a in sorted(allowed))}")
    return names


def extract_answer(completion: str) -> str:
    """The characters before the first newline / EOS marker, stripped of surrounding whitespace."""
    cut = len(completion)
    for stop in STOP_STRINGS:
        i = completion.find(stop)
        if i != -1:
            cut = min(cut, i)
    return completion[:cut].strip()
