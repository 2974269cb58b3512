"""`jackpot train`: RL-train a policy on rollouts from a (smaller) rollout model, corrected with Jackpot.

With no arguments it runs the offline default: two tiny Qwen3-architecture models are pre-trained on
2-digit addition (cached under $JACKPOT_CACHE_DIR, default ~/.cache/jackpot), then the larger policy is
trained from the smaller model's rollouts with Jackpot, and a summary table compares the policy before and
after. Each run gets its own directory (default: $JACKPOT_RUNS_DIR or ./runs, then
<mode>-<correction>-<date>-<time>).

Examples:
    jackpot train
    jackpot train --config tis-reverse-kl --out runs/tis train.steps=50
    jackpot train train.steps=50 correction.name=tis distill.coef=0
    jackpot train --out runs/tis --resume train.steps=100
    jackpot config                      (every field with its default and docstring, and the presets)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

from jackpot.errors import JackpotError, warn
from jackpot.fileio import write_text_atomic
from jackpot.train.config import build_config, default_runs_dir, describe_fields, describe_presets, presets
from jackpot.train.preflight import check_run
from jackpot.train.summary import print_summary, summarize
from jackpot.train.threads import choose_threads

__all__ = ["add_arguments", "main", "summarize"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help=f"a preset name ({', '.join(presets())}) or a YAML config file (which may name a "
                             "`preset:`)")
    parser.add_argument("--out", default=None,
                        help="run directory (default: a new one under $JACKPOT_RUNS_DIR or ./runs, named "
                             "<mode>-<correction>-<date>-<time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run directory's latest checkpoint, with the run's saved config "
                             "(unless --config is given) plus any overrides; a run that stopped before its "
                             "first checkpoint starts again from step 0")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--reference", default=None,
                        help="an on-policy run directory to compare with in the summary (default: the newest "
                             "on-policy run beside this one with the same task and policy, if any)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="config overrides, e.g. train.steps=10 correction.name=tis (all fields below)")
    parser.epilog = (f"presets (--config NAME):\n{describe_presets()}\n\n"
                     f"config fields (section.field = default):\n{describe_fields()}")


def default_out(cfg, now: float | None = None) -> Path:
    """A new directory under the runs root: <mode>-<correction>-<YYYYmmdd-HHMMSS>[-N]."""
    root = default_runs_dir()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    base = f"{cfg.train.mode}-{cfg.correction.name}-{stamp}"
    out, n = root / base, 1
    while out.exists():
        n += 1
        out = root / f"{base}-{n}"
    return out


def _started_without_checkpoint(out: Path) -> bool:
    from jackpot.train.checkpoint import holds_run, latest_checkpoint

    return latest_checkpoint(out) is None and holds_run(out)


def _clear_unfinished(out: Path) -> None:
    """Remove what a run that died before its first complete checkpoint wrote, so it can start again."""
    for name in ("metrics.jsonl", "summary.json", "tensorboard", "checkpoints", "wandb_id"):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def main(args: argparse.Namespace) -> int:
    from jackpot.train.loop import train

    cfg = build_config(args.config, args.overrides)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1 and not args.out:  # each process would pick its own timestamped directory
        raise JackpotError(f"several processes (WORLD_SIZE={processes}) need one run directory: pass --out DIR")
    out = Path(args.out) if args.out else default_out(cfg)
    if args.resume and args.config is None and (out / "config.yaml").is_file():
        cfg = build_config(str(out / "config.yaml"), args.overrides)  # the run's own config, plus overrides
    resume = args.resume
    if resume and _started_without_checkpoint(out):
        if processes > 1:
            raise JackpotError(f"{out} holds a run that stopped before its first checkpoint; start it again with "
                               "one process (--resume) or remove the directory")
        warn(f"{out} holds a run that stopped before its first checkpoint: starting it again from step 0")
        resume = False
    elif not resume:
        from jackpot.train.checkpoint import refuse_used_run_dir

        refuse_used_run_dir(out)
    check_run(cfg, out)
    if args.resume and not resume:
        _clear_unfinished(out)
    interrupted = False
    try:
        run_dir = train(cfg, out, resume=resume, progress=not args.no_progress)
    except KeyboardInterrupt as e:
        if not (out / "metrics.jsonl").is_file():
            raise
        print(f"jackpot: {e or 'interrupted'}", file=sys.stderr)  # "interrupted after step N; checkpoint saved in"
        run_dir, interrupted = out, True
    if int(os.environ.get("RANK", "0")) != 0:  # several processes: rank 0 summarises
        return 130 if interrupted else 0
    summary = summarize(run_dir)
    summary["threads"], summary["threads_why"] = torch.get_num_threads(), choose_threads(cfg)[1]
    _add_reference(summary, run_dir, args.reference, cfg)
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    print_summary(summary, str(run_dir), interrupted=interrupted)
    return 130 if interrupted else 0


def _add_reference(summary: dict, run_dir: Path, reference: str | None, cfg) -> None:
    """Put the eval accuracy of an on-policy run (given, or the newest matching sibling) into the summary."""
    if reference is not None:
        ref_dir = Path(reference)
        if not (ref_dir / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"--reference {ref_dir}: no metrics.jsonl there")
    else:
        ref_dir = _matching_on_policy_run(run_dir, cfg)
        if ref_dir is None:
            return
    ref = summarize(ref_dir)
    summary["reference"] = {"run": str(ref_dir), "eval_after": ref["eval_after"], "steps": ref["steps"]}


def _matching_on_policy_run(run_dir: Path, cfg) -> Path | None:
    """The newest sibling run directory trained on-policy on the same task from the same policy."""
    if not cfg.decoupled or not run_dir.parent.is_dir():
        return None
    found = []
    for sibling in run_dir.parent.iterdir():
        config = sibling / "config.yaml"
        if sibling == run_dir or not config.is_file() or not (sibling / "metrics.jsonl").is_file():
            continue
        try:
            other = yaml.safe_load(config.read_text()) or {}
        except yaml.YAMLError:
            continue
        same = (other.get("train", {}).get("mode") == "on-policy" and other.get("task") == _plain(cfg.task)
                and other.get("policy") == _plain(cfg.policy))
        if same:
            found.append((config.stat().st_mtime, sibling))
    return max(found)[1] if found else None


def _plain(section) -> dict:
    import dataclasses

    return dataclasses.asdict(section)
