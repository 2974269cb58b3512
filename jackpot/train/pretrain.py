"""`jackpot pretrain`: warm-start a tiny Qwen3 model on a task by supervised fine-tuning (SFT).

RL needs a starting policy with *partial* accuracy: at 0% no sample is ever rewarded, at 100%
there is nothing to learn. A randomly initialised model is therefore first trained teacher-forced
on `prompt + answer + <eos>` from the task's train split, with the cross-entropy on the answer
and EOS tokens only (the prompt is context, not a target). AdamW, linear warm-up then cosine decay.

`pretrained_model(spec, cache_dir)` builds, trains and saves such a model under
`cache_dir/<name>-<hash of every setting>` (atomically) and reuses it when already there, so a
training run and its tests do not pay for SFT twice.

Measured on 2-digit addition (2 shared CPU cores, 1 torch thread, 200 eval problems, 2 seeds):
    h64, 2 layers, 4 heads (0.11M params), lr 3e-3, 600 steps: greedy 51%, sampled 26-31%, ~20 s
    h64, 2 layers, 2 heads (the default rollout model since December 2026: head_dim 32, which vLLM serves),
        lr 3e-3, 600 steps, seeds 1 and 2: greedy 14% / 11%, sampled 6% / 7% (800 steps, seed 1: 8%);
        lr 6e-3: sampled 17% / 9%. With 3 heads at h96: 6% / 10%; 4 heads at h128: 53% / 42%, ~85 s
    h128, 3 layers, 4 heads (0.65M params), lr 2e-3, 600 steps: greedy 20-60%, sampled 11-39%, ~45-50 s
Accuracy jumps late and abruptly (h64: 8% at 500 steps, 51% at 600), so it varies with the seed; fewer,
wider heads learn 2-digit addition more slowly at this size.

Tokenizer: the built-in arithmetic tasks use the 56-symbol character tokenizer; every other task (files,
reasoning-gym) the byte-level one, which encodes any text (`jackpot.models.tokenizer`).

Cost: a step holds `batch_size` examples but at most SFT_BATCH_TOKENS tokens (padded width x examples,
never fewer than one example). The arithmetic tasks' steps (64 rows of at most 13 tokens) fit under it and
are unchanged; a text task's prompts run to hundreds of bytes (reasoning-gym's propositional_logic: ~570,
gsm_symbolic: ~630), so its step holds one or a few examples and costs about what an arithmetic step does.
Measured on propositional_logic, 1 thread, h128 x 3 layers: 64 examples a step took ~8 s, so the default
600 steps took over an hour before the first RL step; capped, a step takes ~0.1 s. A tiny byte-level model
learns a text task's answer format and where to stop, not the task: use a real checkpoint
(`policy.path=...`) to learn one. Without a progress bar, a line every LOG_EVERY_S seconds reports the
step, the loss, the time spent and the time left.

Example:
    jackpot pretrain --task addition --hidden 128 --layers 3 --heads 4 --steps 600 --out runs/policy
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from jackpot.errors import InputError
from jackpot.eval import GREEDY_TOP_P, sample_and_score
from jackpot.models.loading import build_tiny_qwen, save_model_and_tokenizer
from jackpot.models.tokenizer import CHARACTERS, build_tokenizer
from jackpot.rollout.hf import HFRolloutEngine
from jackpot.tasks import Example, Task, make_task, tiny_tokenizer
from jackpot.train.config import default_cache_dir

IGNORE_INDEX = -100  # label value excluded from the loss by Hugging Face models
WARMUP_FRACTION = 0.05
MIN_LR_FRACTION = 0.1
CACHE_FORMAT = 3  # bump when the training recipe changes, to invalidate cached models
SFT_BATCH_TOKENS = 1024  # at most this many tokens (padded) in one SFT step; see the module docstring
LOG_EVERY_S = 30.0  # without a progress bar: seconds between two progress lines


@dataclass(frozen=True)
class TinyModelSpec:
    """Everything that determines a pre-trained tiny model (all of it goes into the cache key)."""

    name: str = "policy"
    """Prefix of the cache directory name, e.g. "rollout" or "policy"."""
    task: str = "addition"
    """Registered task name (`jackpot.tasks.TASKS`)."""
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    """Arguments of the task, e.g. {"digits": 2}."""
    hidden: int = 128
    layers: int = 3
    heads: int = 4
    intermediate: int | None = None
    """MLP width; None means 3 * hidden."""
    steps: int = 600
    """SFT optimizer steps (0 leaves the random initialisation)."""
    batch_size: int = 64
    """Examples per SFT step, at most: a step holds at most SFT_BATCH_TOKENS tokens (at least one example)."""
    lr: float = 2e-3
    seed: int = 0
    """Seeds both the initialisation and the order of training examples."""
    tokenizer: str | None = None
    """'char' or 'byte' (jackpot.models.tokenizer); None: the task's choice (char for arithmetic, else byte)."""

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer or tiny_tokenizer(self.task)

    def cache_key(self) -> str:
        """Short hash of what defines the model: every field but `name`, with the task's arguments completed by
        its defaults and any data file replaced by a hash of its contents (`task_identity`), plus the tokenizer
        vocabulary and the recipe version. So `jackpot pretrain` and `jackpot train` find the same model, and
        an edited data file trains a new one."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("name", "tokenizer")}
        fields["task_kwargs"] = task_identity(self.task, self.task_kwargs)
        vocab = CHARACTERS if self.tokenizer_name == "char" else self.tokenizer_name
        payload = json.dumps({**fields, "vocab": vocab, "format": CACHE_FORMAT}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def task_identity(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The task's constructor arguments with its defaults filled in; a `...path` argument naming a file is
    replaced by the SHA-256 of the file's contents (its name does not define the data, its bytes do)."""
    task = make_task(name, **kwargs)
    if not dataclasses.is_dataclass(task):
        return dict(kwargs)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(task):
        if not f.init:
            continue
        value = getattr(task, f.name)
        if f.name.endswith("path") and isinstance(value, (str, Path)) and Path(value).expanduser().is_file():
            value = {"sha256": hashlib.sha256(Path(value).expanduser().read_bytes()).hexdigest()}
        out[f.name] = value
    return out


