"""The long-horizon study of the distillation controller (distill.target_kl) and write docs/RESULTS-long.md.

    python scripts/long_study.py --seeds 0            # one seed of every arm
    python scripts/long_study.py --seeds 0 1 2        # more seeds: finished runs are kept, not re-run
    python scripts/long_study.py --seeds 0 1 2 --report-only   # the page from the runs finished so far
    python scripts/long_study.py --seeds 0 1 2 --vary-pair --out runs/long-pairs --results docs/RESULTS-long-pairs.md
                                                      # seed s also shifts the pre-trained pair (the pair spread)
    python scripts/long_study.py --jobs 2 --arms on-policy jackpot ...   # some arms, two runs at once (one per core)

Arms, 1,000 steps each, on the default pair and on the wide-gap pair (its rollout model pre-trained half as
long): on-policy (the policy samples its own rollouts; the pair's rollout model plays no part, so one run serves
both pairs), Jackpot with the fixed distillation coefficient (paper eq. 8), Jackpot with the coefficient under
distill.target_kl (docs/METHOD.md §10), Jackpot with the rollout model's learning rate under it
(distill.control=lr), Jackpot with reverse-KL distillation (the one change the 200-step pilots saw lower the gap,
docs/sweeps/gap-control.md), and TIS + reverse-KL distillation (the paper's strongest baseline). Seeds vary the RL seed
only, every seed on the presets' pre-trained pair (scripts/compare.py --fixed-pair), so the study pre-trains one
pair per pair; with --vary-pair seed s also shifts the pair (policy.seed + s, rollout_model.seed + s), so the
seeds sample the pair-to-pair spread. Runs go seed by seed, so an interrupted study holds whole seeds.

Per arm the table gives the policy's accuracy before and after, its change paired with on-policy on the same seed,
the actor-policy gap (mismatch/kl_k3) and the acceptance over the first and the last 100 steps, the
distillation coefficient over the last 100 steps, and the distillation loss it weights (rollout_model/distill_kl,
in the arm's own direction) over the first and the last 100; the figures draw them over the steps, the FLOPs
counted and the modelled H100 seconds (jackpot.train.costs, a roofline model). A second table per pair gives
each run's largest one-batch gap and, under the controller, when what it moves reached its upper bound, how
often the gap was below the target and how often within ±25 % of it after the first 100 steps (the goal of
issue 28). A third gives each arm's compute: FLOPs by phase, modelled H100 seconds and measured seconds.
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

from compare import mean_std, plot_figures, train_many, write_page  # noqa: E402

from jackpot.metric_names import (  # noqa: E402
    EVAL_ACCURACY,
    EVAL_ROLLOUT_MODEL_ACCURACY,
    MISMATCH_KL_K3,
    OBRS_ACCEPT_RATE,
    ROLLOUT_MODEL_DISTILL_COEF,
    ROLLOUT_MODEL_DISTILL_KL,
    ROLLOUT_MODEL_LR_SCALE,
)
from jackpot.metrics import read_metrics  # noqa: E402
from jackpot.train.costs import PHASES  # noqa: E402

PAIRS = {  # figure name -> presets, the paired reference first
    "default": ["on-policy", "jackpot", "jackpot-kl-control", "jackpot-lr-control", "jackpot-reverse-kl",
                "tis-reverse-kl"],
    "wide-gap": ["on-policy", "wide-gap-jackpot", "wide-gap-jackpot-kl-control", "wide-gap-jackpot-lr-control",
                 "wide-gap-jackpot-reverse-kl", "wide-gap-tis"],
}
ALL_ARMS = list(dict.fromkeys(p for presets in PAIRS.values() for p in presets))
OVERRIDES = ["train.steps=1000", "train.eval_every=50", "train.checkpoint_every=250", "train.threads=1",
             "tensorboard=false"]
WINDOW = 100  # steps averaged at the start and at the end of a run
HOLD = 0.25  # the goal's band: the gap within ±25 % of the target
LATE = 5  # evaluations averaged at the end of a run (steps 800-1000): one evaluation's standard error is ≈ 0.02
SMOOTH = 10  # steps of the moving average the band is also read on: one batch's k3 alone has a spread of ±25 %


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
            "late_delta": statistics.mean(evals[-LATE:]) - evals[0],
            "rollout_after": rollout_evals[-1] if rollout_evals else None,
            "kl_first": mean(MISMATCH_KL_K3, first), "kl_last": mean(MISMATCH_KL_K3, last),
            "accept_first": mean(OBRS_ACCEPT_RATE, first), "accept_last": mean(OBRS_ACCEPT_RATE, last),
            "coef_last": mean(ROLLOUT_MODEL_DISTILL_COEF, last), "lr_last": mean(ROLLOUT_MODEL_LR_SCALE, last),
            "distill_first": mean(ROLLOUT_MODEL_DISTILL_KL, first),
            "distill_last": mean(ROLLOUT_MODEL_DISTILL_KL, last)}


def mean_se(values: list[float]) -> str:
    """mean ± its standard error (the goal is read on it), or the value alone, or '–'."""
    if len(values) < 2:
        return mean_std(values, "+.3f")
    return f"{statistics.mean(values):+.3f} ± {statistics.stdev(values) / len(values) ** 0.5:.3f}"


def table(out: Path, presets: list[str], seeds: list[int]) -> str:
    """One row per preset over its finished seeds; 'Δ vs on-policy' pairs each seed with on-policy's, 'Δ vs' the
    second arm (Jackpot with the fixed coefficient) with that arm's on the same seed."""
    def deltas(preset: str, key: str = "delta") -> dict[str, float]:
        return {d.name.rsplit("-seed", 1)[1]: _figures(d)[key] for d in _finished(out, preset, seeds)}

    refs = [(p, "delta", deltas(p)) for p in presets[:2]]
    refs.append((presets[0], "late_delta", deltas(presets[0], "late_delta")))
    lines = ["| arm | seeds | eval before | eval after | Δ | "
             + " | ".join(f"Δ vs {p} (paired, ± s.e.)" for p, _, _ in refs[:2])
             + f" | Δ vs {presets[0]}, mean of the last {LATE} evaluations (paired, ± s.e.)"
             + f" | best eval | rollout model eval after | KL k3, first {WINDOW} | KL k3, last {WINDOW} "
             f"| acceptance, first {WINDOW} | acceptance, last {WINDOW} | distill coef, last {WINDOW} "
             f"| lr multiplier, last {WINDOW} | distill KL, first {WINDOW} | distill KL, last {WINDOW} |",
             "|---" * (15 + len(refs)) + "|"]
    for preset in presets:
        dirs = _finished(out, preset, seeds)
        rows = [_figures(d) for d in dirs]
        paired = [mean_se([r[key] - ref[d.name.rsplit("-seed", 1)[1]] for r, d in zip(rows, dirs, strict=True)
                           if d.name.rsplit("-seed", 1)[1] in ref]) if preset != p else "–" for p, key, ref in refs]
        col = {key: mean_std([r[key] for r in rows], spec) for key, spec in (
            ("before", ".3f"), ("after", ".3f"), ("delta", "+.3f"), ("best", ".3f"), ("rollout_after", ".3f"),
            ("kl_first", ".3f"), ("kl_last", ".3f"), ("accept_first", ".3f"), ("accept_last", ".3f"),
            ("coef_last", ".3g"), ("lr_last", ".3g"), ("distill_first", ".3f"), ("distill_last", ".3f"))}
        seeds_done = ", ".join(d.name.rsplit("-seed", 1)[1] for d in dirs) or "none"
        lines.append(f"| {preset} | {seeds_done} | {col['before']} | {col['after']} | {col['delta']} "
                     f"| {' | '.join(paired)} | {col['best']} | {col['rollout_after']} | {col['kl_first']} "
                     f"| {col['kl_last']} | {col['accept_first']} | {col['accept_last']} | {col['coef_last']} "
                     f"| {col['lr_last']} | {col['distill_first']} | {col['distill_last']} |")
    return "\n".join(lines) + "\n"


