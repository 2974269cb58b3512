"""`jackpot train`: RL-train a policy on rollouts from a (smaller) rollout model, corrected with Jackpot.

With no arguments it runs the offline default: two tiny Qwen3-architecture models are pre-trained on
2-digit addition (cached), then the larger policy is trained from the smaller model's rollouts with
Jackpot, and a summary table compares the policy before and after.

Examples:
    jackpot train
    jackpot train --config tis-reverse-kl --out runs/tis
    jackpot train train.steps=50 correction.name=tis distill.coef=0
    jackpot train --out runs/default --resume
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from jackpot.fileio import write_text_atomic
from jackpot.metrics import read_metrics
from jackpot.train.config import build_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="a preset name (jackpot/configs: decoupled-none, tis-reverse-kl, on-policy, ...) or a "
                             "YAML config file (which may name a `preset:`)")
    parser.add_argument("--out", default=None, help="run directory (default: runs/<mode>-<correction>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run directory's latest checkpoint, with the run's saved config "
                             "(unless --config is given) plus any overrides")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--reference", default=None,
                        help="an on-policy run directory to compare with in the summary (default: a sibling "
                             "'on-policy-none' run, if there is one)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="config overrides, e.g. train.steps=10 correction.name=tis")


def main(args: argparse.Namespace) -> int:
    from jackpot.train.loop import train

    cfg = build_config(args.config, args.overrides)
    out = Path(args.out or f"runs/{cfg.train.mode}-{cfg.correction.name}")
    if args.resume and args.config is None and (out / "config.yaml").is_file():
        cfg = build_config(str(out / "config.yaml"), args.overrides)  # the run's own config, plus overrides
    run_dir = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:  # several processes: rank 0 summarises
        return 0
    summary = summarize(run_dir)
    reference = Path(args.reference) if args.reference else run_dir.parent / "on-policy-none"
    if reference.resolve() != run_dir.resolve() and (reference / "metrics.jsonl").is_file():
        ref = summarize(reference)
        summary["reference"] = {"run": str(reference), "eval_after": ref["eval_after"], "steps": ref["steps"]}
    elif args.reference:
        raise FileNotFoundError(f"--reference {reference}: no metrics.jsonl there")
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    print_summary(summary, run_dir)
    return 0


def summarize(run_dir: str | Path) -> dict:
    """Headline figures of a run from its metrics.jsonl: eval before/after and means over training."""
    records = read_metrics(run_dir)
    evals = [r for r in records if r.get("eval/accuracy") is not None]
    train_steps = [r for r in records if r["step"] > 0]

    def mean(key: str) -> float | None:
        vals = [r[key] for r in train_steps if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    return {
        "steps": train_steps[-1]["step"] if train_steps else 0,
        "eval_before": evals[0].get("eval/accuracy") if evals else None,
        "eval_after": evals[-1].get("eval/accuracy") if evals else None,
        "rollout_model_eval_before": evals[0].get("eval_rollout_model/accuracy") if evals else None,
        "rollout_model_eval_after": evals[-1].get("eval_rollout_model/accuracy") if evals else None,
        "reward_mean": mean("reward/mean"),
        "accept_rate_mean": mean("obrs/accept_rate"),
        "actor_policy_kl_k3_mean": mean("mismatch/kl_k3"),
        "actor_policy_kl_k3_last": train_steps[-1].get("mismatch/kl_k3") if train_steps else None,
        "rollout_s_mean": mean("perf/rollout_s"),
        "update_s_mean": mean("perf/update_s"),
        "step_s_mean": mean("perf/step_s"),
    }


def print_summary(summary: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(v: float | None, spec: str = ".3f") -> str:
        return "n/a" if v is None else format(v, spec)

    table = Table(title=f"jackpot train — {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("policy eval accuracy, before", fmt(summary["eval_before"])),
        ("policy eval accuracy, after", fmt(summary["eval_after"])),
        ("on-policy reference, after" + (f" ({summary['reference']['run']})" if "reference" in summary else ""),
         fmt(summary["reference"]["eval_after"]) if "reference" in summary
         else "n/a (jackpot train --config on-policy)"),
        ("rollout model eval accuracy, before", fmt(summary["rollout_model_eval_before"])),
        ("rollout model eval accuracy, after", fmt(summary["rollout_model_eval_after"])),
        ("mean train reward", fmt(summary["reward_mean"])),
        ("mean OBRS acceptance rate", fmt(summary["accept_rate_mean"])),
        ("actor-policy KL (k3), mean / last", f"{fmt(summary['actor_policy_kl_k3_mean'], '.4f')} / "
                                              f"{fmt(summary['actor_policy_kl_k3_last'], '.4f')}"),
        ("seconds per step: rollout / update", f"{fmt(summary['rollout_s_mean'], '.2f')} / "
                                               f"{fmt(summary['update_s_mean'], '.2f')}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
