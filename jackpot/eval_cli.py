"""`jackpot eval`: Mean@k and Pass@k of a model on a task, with every completion written out.

k completions are sampled for each of --prompts problems of the task's eval split (the same tasks and
`task.*` options as `jackpot train`), scored by the task's reward, and summarised as

    mean@k   the mean reward over all samples (for 0/1 rewards: the expected accuracy of one sample)
    pass@k   the unbiased estimator of "at least one of k samples is correct" (Chen et al. 2021; with exactly
             k samples per problem it is the fraction of problems with a correct sample)

written to --out as JSON (keys `mean@K` and `pass@K` with K the given k, plus what was evaluated), and one
JSON line per problem (prompt, reference answer, completions, rewards) to the same path with suffix .jsonl.
Problems are distinct: when the split has fewer than --prompts distinct problems (or a task draws a problem
twice), each is evaluated once, with a notice on stderr; the summary's `prompts` counts the distinct problems
evaluated and `prompts_requested` the --prompts asked for.
Sampling: --temperature, --top-p, --max-new-tokens (default: the task's, e.g. 1024 for file tasks),
--batch-size sequences per generate call, a progress bar over them; each call is seeded from --seed
(`jackpot.seeding.step_seed(seed, call, EVAL_STREAM)`).

Examples:
    jackpot eval --model Qwen/Qwen3-1.7B --k 4 --out evals/gsm8k.json --device cuda \\
        task.name=file task.options='{path: data/gsm8k_test.jsonl, prompt_field: question, eval_fraction: 1.0}'
    jackpot eval --model runs/policy --k 8 --out evals/chain.json task.name=reasoning-gym \\
        task.options='{dataset: chain_sum, size: 500}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from jackpot.core.dtypes import DTYPES
from jackpot.errors import InputError
from jackpot.eval import sample_and_score
from jackpot.fileio import write_text_atomic
from jackpot.rollout import ENGINE_SPECS, engine_options, make_engine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a Hugging Face checkpoint: local directory or hub id")
    parser.add_argument("--k", type=int, default=4, help="samples per problem (default: %(default)s)")
    parser.add_argument("--out", required=True, type=Path, help="the JSON summary; completions go to OUT.jsonl")
    parser.add_argument("--prompts", type=int, default=200, help="problems from the split (default: %(default)s)")
    parser.add_argument("--split", default="eval", choices=("eval", "train"))
    parser.add_argument("--config", default=None, help="a preset or YAML file to take task.* and sampling.* from")
    parser.add_argument("--temperature", type=float, default=None, help="default: sampling.temperature (1.0)")
    parser.add_argument("--top-p", type=float, default=None, help="default: sampling.top_p (1.0)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's response budget")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per generate call")
    parser.add_argument("--engine", default=None, choices=tuple(ENGINE_SPECS),
                        help="the rollout engine (default: rollout.engine, hf); its options as rollout.*=...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="task and sampling settings as for `jackpot train`, e.g. task.name=file")


def main(args: argparse.Namespace) -> int:
    from jackpot.train.config import build_config  # the same task.*, sampling.*, rollout.* as `jackpot train`

    cfg = build_config(args.config, [*args.overrides, *([f"rollout.engine={args.engine}"] if args.engine else [])])
    s = cfg.sampling
    settings = {"temperature": args.temperature if args.temperature is not None else s.temperature,
                "top_p": args.top_p if args.top_p is not None else s.top_p,
                "max_new_tokens": args.max_new_tokens if args.max_new_tokens is not None else s.max_new_tokens}
    for name, value in (("--k", args.k), ("--prompts", args.prompts), ("--batch-size", args.batch_size),
                        ("--max-new-tokens", settings["max_new_tokens"])):
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    if not settings["temperature"] > 0:
        raise InputError(f"--temperature must be > 0, got {settings['temperature']}")
    if not 0 < settings["top_p"] <= 1:
        raise InputError(f"--top-p must be in (0, 1], got {settings['top_p']}")
    if args.out.suffix == ".jsonl":
        raise InputError(f"--out {args.out}: give the JSON summary's path; the completions go beside it as .jsonl")
    summary = evaluate_model(args.model, cfg, k=args.k, prompts=args.prompts, split=args.split,
                             batch_size=args.batch_size, seed=args.seed, device=args.device, dtype=args.dtype,
                             out=args.out, progress=not args.no_progress, **settings)
    print(f"{args.model}: mean@{args.k} {summary[f'mean@{args.k}']:.4f}  pass@{args.k} "
          f"{summary[f'pass@{args.k}']:.4f}  ({summary['prompts']} problems; {args.out}, {summary['completions']})")
    return 0


@torch.no_grad()
def evaluate_model(model_path: str, cfg, *, k: int, prompts: int, split: str, batch_size: int, seed: int,
                   device: str, dtype: str, out: Path, temperature: float, top_p: float, max_new_tokens: int,
                   progress: bool = True) -> dict:
    """Sample, score and write the summary (returned) and the per-problem JSONL; see the module docstring."""
    from jackpot.models.loading import load_model, load_tokenizer
    from jackpot.tasks import make_task

    start = time.perf_counter()
    task = make_task(cfg.task.name, **cfg.task.options)
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, dtype=dtype, device=device)
    engine = make_engine(cfg.rollout.engine, model, tokenizer, **engine_options(cfg.rollout, cfg.sampling.topk))
    examples = list(dict.fromkeys(task.examples(split, prompts, seed)))  # a split smaller than --prompts repeats
    if len(examples) < prompts:
        print(f"jackpot eval: --prompts {prompts}, but the {split} split gave {len(examples)} distinct problems; "
              f"evaluating those {len(examples)}", file=sys.stderr)
    try:
        scored = sample_and_score(engine, tokenizer, task, examples, k=k, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, seed=seed,
                                  chat_template=cfg.task.chat_template, batch_size=batch_size, progress=progress)
    finally:
        engine.close()
    completions, rewards = scored.completions, scored.rewards
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    per_example = out.with_suffix(".jsonl")
    lines = [json.dumps({"index": i, "prompt": ex.prompt, "answer": ex.answer,
                         "completions": completions[i * k:(i + 1) * k], "rewards": rewards[i].tolist()})
             for i, ex in enumerate(examples)]
    write_text_atomic(per_example, "".join(line + "\n" for line in lines))
    summary = {
        f"mean@{k}": scored.mean_at_k(), f"pass@{k}": scored.pass_at_k(), "k": k, "prompts": len(examples),
        "prompts_requested": prompts,
        "split": split, "model": str(model_path), "task": {"name": cfg.task.name, "options": cfg.task.options},
        "sampling": {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed},
        "engine": cfg.rollout.engine, "completions": str(per_example), "seconds": time.perf_counter() - start,
    }
    write_text_atomic(out, json.dumps(summary, indent=2))
    return summary