def tails(out: Path, presets: list[str], seeds: list[int]) -> str:
    """Per run: the largest one-batch gap, and under the controller the first step its coefficient reached
    distill.coef_max and the fraction of steps whose gap was below distill.target_kl."""
    lines = ["| run | largest one-batch KL k3 (step) | what the controller moves: at its upper bound from step "
             f"| steps with KL k3 below the target | steps after the first {WINDOW} with the signal within "
             f"±{HOLD:.0%} of the target: one batch / {SMOOTH}-step mean |", "|---|---|---|---|---|"]
    for d in [d for p in presets for d in _finished(out, p, seeds)]:
        steps = [r for r in read_metrics(d) if r["step"] > 0]
        top = max(steps, key=lambda r: r[MISMATCH_KL_K3])
        distill = yaml.safe_load((d / "config.yaml").read_text())["distill"]
        at_bound = below = held = "–"
        if distill.get("target_kl") is not None:
            target, lr = distill["target_kl"], distill.get("control", "coef") == "lr"
            key, high = (ROLLOUT_MODEL_LR_SCALE, distill["lr_scale_max"]) if lr else \
                (ROLLOUT_MODEL_DISTILL_COEF, distill["coef_max"])
            at_bound = next((f"{r['step']} ({'lr' if lr else 'coef'})" for r in steps if r[key] >= high), "never")
            below = f"{sum(r[MISMATCH_KL_K3] < target for r in steps) / len(steps):.1%}"
            signal = MISMATCH_KL_K3 + ("_clipped" if distill.get("signal") == "k3-clipped" else "")
            values = [r[signal] for r in steps]
            smooth = [statistics.mean(values[max(i - SMOOTH + 1, 0):i + 1]) for i in range(len(values))]
            held = " / ".join(f"{sum(abs(v / target - 1) <= HOLD for v in vs[WINDOW:]) / max(len(vs) - WINDOW, 1):.1%}"
                              for vs in (values, smooth))
        lines.append(f"| {d.name} | {top[MISMATCH_KL_K3]:.2f} ({top['step']}) | {at_bound} | {below} | {held} |")
    return "\n".join(lines) + "\n"


