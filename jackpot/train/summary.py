"""The end-of-run summary of `jackpot train` (also printed after Ctrl-C): what happened, how sure we are
of it, and where to look next.

`summarize(run_dir)` reads the run's metrics.jsonl and config.yaml into the figures of summary.json;
`summary_rows(summary)` turns them into (label, value) rows, `print_summary` into a table. Each evaluation
logs `eval/accuracy` (Mean@k over the held-out prompts) and its standard error over prompts
(`eval/accuracy_se`); the change before -> after is given with sqrt(se_before^2 + se_after^2), which
over-states the noise of the paired difference (the same prompts are evaluated both times), never
under-states it.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

import yaml

from jackpot.metric_names import (
    EVAL_ACCURACY,
    EVAL_ACCURACY_SE,
    EVAL_ROLLOUT_MODEL_ACCURACY,
    EVAL_ROLLOUT_MODEL_ACCURACY_SE,
    MISMATCH_KL_K3,
    MISMATCH_ROLLOUT_MODEL_KL_K3,
    OBRS_ACCEPT_RATE,
    PERF_FLOPS,
    PERF_GPU_MODEL_S,
    PERF_ROLLOUT_S,
    PERF_ROLLOUT_WAIT_S,
    PERF_STEP_S,
    PERF_UPDATE_S,
    REWARD_MEAN,
    ROLLOUT_STALENESS,
    perf_flops,
    perf_gpu_model_s,
)
from jackpot.metrics import read_metrics
from jackpot.train.costs import PHASES, ROOFLINE

GPU_MODEL_NOTE = (f"modelled, not measured: a roofline of an H100 ({ROOFLINE.bandwidth / 1e12:g} TB/s, "
                  f"{ROOFLINE.peak_flops / 1e12:g} TFLOP/s bf16 x {ROOFLINE.efficiency:g}), docs/METHOD.md §11")


def summarize(run_dir: str | Path) -> dict:
    """Headline figures of a run from its metrics.jsonl (and config.yaml): eval before/after with their
    standard errors, means over training, what sampled the train rewards."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    evals = [r for r in records if r.get(EVAL_ACCURACY) is not None]
    train_steps = [r for r in records if r["step"] > 0]
    config_file = run_dir / "config.yaml"
    cfg = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    train_cfg = cfg.get("train", {})

    def mean(key: str) -> float | None:
        vals = [r[key] for r in train_steps if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    def total(key: str) -> float | None:
        vals = [r[key] for r in train_steps if r.get(key) is not None]
        return sum(vals) if vals else None

    def at(i: int, key: str):
        return evals[i].get(key) if evals else None

    return {
        "run_dir": str(run_dir.resolve()),
        "steps": train_steps[-1]["step"] if train_steps else 0,
        "steps_planned": train_cfg.get("steps"),
        "mode": train_cfg.get("mode"),
        "rollout_model_training": cfg.get("distill", {}).get("rollout_model"),
        "eval_prompts": train_cfg.get("eval_prompts"),
        "eval_samples": train_cfg.get("eval_samples"),
        "eval_before": at(0, EVAL_ACCURACY),
        "eval_before_se": at(0, EVAL_ACCURACY_SE),
        "eval_before_step": at(0, "step"),
        "eval_after": at(-1, EVAL_ACCURACY),
        "eval_after_se": at(-1, EVAL_ACCURACY_SE),
        "eval_after_step": at(-1, "step"),
        "rollout_model_eval_before": at(0, EVAL_ROLLOUT_MODEL_ACCURACY),
        "rollout_model_eval_before_se": at(0, EVAL_ROLLOUT_MODEL_ACCURACY_SE),
        "rollout_model_eval_after": at(-1, EVAL_ROLLOUT_MODEL_ACCURACY),
        "rollout_model_eval_after_se": at(-1, EVAL_ROLLOUT_MODEL_ACCURACY_SE),
        "reward_mean": mean(REWARD_MEAN),
        "accept_rate_mean": mean(OBRS_ACCEPT_RATE),
        "actor_policy_kl_k3_mean": mean(MISMATCH_KL_K3),
        "actor_policy_kl_k3_last": train_steps[-1].get(MISMATCH_KL_K3) if train_steps else None,
        "rollout_s_mean": mean(PERF_ROLLOUT_S),
        "update_s_mean": mean(PERF_UPDATE_S),
        "step_s_mean": mean(PERF_STEP_S),
        "staleness_mean": mean(ROLLOUT_STALENESS),
        "sampler_drift_kl_k3_mean": mean(MISMATCH_ROLLOUT_MODEL_KL_K3),  # the sampling weights then vs now
        "rollout_wait_s_mean": mean(PERF_ROLLOUT_WAIT_S),  # async only: the trainer waiting for its batch
        "train_wall_s": total(PERF_STEP_S),  # measured, evaluation excluded
        "flops": total(PERF_FLOPS),  # jackpot.train.costs: counted from the models' sizes and the tokens
        "flops_by_phase": {p: total(perf_flops(p)) for p in PHASES},
        "gpu_model_s": total(PERF_GPU_MODEL_S),
        "gpu_model_s_by_phase": {p: total(perf_gpu_model_s(p)) for p in PHASES},
        "gpu_model": GPU_MODEL_NOTE,
    }


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def _with_se(value: float | None, se: float | None) -> str:
    return _fmt(value) + (f" ± {se:.3f}" if value is not None and se is not None else "")


def _change(before: float | None, after: float | None, se_b: float | None, se_a: float | None) -> str:
    if before is None or after is None:
        return "n/a"
    text = f"{after - before:+.3f}"
    if se_b is not None and se_a is not None:
        se = math.hypot(se_b, se_a)
        verdict = "larger than" if abs(after - before) > 2 * se else "within"
        text += f" ± {se:.3f} ({verdict} 2 standard errors)"
    return text


def _rollout_model_note(s: dict) -> str:
    if s.get("rollout_model_training") == "frozen":
        return "frozen (distill.rollout_model=frozen): not trained, so before and after agree"
    return ("trained jointly on the same samples (its own PPO + distillation toward the policy, eq. 8), so its "
            "accuracy moves with that training: it is pulled toward the policy, which it may be too small to follow")


def summary_rows(s: dict) -> list[tuple[str, str]]:
    """(label, value) rows of a summary, in reading order."""
    decoupled = s.get("mode") != "on-policy"
    rows = [
        (f"policy eval accuracy, before (step {s.get('eval_before_step', 0)})",
         _with_se(s["eval_before"], s.get("eval_before_se"))),
        (f"policy eval accuracy, after (step {s.get('eval_after_step', s['steps'])})",
         _with_se(s["eval_after"], s.get("eval_after_se"))),
        ("policy eval accuracy, change", _change(s["eval_before"], s["eval_after"], s.get("eval_before_se"),
                                                 s.get("eval_after_se"))),
    ]
    if "reference" in s:
        rows.append((f"on-policy reference, after ({s['reference']['run']})", _fmt(s["reference"]["eval_after"])))
    elif decoupled:
        rows.append(("on-policy reference, after", "n/a (run one: jackpot train --config on-policy)"))
    if decoupled:
        rows += [
            ("rollout model eval accuracy, before", _with_se(s["rollout_model_eval_before"],
                                                             s.get("rollout_model_eval_before_se"))),
            ("rollout model eval accuracy, after", _with_se(s["rollout_model_eval_after"],
                                                            s.get("rollout_model_eval_after_se"))),
            ("mean train reward (rollout model's samples)", _fmt(s["reward_mean"])),
            ("mean OBRS acceptance rate", _fmt(s["accept_rate_mean"])),
            ("actor-policy KL (k3), mean / last", f"{_fmt(s['actor_policy_kl_k3_mean'], '.4f')} / "
                                                  f"{_fmt(s['actor_policy_kl_k3_last'], '.4f')}"),
        ]
    else:
        rows.append(("mean train reward (policy's own samples)", _fmt(s["reward_mean"])))
    rows.append(("seconds per step: rollout / update",
                 f"{_fmt(s['rollout_s_mean'], '.2f')} / {_fmt(s['update_s_mean'], '.2f')}"))
    if s.get("flops") is not None:
        phases = s["flops_by_phase"]
        rows.append(("FLOPs: generation / prepare / update (policy, rollout model)",
                     " / ".join(_fmt(phases[p], ".3g") for p in PHASES[:2]) + " / ("
                     + ", ".join(_fmt(phases[p], ".3g") for p in PHASES[2:]) + ")"))
        rows.append(("modelled H100 seconds, generation / all (a model)",
                     f"{_fmt(s['gpu_model_s_by_phase']['generation'], '.3g')} / {_fmt(s['gpu_model_s'], '.3g')}"))
    if "threads" in s:
        rows.append(("torch CPU threads", f"{s['threads']} ({s['threads_why']})"))
    return rows


def notes(s: dict) -> list[str]:
    """How to read the table: what the evaluation is; why the rollout model's accuracy moved."""
    k, n = s.get("eval_samples"), s.get("eval_prompts")
    lines = [f"eval accuracy: Mean@{k} on {n} held-out prompts, ± its standard error over prompts"
             if k and n else "eval accuracy: ± its standard error over prompts"]
    if s.get("mode") != "on-policy":
        lines.append("train reward: of the rollout model's samples, the ones the policy learns from")
        lines.append(f"rollout model: {_rollout_model_note(s)}")
    return lines


def next_steps(s: dict) -> list[str]:
    """What to run next: look at the curves; continue an interrupted run."""
    run = shlex.quote(s["run_dir"])
    lines = [f"run directory: {s['run_dir']}", f"plot it:       jackpot plot {run}"]
    final = Path(s["run_dir"]) / "final" / "policy"
    if final.is_dir():
        lines.append(f"evaluate it:   jackpot eval --model {shlex.quote(str(final))} --k 4 --out "
                     f"{shlex.quote(str(final.parent / 'eval.json'))}   (the trained policy, a Hugging Face directory)")
    planned = s.get("steps_planned")
    if planned is not None and s["steps"] < planned:
        lines.append(f"continue it:   jackpot train --out {run} --resume   (stopped after step {s['steps']} of "
                     f"{planned})")
    return lines


def print_summary(s: dict, title: str, interrupted: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"jackpot train — {title}" + (" (interrupted)" if interrupted else ""))
    table.add_column("metric", no_wrap=True)
    table.add_column("value", justify="right", overflow="fold")
    for label, value in summary_rows(s):
        table.add_row(label, value)
    console = Console()
    console.print(table)
    for line in notes(s) + [""] + next_steps(s):
        console.print(line, highlight=False, soft_wrap=True)
