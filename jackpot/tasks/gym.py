"""Any reasoning-gym dataset as a task, generated offline and seeded (optional: pip install "jackpot[reasoning]").

    task.name=reasoning-gym task.options='{dataset: chain_sum, min_terms: 2, max_terms: 3, size: 2000}'

`dataset` is one of reasoning-gym's registered names (`gsm_symbolic`, `basic_arithmetic`, `chain_sum`,
`countdown`, ... about a hundred); every other option except `eval_fraction` and `template` is that
dataset's own setting, passed to its config class (`seed` and `size` among them: `size` problems are
generated from `seed`, default 0, so a run is reproducible). Problems are assigned to train or eval
by a stable hash of the question (`base.split_of`), `eval_fraction` of them to eval.

Prompt: `template.format(question=...)` (default "{question}"; {question} is the only field). Reward:
the dataset's own scorer, `score_answer(answer, entry)`, applied to the text inside the completion's
last `<answer>...</answer>` when there is one, else to the whole completion stripped (what a model
fine-tuned on bare answers writes). Scorers may give partial credit (e.g. 0.01 for a well-formed wrong
answer); pass@k counts a sample as correct above 0.5.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

from jackpot.errors import InputError
from jackpot.tasks.base import Example, check_template, draw_split, split_of

MAX_NEW_TOKENS = 1024
OWN_OPTIONS = {"eval_fraction": 0.1, "template": "{question}"}
GENERATED_DEFAULTS = {"seed": 0, "size": 1000}
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _registry() -> dict:
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError:
        raise ImportError("task 'reasoning-gym' needs the reasoning-gym package: pip install 'jackpot[reasoning]'") \
            from None
    return DATASETS


class ReasoningGymTask:
    """A reasoning-gym dataset; see the module docstring."""

    name: ClassVar[str] = "reasoning-gym"
    tiny_tokenizer: ClassVar[str] = "byte"

    def __init__(self, dataset: str, *, eval_fraction: float = 0.1, template: str = "{question}",
                 **settings: Any):
        options = self.resolve_options({"dataset": dataset, "eval_fraction": eval_fraction, "template": template,
                                        **settings})
        self.dataset_name, self.eval_fraction, self.template = dataset, eval_fraction, template
        self.settings = {k: v for k, v in options.items() if k not in OWN_OPTIONS and k != "dataset"}
        dataset_cls, config_cls = _registry()[dataset]
        try:  # reasoning-gym checks settings with asserts, or fails on them with whatever error comes first
            config = config_cls(**self.settings)
            if hasattr(config, "validate"):
                config.validate()
            self._data = dataset_cls(config=config)
            self._entries = [self._data[i] for i in range(len(self._data))]
        except Exception as e:
            raise InputError(f"reasoning-gym dataset {dataset!r}: invalid settings {self.settings}: "
                             f"{type(e).__name__}: {e}") from e
        self._pool: dict[str, list[Example]] = {"train": [], "eval": []}
        for index, entry in enumerate(self._entries):
            prompt = template.format(question=entry["question"])
            self._pool[split_of(prompt, eval_fraction)].append(
                Example(prompt=prompt, answer=str(entry["answer"]), meta={"index": index}))

    @classmethod
    def resolve_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """`options` with this task's defaults filled in; ValueError naming an unknown dataset or setting."""
        registry = _registry()
        dataset = options.get("dataset")
        if dataset not in registry:
            raise InputError(f"task 'reasoning-gym' needs options.dataset, one of reasoning-gym's datasets "
                             f"(e.g. gsm_symbolic, basic_arithmetic, chain_sum, countdown); got {dataset!r}. "
                             f"Known: {', '.join(sorted(registry))}")
        settings = {f.name for f in dataclasses.fields(registry[dataset][1]) if f.init}
        unknown = sorted(set(options) - settings - set(OWN_OPTIONS) - {"dataset"})
        if unknown:
            raise InputError(f"reasoning-gym dataset {dataset!r} has no setting(s) {unknown}; its settings: "
                             f"{sorted(settings)}, plus {sorted(OWN_OPTIONS)}")
        check_template(options.get("template", OWN_OPTIONS["template"]), allowed={"question"})
        if not 0.0 < float(options.get("eval_fraction", OWN_OPTIONS["eval_fraction"])) < 1.0:
            raise InputError(f"eval_fraction must be in (0, 1), got {options.get('eval_fraction')}")
        return {"dataset": dataset, **OWN_OPTIONS, **GENERATED_DEFAULTS, **options}

    @classmethod
    def default_max_new_tokens(cls, **options: Any) -> int:
        return MAX_NEW_TOKENS

    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        """`n` examples of `split`: a seeded shuffle of the generated problems, cycled if `n` exceeds them."""
        return draw_split(self._pool, split, n, seed, source="reasoning-gym",
                          empty=f"reasoning-gym {self.dataset_name!r}: no examples in split {split!r}; raise size")

    def reward(self, example: Example, completion: str) -> float:
        """The dataset's score of the completion's answer (see module docstring), in [0, 1]."""
        tagged = _ANSWER_TAG.findall(completion)
        answer = (tagged[-1] if tagged else completion).strip()
        return float(self._data.score_answer(answer=answer, entry=self._entries[example.meta["index"]]))

    def __repr__(self) -> str:
        return f"ReasoningGymTask(dataset={self.dataset_name!r}, {self.settings})"
