"""A task read from a local JSON-lines file: one `{"prompt": ..., "answer": ...}` object per line.

Nothing is downloaded: point it at a file you have (e.g. a GSM8K or MATH-500 export). The split
is decided per problem by a stable hash of the prompt (`base.split_of`), so train and eval are
disjoint; pass `eval_fraction=1.0` to use the whole file as an eval set.

Reward: 1.0 if the completion's first line (before newline / EOS), stripped, equals the answer
stripped. If the optional `math_verify` package is installed, a mismatch is given a second chance
by `math_verify.verify(parse(answer), parse(completion))`, which accepts equivalent forms
(`\\frac{1}{2}` vs `0.5`, `#### 72` vs `72`); it is only used when importable.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jackpot.tasks.base import Example, check_split, extract_answer, split_of

try:  # optional dependency (`pip install jackpot[math]`)
    import math_verify
except ImportError:
    math_verify = None


@dataclass(frozen=True)
class JsonlTask:
    """Examples from a jsonl file; see the module docstring."""

    path: str | Path
    """The .jsonl file; one JSON object per non-empty line."""
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    eval_fraction: float = 0.1
    """Fraction of problems (by prompt hash) in the eval split; 0.0 or 1.0 put all in one split."""
    use_math_verify: bool = True
    """Fall back to `math_verify` equivalence when the package is importable."""
    name: str = "jsonl"
    _pool: dict[str, list[Example]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction <= 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1], got {self.eval_fraction}")
        path = Path(self.path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"JsonlTask path {str(path)!r} does not exist or is not a file")
        pool: dict[str, list[Example]] = {"train": [], "eval": []}
        for ex in _read_examples(path, self.prompt_key, self.answer_key):
            pool[split_of(ex.prompt, self.eval_fraction)].append(ex)
        object.__setattr__(self, "_pool", pool)

    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        """`n` examples of `split`: a seeded shuffle of the file's problems, cycled if `n` exceeds them."""
        check_split(split, n)
        pool = self._pool[split]
        if n and not pool:
            raise ValueError(f"{self.path}: no examples in split {split!r} "
                             f"(eval_fraction={self.eval_fraction})")
        out: list[Example] = []
        rng = random.Random(f"jsonl/{split}/{seed}")
        while len(out) < n:
            order = list(pool)
            rng.shuffle(order)
            out.extend(order[: n - len(out)])
        return out

    def reward(self, example: Example, completion: str) -> float:
        """1.0 on exact match after strip (or math_verify equivalence), else 0.0."""
        given = extract_answer(completion)
        if given == example.answer.strip():
            return 1.0
        if self.use_math_verify and math_verify is not None and given:
            try:
                ok = math_verify.verify(math_verify.parse(example.answer), math_verify.parse(given))
            except Exception:  # math_verify raises on unparsable input; that is a wrong answer
                return 0.0
            return 1.0 if ok else 0.0
        return 0.0


def _read_examples(path: Path, prompt_key: str, answer_key: str) -> list[Example]:
    examples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row: dict[str, Any] = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
            missing = [k for k in (prompt_key, answer_key) if k not in row]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing key(s) {missing}; has {sorted(row)}")
            examples.append(Example(prompt=str(row[prompt_key]), answer=str(row[answer_key])))
    return examples