def compute(out: Path, presets: list[str], seeds: list[int]) -> str:
    """Per arm: FLOPs by phase, modelled H100 seconds (a roofline model, docs/METHOD.md §11) and measured seconds
    of the training steps, mean over its finished seeds; '–' for runs made before the cost accounting."""
    lines = ["| arm | FLOPs: generation | prepare | update (policy) | update (rollout model) | total "
             "| H100 s, MODELLED: generation | total | measured s (CPU, evaluation excluded) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for preset in presets:
        sums = [json.loads((d / "summary.json").read_text()) for d in _finished(out, preset, seeds)]
        sums = [s for s in sums if s.get("flops") is not None]

        def avg(get, sums=sums) -> str:
            return f"{statistics.mean(get(s) for s in sums):.3g}" if sums else "–"

        phases = [avg(lambda s, p=p: s["flops_by_phase"][p]) for p in PHASES]
        lines.append(f"| {preset} | {' | '.join(phases)} | {avg(lambda s: s['flops'])} "
                     f"| {avg(lambda s: s['gpu_model_s_by_phase']['generation'])} | {avg(lambda s: s['gpu_model_s'])} "
                     f"| {avg(lambda s: s['train_wall_s'])} |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, seeds: list[int], path: Path, command: str, vary_pair: bool) -> None:
    """The page: per pair the arms with finished runs (on-policy, the paired reference, first)."""
    pairs = {name: [p for p in presets if _finished(out, p, seeds)] for name, presets in PAIRS.items()}
    dirs = [d for presets in pairs.values() for p in presets for d in _finished(out, p, seeds)]
    commits = sorted({json.loads((d / "summary.json").read_text()).get("commit", "unrecorded") for d in dirs})
    scheme = ("seed s trains the pair pre-trained with policy.seed + s and rollout_model.seed + s (seed 0: the "
              "presets' pair), so the seeds sample the pair-to-pair spread as well as the RL seed"
              if vary_pair else "every seed on the presets' pre-trained pair")
    parts = ["# Results: 1,000 steps, with and without the distillation controller\n\n",
             f"Produced by `{command}` (runs made at commit"
             f"{'s' if len(commits) > 1 else ''} {', '.join(commits) or 'none'}; overrides of every run: "
             f"`{' '.join(OVERRIDES)}`; {scheme}). Mean ± standard deviation over "
             "the seeds listed in each row (the paired Δ: mean ± standard error); 'eval' is Mean@4 accuracy on 200 "
             "held-out problems; KL k3 is `mismatch/kl_k3`, the actor–policy gap the controller acts on.\n"]
    for name, presets in pairs.items():
        runs = [d for p in presets for d in _finished(out, p, seeds)]
        if not runs:
            continue
        figure = path.parent / f"{path.stem.lower()}-{name}.png"
        figures = plot_figures(runs, figure, f"{name} pair, 1,000 steps", smooth=25)
        parts += [f"\n## {name} pair\n\n", table(out, presets, seeds),
                  *(f"\n![{name}, x = {x}]({fig.name})\n" for fig, x in figures), "\n",
                  tails(out, presets[1:], seeds), "\n", compute(out, presets, seeds)]
    write_page(path, parts)  # with its notes file (<stem>-notes.md), the reading of the numbers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/long")
    ap.add_argument("--results", default=str(ROOT / "docs" / "RESULTS-long.md"))
    ap.add_argument("--report-only", action="store_true", help="write the page from the finished runs, train nothing")
    ap.add_argument("--vary-pair", action="store_true",
                    help="seed s also shifts the pre-trained pair (policy.seed + s, rollout_model.seed + s)")
    ap.add_argument("--arms", nargs="+", metavar="PRESET", choices=ALL_ARMS, default=ALL_ARMS,
                    help="train only these arms (default: all); the page reports the arms with finished runs")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at once, one process each (train.threads=1: give each its own core)")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.report_only:
        fixed = not args.vary_pair
        arms = [a for a in ALL_ARMS if a in args.arms]
        train_many([(preset, seed, out / f"{preset}-seed{seed}")  # seed by seed: an interrupted study
                    for seed in args.seeds for preset in arms], OVERRIDES, fixed, args.jobs)  # holds whole seeds
    command = " ".join(["python scripts/long_study.py", *(a for a in sys.argv[1:] if a != "--report-only")])
    write_results(out, args.seeds, Path(args.results), command, args.vary_pair)
    print(Path(args.results).read_text())


if __name__ == "__main__":
    main()
