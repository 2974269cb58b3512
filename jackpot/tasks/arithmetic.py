"""Built-in offline arithmetic tasks that a ~1M-parameter character-level model can partly learn.

Prompts are bare equations and answers are decimal integers, e.g.

    addition   (digits=2)          "12+34="  -> "46"
    chain_sum  (terms=3, digits=1) "3+5+2="  -> "10"
    multiply   (digits=1)          "7*8="    -> "56"

Operands are uniform on [0, 10**digits). Examples are drawn with replacement from the problems
whose prompt hashes into the requested split (`base.split_of`), so train and eval never share a
problem. A completion is correct iff the text before its first newline / EOS, stripped, equals
the answer string exactly ("046" or "46.0" are wrong).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from jackpot.errors import InputError
from jackpot.tasks.base import Example, check_split, extract_answer, split_of

MAX_TRIES_PER_EXAMPLE = 10_000
SPARE_TOKENS = 3  # response budget beyond the longest answer: <eos> and room for a stray character or two


@dataclass(frozen=True)
class _ArithmeticTask:
    """Shared sampling and reward; subclasses define `_problem(rng) -> Example` and `max_answer_len`."""

    name: ClassVar[str] = "arithmetic"
    tiny_tokenizer: ClassVar[str] = "char"
    eval_fraction: float = 0.1
    """Fraction of the problem space (by prompt hash) reserved for the eval split."""

    def __post_init__(self) -> None:
        if not 0.0 < self.eval_fraction < 1.0:
            raise InputError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")

    def _problem(self, rng: random.Random) -> Example:
        raise NotImplementedError

    @classmethod
    def default_max_new_tokens(cls, **options) -> int:
        """Longest answer + SPARE_TOKENS (6 for 2-digit addition)."""
        return cls(**options).max_answer_len + SPARE_TOKENS

    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        """`n` examples of `split`, drawn with replacement; the same `seed` gives the same list."""
        check_split(split, n)
        rng = random.Random(f"{self.name}/{split}/{seed}")
        out: list[Example] = []
        tries = 0
        while len(out) < n:
            if tries == MAX_TRIES_PER_EXAMPLE * n:
                raise InputError(f"could not draw {n} {split!r} examples for {self}: problem space too "
                                 f"small for eval_fraction={self.eval_fraction}")
            tries += 1
            ex = self._problem(rng)
            if split_of(ex.prompt, self.eval_fraction) == split:
                out.append(ex)
        return out

    def reward(self, example: Example, completion: str) -> float:
        """1.0 iff the completion's first line, stripped, equals `example.answer`."""
        return 1.0 if extract_answer(completion) == example.answer else 0.0


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{key} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class AdditionTask(_ArithmeticTask):
    """a+b= with a, b < 10**digits."""

    name: ClassVar[str] = "addition"
    digits: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(digits=self.digits)

    @property
    def max_answer_len(self) -> int:
        return self.digits + 1

    def _problem(self, rng: random.Random) -> Example:
        a, b = rng.randrange(10**self.digits), rng.randrange(10**self.digits)
        return Example(prompt=f"{a}+{b}=", answer=str(a + b))


@dataclass(frozen=True)
class ChainSumTask(_ArithmeticTask):
    """x1+x2+...+x_terms= with each x < 10**digits."""

    name: ClassVar[str] = "chain_sum"
    terms: int = 3
    digits: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(terms=self.terms, digits=self.digits)
        if self.terms < 2:
            raise InputError(f"terms must be >= 2, got {self.terms}")

    @property
    def max_answer_len(self) -> int:
        return len(str(self.terms * (10**self.digits - 1)))

    def _problem(self, rng: random.Random) -> Example:
        xs = [rng.randrange(10**self.digits) for _ in range(self.terms)]
        return Example(prompt="+".join(map(str, xs)) + "=", answer=str(sum(xs)))


@dataclass(frozen=True)
class MultiplyTask(_ArithmeticTask):
    """a*b= with a, b < 10**digits."""

    name: ClassVar[str] = "multiply"
    digits: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(digits=self.digits)

    @property
    def max_answer_len(self) -> int:
        return 2 * self.digits

    def _problem(self, rng: random.Random) -> Example:
        a, b = rng.randrange(10**self.digits), rng.randrange(10**self.digits)
        return Example(prompt=f"{a}*{b}=", answer=str(a * b))