def sft_batch(tokenizer: PreTrainedTokenizerBase, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Right-padded `prompt + answer + eos` ids, mask and labels (prompt and padding ignored): (B, L) each."""
    rows, labels = [], []
    for ex in examples:
        prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(ex.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        labels.append([IGNORE_INDEX] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id

    def padded(seqs: list[list[int]], value: int) -> torch.Tensor:
        return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)

    return {
        "input_ids": padded(rows, pad),
        "attention_mask": padded([[1] * len(r) for r in rows], 0),
        "labels": padded(labels, IGNORE_INDEX),
    }


def capped_batch_size(tokenizer: PreTrainedTokenizerBase, examples: list[Example]) -> int:
    """How many of `examples` (a step's worth) fit in SFT_BATCH_TOKENS tokens at their longest row; >= 1."""
    if not examples:
        return 1
    width = sft_batch(tokenizer, examples)["input_ids"].shape[1]
    return max(1, min(len(examples), SFT_BATCH_TOKENS // width))


class ProgressLines:
    """A line to stderr every LOG_EVERY_S seconds (when `enabled`): what runs, step i/n, a detail (e.g. the
    loss), the time spent and an estimate of the time left. For runs without a progress bar (--no-progress)."""

    def __init__(self, what: str, total: int, start: float, *, enabled: bool = True):
        self.what, self.total, self.start, self.enabled = what, total, start, enabled
        self.last = start

    def update(self, done: int, detail: str = "") -> None:
        now = time.perf_counter()
        if not self.enabled or now - self.last < LOG_EVERY_S:
            return
        self.last = now
        elapsed = now - self.start
        left = elapsed / done * (self.total - done)
        parts = [f"{self.what}: step {done}/{self.total}", detail, f"{_clock(elapsed)} elapsed",
                 f"about {_clock(left)} left"]
        print(", ".join(p for p in parts if p), file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def _lr_factor(step: int, steps: int) -> float:
    warmup = max(1, int(WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain(
    task: Task,
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = True,
    desc: str = "pre-train (SFT)",
) -> dict[str, float]:
    """SFT `model` in place for `steps` steps, each on fresh train examples: `batch_size` of them, or fewer
    where that many would exceed SFT_BATCH_TOKENS tokens; returns loss, batch and timing stats. `progress`:
    a progress bar, else a line now and then (ProgressLines), both headed `desc`."""
    if steps < 0 or batch_size < 1 or not lr > 0:
        raise InputError(f"need steps >= 0, batch_size >= 1, lr > 0; got steps={steps}, "
                         f"batch_size={batch_size}, lr={lr}")
    batch_size = capped_batch_size(tokenizer, task.examples("train", batch_size, seed))
    examples = task.examples("train", steps * batch_size, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps))
    device = model.device
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    lines = ProgressLines(desc, steps, start, enabled=not progress)
    for step in bar:
        batch = sft_batch(tokenizer, examples[step * batch_size:(step + 1) * batch_size])
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())  # one sync per step is fine at this scale
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        lines.update(step + 1, f"loss {losses[-1]:.3f}")
    model.eval()
    tail = losses[-max(1, steps // 10):] if losses else [float("nan")]
    return {
        "sft/steps": float(steps),
        "sft/batch_size": float(batch_size),
        "sft/loss_first": losses[0] if losses else float("nan"),
        "sft/loss_last": sum(tail) / len(tail),
        "sft/seconds": time.perf_counter() - start,
    }


@torch.no_grad()
def evaluate_accuracy(
    task: Task,
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel,
    *,
    n: int = 100,
    seed: int = 0,
    temperature: float | None = None,
    max_new_tokens: int | None = None,
) -> float:
    """Fraction of `n` eval examples answered correctly (Mean@1, `jackpot.eval.sample_and_score`); greedy if
    `temperature` is None, else sampled."""
    examples = task.examples("eval", n, seed)
    if not examples:
        return float("nan")
    longest = getattr(task, "max_answer_len", None) or max(
        len(tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) for ex in examples)
    greedy = temperature is None
    scored = sample_and_score(HFRolloutEngine(model, tokenizer, eos_token_ids=[tokenizer.eos_token_id]), tokenizer,
                              task, examples, k=1, max_new_tokens=max_new_tokens or longest + 1,
                              temperature=1.0 if greedy else temperature, top_p=GREEDY_TOP_P if greedy else 1.0,
                              seed=None if greedy else seed)
    return scored.mean_at_k()


def train_tiny_model(
    spec: TinyModelSpec, *, eval_n: int = 100, progress: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, float]]:
    """Build the tokenizer and a tiny Qwen3 per `spec`, SFT it, and measure eval accuracy.

    Stats: `eval/{greedy,sampled}_acc_{before,after}` (sampled at temperature 1 on `eval_n`
    eval examples), `model/params`, and the `sft/*` stats of `pretrain`.
    """
    task = make_task(spec.task, **spec.task_kwargs)
    tokenizer = build_tokenizer(spec.tokenizer_name)
    model = build_tiny_qwen(
        len(tokenizer), hidden_size=spec.hidden, num_layers=spec.layers, num_heads=spec.heads,
        intermediate_size=spec.intermediate, seed=spec.seed, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    stats: dict[str, float] = {"model/params": float(sum(p.numel() for p in model.parameters()))}

    def measure(when: str) -> None:
        if eval_n > 0:
            stats[f"eval/greedy_acc_{when}"] = evaluate_accuracy(task, tokenizer, model, n=eval_n)
            stats[f"eval/sampled_acc_{when}"] = evaluate_accuracy(task, tokenizer, model, n=eval_n,
                                                                  temperature=1.0)

    measure("before")
    stats.update(pretrain(task, tokenizer, model, steps=spec.steps, batch_size=spec.batch_size,
                          lr=spec.lr, seed=spec.seed, progress=progress, desc=f"{spec.name}: pre-train (SFT)"))
    measure("after")
    return model, tokenizer, stats


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: TinyModelSpec,
          stats: dict[str, float], directory: Path) -> Path:
    """Atomic save of model + tokenizer, with spec.json and stats.json beside them."""
    extra = {"spec.json": json.dumps(dataclasses.asdict(spec), indent=2),
             "stats.json": json.dumps(stats, indent=2)}
    return save_model_and_tokenizer(model, tokenizer, directory, extra_files=extra)


def pretrained_model(spec: TinyModelSpec, cache_dir: str | Path, *, eval_n: int = 100,
                     progress: bool = True) -> Path:
    """Directory of the model `spec` describes, under `cache_dir/<name>-<spec.cache_key()>`.

    Built, pre-trained and saved atomically on first use; reused afterwards (its stats.json holds
    the accuracies measured when it was built).
    """
    key = spec.cache_key()
    cache_dir = Path(cache_dir).expanduser()
    for directory in sorted(cache_dir.glob(f"*-{key}")):  # any name: the key alone defines the model
        if (directory / "config.json").is_file():
            if progress:
                print(f"{spec.name}: the pre-trained tiny model is cached in {directory}", file=sys.stderr)
            return directory
    directory = cache_dir / f"{spec.name}-{key}"
    if progress:
        print(f"{spec.name}: pre-training a tiny model ({spec.hidden} wide, {spec.layers} layers) on {spec.task} "
              f"for {spec.steps} steps; it is cached in {directory} for later runs", file=sys.stderr)
    model, tokenizer, stats = train_tiny_model(spec, eval_n=eval_n, progress=progress)
    return _save(model, tokenizer, spec, stats, directory)


# ---------------------------------------------------------------------------------------------- CLI

def _task_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--task-arg must look like KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TinyModelSpec()
    parser.add_argument("--task", default=d.task, help="registered task name (default: %(default)s)")
    parser.add_argument("--task-arg", type=_task_arg, action="append", default=[], metavar="KEY=VALUE",
                        help="task argument, repeatable, e.g. --task-arg digits=2")
    parser.add_argument("--name", default=d.name, help="cache directory prefix (default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=d.hidden)
    parser.add_argument("--layers", type=int, default=d.layers)
    parser.add_argument("--heads", type=int, default=d.heads)
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 3 * hidden)")
    parser.add_argument("--steps", type=int, default=d.steps, help="SFT steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--eval-n", type=int, default=100, help="eval examples for accuracy (default: 100)")
    parser.add_argument("--out", type=Path, default=None,
                        help="save here; without it the model is cached under --cache-dir")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="model cache (default: $JACKPOT_CACHE_DIR/models, else ~/.cache/jackpot/models: "
                             "the one `jackpot train` uses)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def main(args: argparse.Namespace) -> int:
    if args.eval_n < 0:
        raise InputError(f"--eval-n must be >= 0, got {args.eval_n}")
    spec = TinyModelSpec(
        name=args.name, task=args.task, task_kwargs=dict(args.task_arg), hidden=args.hidden,
        layers=args.layers, heads=args.heads, intermediate=args.intermediate, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed,
    )
    if args.out is not None:
        model, tokenizer, stats = train_tiny_model(spec, eval_n=args.eval_n, progress=not args.no_progress)
        directory = _save(model, tokenizer, spec, stats, args.out)
    else:
        cache_dir = args.cache_dir if args.cache_dir is not None else default_cache_dir() / "models"
        directory = pretrained_model(spec, cache_dir, eval_n=args.eval_n, progress=not args.no_progress)
        stats = json.loads((directory / "stats.json").read_text())
    for key, value in stats.items():
        print(f"{key:28s} {value:.4g}")
    print(f"saved to {directory}")
    return 0
