"""A task read from data you have: a local file or directory, or a Hugging Face dataset name when online.

    task.name=file task.options='{path: data/gsm8k.jsonl, prompt_field: question, answer_field: answer}'

Sources (`path`):
    *.jsonl / *.json   one JSON object per non-empty line (no dependency); a .json file whose text
                       starts with `[` is one JSON array of objects instead (e.g. GSM8K-style files)
    *.parquet          a Parquet table (needs pyarrow: pip install "jackpot[data]")
    *.arrow            an Arrow file written by `datasets` (needs datasets)
    a directory        written by `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk`
    anything else      a hub dataset name for `datasets.load_dataset(path, subset, split=...)` (online)

Each row gives one `Example`: the prompt is `template.format(prompt=row[prompt_field], **row)`
(default template "{prompt}"; e.g. "Question: {prompt}\\nAnswer:"), the answer is `row[answer_field]`
as text. A row that is not an object, lacks a field, holds null there, or holds something other than
text or a number is refused with the file, the line (or row) and the field named — nothing is turned
into the string "None".

Splits: `eval_path` (another source) or `eval_split` (another split of a dataset with splits, e.g.
"test") give the eval set; otherwise problems are assigned by a stable hash of the prompt
(`base.split_of`) with `eval_fraction` of them in eval, so train and eval are disjoint. `split` picks
the split read for training from a dataset with splits ("train").

Reward (`answers.py`): 1.0 when the completion's final answer — the last `\\boxed{}`, else what follows
the last `####`, else the last number, read over the whole completion — equals the reference's under
`verifier` ('math': math-verify equivalence, the default; 'exact': string equality), plus
`format_reward` when the completion marks its answer with `\\boxed{}` or `####` (default 0).
The chat template, when the model's tokenizer has one, is applied by the trainer, not here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from jackpot.errors import InputError
from jackpot.tasks.answers import VERIFIERS, is_correct, marked_answer, require_math_verify
from jackpot.tasks.base import Example, check_template, draw_split, split_of

MAX_NEW_TOKENS = 1024  # default response budget: worked solutions run to hundreds of tokens
_TABLE_SUFFIXES = (".parquet", ".arrow")


@dataclass(frozen=True)
class FileTask:
    """Examples from a file, directory or hub dataset; see the module docstring."""

    name: ClassVar[str] = "file"
    tiny_tokenizer: ClassVar[str] = "byte"
    path: str
    """A .jsonl/.json, .parquet or .arrow file, a `save_to_disk` directory, or a hub dataset name."""
    prompt_field: str = "prompt"
    """The row field holding the problem text."""
    answer_field: str = "answer"
    """The row field holding the reference answer (a worked solution ending in `#### 72` works)."""
    template: str = "{prompt}"
    """Prompt shown to the model: `str.format` with {prompt} = the prompt field and every row field by name."""
    eval_fraction: float = 0.1
    """Fraction of problems (by prompt hash) in the eval split when neither eval_path nor eval_split is set."""
    eval_path: str | None = None
    """A separate source for the eval split (same fields)."""
    split: str = "train"
    """The split read from a dataset with splits (a DatasetDict directory or a hub dataset)."""
    eval_split: str | None = None
    """The eval split of the same dataset (e.g. 'test'); None: a hash split of `split`."""
    subset: str | None = None
    """Hub datasets only: the configuration name, e.g. 'main' for gsm8k."""
    verifier: str = "math"
    """'math' (math-verify equivalence of the final answers) or 'exact' (equal strings)."""
    format_reward: float = 0.0
    """Added to the reward when the completion marks its answer with \\boxed{} or ####."""
    _pool: dict[str, list[Example]] = field(init=False, repr=False, compare=False)

    @classmethod
    def default_max_new_tokens(cls, **options: Any) -> int:
        return MAX_NEW_TOKENS

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction <= 1.0:
            raise InputError(f"eval_fraction must be in [0, 1], got {self.eval_fraction}")
        if self.verifier not in VERIFIERS:
            raise InputError(f"verifier must be one of {list(VERIFIERS)}, got {self.verifier!r}")
        if self.verifier == "math":
            require_math_verify()
        if not 0.0 <= self.format_reward < 0.5:
            raise InputError(f"format_reward must be in [0, 0.5) (a formatted wrong answer must stay below a "
                             f"correct one for pass@k), got {self.format_reward}")
        check_template(self.template)
        if self.eval_path is not None and self.eval_split is not None:
            raise InputError("give eval_path or eval_split, not both")
        rows = self._examples(self.path, self.split)
        if self.eval_path is not None or self.eval_split is not None:
            evals = self._examples(self.eval_path or self.path, self.eval_split or self.split)
            pool = {"train": rows, "eval": evals}
        else:
            pool = {"train": [], "eval": []}
            for ex in rows:
                pool[split_of(ex.prompt, self.eval_fraction)].append(ex)
        object.__setattr__(self, "_pool", pool)

    def _examples(self, source: str, split: str) -> list[Example]:
        return [self._example(row, where) for row, where in read_rows(source, split=split, subset=self.subset)]

    def _example(self, row: Any, where: str) -> Example:
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object with fields {self.prompt_field!r} and "
                             f"{self.answer_field!r}, got {type(row).__name__}")
        prompt, answer = (_text_field(row, key, where) for key in (self.prompt_field, self.answer_field))
        try:
            text = self.template.format(**{**row, "prompt": prompt})
        except KeyError as e:
            raise InputError(f"{where}: template {self.template!r} names field {e.args[0]!r}, which the row "
                             f"lacks; it has {sorted(row)}") from None
        return Example(prompt=text, answer=answer)

    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        """`n` examples of `split`: a seeded shuffle of the problems, cycled if `n` exceeds them."""
        return draw_split(self._pool, split, n, seed, source="jsonl",
                          empty=f"{self.path}: no examples in split {split!r} (eval_fraction={self.eval_fraction})")

    def reward(self, example: Example, completion: str) -> float:
        """1.0 if the completion's final answer is the reference's (see module docstring), plus format_reward."""
        correct = 1.0 if is_correct(completion, example.answer, self.verifier) else 0.0
        formatted = self.format_reward if self.format_reward and marked_answer(completion) is not None else 0.0
        return correct + formatted


