"""Sweep one config field over values on a preset, for several seeds, and write a markdown table.

    python scripts/sweep.py correction.c1 null 2 5 10 --preset jackpot --seeds 0 1 train.threads=1
    python scripts/sweep.py correction.c2 null 2 5 --preset staleness-jackpot --results docs/sweep-c2.md

Seed s varies the RL seed and the pre-trained pair (policy.seed + s, rollout_model.seed + s), as in
scripts/compare.py; every value of seed s shares that pair, so "Δ vs first (paired)" — the accuracy gain
minus the first value's on the same seed — removes the pair-to-pair spread. Besides accuracy, the table
reports what a weight clip acts on: the largest weight per step (mean over steps, and its maximum over the
run), the fraction of tokens the clip binds, the policy's gradient norm and the actor–policy KL.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from compare import mean_std, train_once  # noqa: E402

from jackpot.fileio import write_text_atomic  # noqa: E402
from jackpot.metric_names import ICEPOP, OBRS, OBRS_C1_CLIPPED_FRAC, POLICY_GRAD_NORM, TIS, WEIGHT_MAX  # noqa: E402
from jackpot.metrics import read_metrics  # noqa: E402


def _run(preset: str, field: str, value: str, seed: int, out: Path, overrides: list[str]) -> dict:
    run_dir = train_once(preset, seed, out / f"{field}={value}-seed{seed}", [*overrides, f"{field}={value}"])
    records = [r for r in read_metrics(run_dir) if r["step"] > 0]
    summary = json.loads((run_dir / "summary.json").read_text())

    def series(*keys: str) -> list[float]:
        for key in keys:
            vals = [r[key] for r in records if r.get(key) is not None]
            if vals:
                return vals
        return []

    w_max = series(*(prefix + WEIGHT_MAX for prefix in (OBRS, TIS, ICEPOP)))
    return {
        "delta": summary["eval_after"] - summary["eval_before"],
        "w_max_mean": statistics.mean(w_max) if w_max else None,
        "w_max_max": max(w_max) if w_max else None,
        "clipped": statistics.mean(series(OBRS_C1_CLIPPED_FRAC)) if series(OBRS_C1_CLIPPED_FRAC) else None,
        "grad_norm": statistics.mean(series(POLICY_GRAD_NORM)),
        "kl": summary["actor_policy_kl_k3_mean"],
        "accept": summary["accept_rate_mean"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("field", help="config field, e.g. correction.c1")
    ap.add_argument("values", nargs="+", help="values (YAML scalars; null for None)")
    ap.add_argument("--preset", default="jackpot")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default=None, help="run directory (default runs/sweep-FIELD)")
    ap.add_argument("--results", default=None, help="markdown file to write (default: print only)")
    ap.add_argument("--overrides", nargs="*", default=[], help="config overrides applied to every run")
    args = ap.parse_args()
    out = Path(args.out or f"runs/sweep-{args.preset}-{args.field}")
    rows = {v: [_run(args.preset, args.field, v, s, out, args.overrides) for s in args.seeds] for v in args.values}
    first = rows[args.values[0]]
    lines = [f"Sweep of `{args.field}` on preset `{args.preset}`, seeds {args.seeds} (each its own pre-trained pair), "
             f"overrides {args.overrides or 'none'}: `python scripts/sweep.py {args.field} {' '.join(args.values)} "
             f"--preset {args.preset} --seeds {' '.join(map(str, args.seeds))}`\n",
             f"| {args.field} | eval Δ | Δ vs {args.values[0]} (paired) | max weight per step (mean) "
             "| max weight over run | clipped fraction | policy grad norm | acceptance | actor–policy KL k3 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v, rs in rows.items():
        paired = [r["delta"] - f["delta"] for r, f in zip(rs, first, strict=True)] if v != args.values[0] else []
        col = {key: mean_std([r[key] for r in rs], spec) for key, spec in (
            ("delta", "+.3f"), ("w_max_mean", ".2f"), ("w_max_max", ".1f"), ("clipped", ".4f"), ("grad_norm", ".3f"),
            ("accept", ".3f"), ("kl", ".3f"))}
        lines.append(f"| {v} | {col['delta']} | {mean_std(paired, '+.3f')} | {col['w_max_mean']} | {col['w_max_max']} "
                     f"| {col['clipped']} | {col['grad_norm']} | {col['accept']} | {col['kl']} |")
    text = "\n".join(lines) + "\n"
    if args.results:
        write_text_atomic(Path(args.results), text)
    print(text)


if __name__ == "__main__":
    main()
