"""The long-horizon study of the distillation controller (distill.target_kl) and write docs/RESULTS-long.md.

    python scripts/long_study.py --seeds 0            # one seed of every arm
    python scripts/long_study.py --seeds 0 1 2        # more seeds: finished runs are kept, not re-run
    python scripts/long_study.py --seeds 0 1 2 --report-only   # the page from the runs finished so far

Arms, 1,000 steps each, on the default pair and on the wide-gap pair (its rollout model pre-trained half as
long): on-policy (the policy samples its own rollouts; the pair's rollout model plays no part, so one run serves
both pairs), Jackpot with the fixed distillation coefficient (paper eq. 8), Jackpot with the coefficient under
distill.target_kl (docs/METHOD.md §10), and TIS + reverse-KL distillation (the paper's strongest baseline).
Seeds vary the RL seed only, every seed on the presets' pre-trained pair (scripts/compare.py --fixed-pair), so
the study pre-trains one pair per pair. Runs go seed by seed, so an interrupted study holds whole seeds.

Per arm the table gives the policy's accuracy before and after, its change paired with on-policy on the same seed,
the actor-policy gap (mismatch/kl_k3) and the acceptance over the first and the last 100 steps, the
distillation coefficient over the last 100 steps, and the distillation loss it weights (rollout_model/distill_kl,
in the arm's own direction) over the first and the last 100; the figures draw them over the steps. A second
table per pair gives each run's largest one-batch gap and, under the controller, when its coefficient reached
the upper bound and how often the gap was below the target.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from compare import mean_std, train_once, write_page  # noqa: E402

from jackpot.metric_names import (  # noqa: E402
    EVAL_ACCURACY,
    EVAL_ROLLOUT_MODEL_ACCURACY,
    MISMATCH_KL_K3,
    OBRS_ACCEPT_RATE,
    ROLLOUT_MODEL_DISTILL_COEF,
    ROLLOUT_MODEL_DISTILL_KL,
)
from jackpot.metrics import read_metrics  # noqa: E402
from jackpot.plot import plot_runs  # noqa: E402

PAIRS = {  # figure name -> presets, the paired reference first
    "default": ["on-policy", "jackpot", "jackpot-kl-control", "tis-reverse-kl"],
    "wide-gap": ["on-policy", "wide-gap-jackpot", "wide-gap-jackpot-kl-control", "wide-gap-tis"],
}
OVERRIDES = ["train.steps=1000", "train.eval_every=50", "train.checkpoint_every=250", "train.threads=1",
             "tensorboard=false"]
WINDOW = 100  # steps averaged at the start and at the end of a run


def _finished(out: Path, preset: str, seeds: list[int]) -> list[Path]:
    return [d for d in (out / f"{preset}-seed{s}" for s in seeds) if (d / "summary.json").is_file()]


def _figures(run_dir: Path) -> dict[str, float | None]:
    records = read_metrics(run_dir)
    steps = [r for r in records if r["step"] > 0]
    evals = [r[EVAL_ACCURACY] for r in records if r.get(EVAL_ACCURACY) is not None]
    rollout_evals = [r[EVAL_ROLLOUT_MODEL_ACCURACY] for r in records if r.get(EVAL_ROLLOUT_MODEL_ACCURACY) is not None]

    def mean(key: str, part: list[dict]) -> float | None:
        vals = [r[key] for r in part if r.get(key) is not None]
        return statistics.mean(vals) if vals else None

    first, last = steps[:WINDOW], steps[-WINDOW:]
    return {"before": evals[0], "after": evals[-1], "delta": evals[-1] - evals[0], "best": max(evals),
            "rollout_after": rollout_evals[-1] if rollout_evals else None,
            "kl_first": mean(MISMATCH_KL_K3, first), "kl_last": mean(MISMATCH_KL_K3, last),
            "accept_first": mean(OBRS_ACCEPT_RATE, first), "accept_last": mean(OBRS_ACCEPT_RATE, last),
            "coef_last": mean(ROLLOUT_MODEL_DISTILL_COEF, last), "distill_first": mean(ROLLOUT_MODEL_DISTILL_KL, first),
            "distill_last": mean(ROLLOUT_MODEL_DISTILL_KL, last)}


def table(out: Path, presets: list[str], seeds: list[int]) -> str:
    """One row per preset over its finished seeds; 'Δ vs on-policy' pairs each seed with on-policy's."""
    ref = {d.name.rsplit("-seed", 1)[1]: _figures(d)["delta"] for d in _finished(out, presets[0], seeds)}
    lines = [f"| arm | seeds | eval before | eval after | Δ | Δ vs {presets[0]} (paired) | best eval | rollout model "
             f"eval after | KL k3, first {WINDOW} | KL k3, last {WINDOW} | acceptance, first {WINDOW} | acceptance, "
             f"last {WINDOW} | distill coef, last {WINDOW} | distill KL, first {WINDOW} | distill KL, last {WINDOW} |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for preset in presets:
        dirs = _finished(out, preset, seeds)
        rows = [_figures(d) for d in dirs]
        paired = [r["delta"] - ref[d.name.rsplit("-seed", 1)[1]] for r, d in zip(rows, dirs, strict=True)
                  if preset != presets[0] and d.name.rsplit("-seed", 1)[1] in ref]
        col = {key: mean_std([r[key] for r in rows], spec) for key, spec in (
            ("before", ".3f"), ("after", ".3f"), ("delta", "+.3f"), ("best", ".3f"), ("rollout_after", ".3f"),
            ("kl_first", ".3f"), ("kl_last", ".3f"), ("accept_first", ".3f"), ("accept_last", ".3f"),
            ("coef_last", ".3g"), ("distill_first", ".3f"), ("distill_last", ".3f"))}
        seeds_done = ", ".join(d.name.rsplit("-seed", 1)[1] for d in dirs) or "none"
        lines.append(f"| {preset} | {seeds_done} | {col['before']} | {col['after']} | {col['delta']} "
                     f"| {mean_std(paired, '+.3f')} | {col['best']} | {col['rollout_after']} | {col['kl_first']} "
                     f"| {col['kl_last']} | {col['accept_first']} | {col['accept_last']} | {col['coef_last']} "
                     f"| {col['distill_first']} | {col['distill_last']} |")
    return "\n".join(lines) + "\n"


def tails(out: Path, presets: list[str], seeds: list[int]) -> str:
    """Per run: the largest one-batch gap, and under the controller the first step its coefficient reached
    distill.coef_max and the fraction of steps whose gap was below distill.target_kl."""
    lines = ["| run | largest one-batch KL k3 (step) | coefficient at its upper bound from step "
             "| steps with KL k3 below the target |", "|---|---|---|---|"]
    for d in [d for p in presets for d in _finished(out, p, seeds)]:
        steps = [r for r in read_metrics(d) if r["step"] > 0]
        top = max(steps, key=lambda r: r[MISMATCH_KL_K3])
        distill = yaml.safe_load((d / "config.yaml").read_text())["distill"]
        at_bound = below = "–"
        if distill.get("target_kl") is not None:
            at_bound = next((str(r["step"]) for r in steps
                             if r[ROLLOUT_MODEL_DISTILL_COEF] >= distill["coef_max"]), "never")
            below = f"{sum(r[MISMATCH_KL_K3] < distill['target_kl'] for r in steps) / len(steps):.1%}"
        lines.append(f"| {d.name} | {top[MISMATCH_KL_K3]:.2f} ({top['step']}) | {at_bound} | {below} |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, seeds: list[int], path: Path) -> None:
    dirs = [d for presets in PAIRS.values() for p in presets for d in _finished(out, p, seeds)]
    commits = sorted({json.loads((d / "summary.json").read_text()).get("commit", "unrecorded") for d in dirs})
    parts = ["# Results: 1,000 steps, with and without the distillation controller\n\n",
             f"Produced by `python scripts/long_study.py --seeds {' '.join(map(str, seeds))}` (runs made at commit"
             f"{'s' if len(commits) > 1 else ''} {', '.join(commits) or 'none'}; overrides of every run: "
             f"`{' '.join(OVERRIDES)}`; every seed on the presets' pre-trained pair). Mean ± standard deviation over "
             "the seeds listed in each row; 'eval' is Mean@4 accuracy on 200 held-out problems; KL k3 is "
             "`mismatch/kl_k3`, the actor–policy gap the controller acts on.\n"]
    for name, presets in PAIRS.items():
        runs = [d for p in presets for d in _finished(out, p, seeds)]
        figure = path.parent / f"{path.stem.lower()}-{name}.png"
        if runs:
            plot_runs(runs, figure, title=f"{name} pair, 1,000 steps", smooth=25)
        parts += [f"\n## {name} pair\n\n", table(out, presets, seeds), f"\n![{name}]({figure.name})\n\n",
                  tails(out, presets[1:], seeds)]
    write_page(path, parts)  # with docs/results-long-notes.md, the reading of the numbers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/long")
    ap.add_argument("--results", default=str(ROOT / "docs" / "RESULTS-long.md"))
    ap.add_argument("--report-only", action="store_true", help="write the page from the finished runs, train nothing")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.report_only:
        for seed in args.seeds:  # seed by seed: an interrupted study holds whole seeds
            for preset in dict.fromkeys(p for presets in PAIRS.values() for p in presets):
                train_once(preset, seed, out / f"{preset}-seed{seed}", OVERRIDES, fixed_pair=True)
    write_results(out, args.seeds, Path(args.results))
    print(Path(args.results).read_text())


if __name__ == "__main__":
    main()