JsonlTask = FileTask  # the name the task had when it read only JSON lines


def _text_field(row: dict, key: str, where: str) -> str:
    if key not in row:
        raise InputError(f"{where}: missing field {key!r}; the row has {sorted(row)}")
    value = row[key]
    if value is None:
        raise InputError(f"{where}: field {key!r} is null")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InputError(f"{where}: field {key!r} must be text or a number, got {type(value).__name__}")
    return str(value)


# ----------------------------------------------------------------------------------------------- reading
def read_rows(source: str, *, split: str = "train", subset: str | None = None) -> list[tuple[Any, str]]:
    """Rows of `source` (see the module docstring), each with where it came from ('file:line' / 'file row N')."""
    path = Path(str(source)).expanduser()
    if path.suffix in (".jsonl", ".json") or (path.is_file() and path.suffix not in _TABLE_SUFFIXES):
        if not path.is_file():
            raise FileNotFoundError(f"task data file {str(path)!r} does not exist")
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        if not path.is_file():
            raise FileNotFoundError(f"task data file {str(path)!r} does not exist")
        pq = _require("pyarrow.parquet", "Parquet files")
        return [(row, f"{path} row {i}") for i, row in enumerate(pq.read_table(path).to_pylist(), start=1)]
    datasets = _require("datasets", "Arrow files, dataset directories and hub datasets")
    if path.suffix == ".arrow":
        if not path.is_file():
            raise FileNotFoundError(f"task data file {str(path)!r} does not exist")
        data = datasets.Dataset.from_file(str(path))
    elif path.is_dir():
        data = datasets.load_from_disk(str(path))
    elif str(source).startswith((".", "/", "~")) or path.suffix:
        raise FileNotFoundError(f"task data {str(path)!r} does not exist (and is not a hub dataset name)")
    else:
        data = datasets.load_dataset(str(source), subset, split=split)
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise InputError(f"{source}: no split {split!r}; it has {sorted(data)}")
        data = data[split]
    return [(row, f"{source} row {i}") for i, row in enumerate(data, start=1)]


def _read_jsonl(path: Path) -> list[tuple[Any, str]]:
    """JSON lines; a `.json` file whose text starts with `[` is read as one JSON array instead."""
    if path.suffix == ".json":
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{e.lineno}: not valid JSON ({e}); a .json file is read as one JSON "
                                 f"array of objects, or as JSON lines (one object per line)") from e
            return [(row, f"{path} item {i}") for i, row in enumerate(items, start=1)]
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((json.loads(line), f"{path}:{lineno}"))
            except json.JSONDecodeError as e:
                hint = ("; a .json file is read as one JSON array of objects, or as JSON lines (one object per "
                        "line)" if path.suffix == ".json" else "")
                raise InputError(f"{path}:{lineno}: not valid JSON ({e}){hint}") from e
    return rows


def _require(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"reading {what} needs the `datasets` package: pip install 'jackpot[data]'") from None
