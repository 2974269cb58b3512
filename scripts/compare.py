"""Run the paper's comparison on the offline task for several seeds and write docs/RESULTS.md.

    python scripts/compare.py                       # every preset below, seeds 0 1 2
    python scripts/compare.py --groups decoupled --seeds 0 train.steps=10
    python scripts/compare.py --fixed-pair --results docs/RESULTS-fixed-pair.md
    python scripts/compare.py --presets jackpot wide-gap-jackpot --results docs/RESULTS-subset.md
    python scripts/compare.py --groups async async-2 --results docs/RESULTS-async.md
    python scripts/compare.py --jobs 2 train.threads=1   # two runs at once, one per core

Groups (each a figure and a table):
  decoupled  on-policy vs decoupled (rollout model samples): no correction, only reverse KL,
             TIS + reverse KL, Jackpot (forward-KL distillation, eq. 7), and Jackpot with
             reverse-KL distillation — the paper's Figure 1 / Table 1 setting
  staleness  the policy samples, but the rollout batch is 8x the train batch: PPO clip, no clip,
             no clip + Jackpot (target = new) — the paper's Table 3 setting
  wide-gap   the decoupled setting with a weaker rollout model (half the pre-training): no
             correction, TIS + reverse KL, Jackpot
  async      (not run by default) the decoupled Jackpot setting made asynchronous, rollout.async_steps = 1:
             each batch sampled by the rollout model of one update ago; no correction, TIS, IcePop,
             Jackpot (target = new), against synchronous Jackpot
  async-2    the same two updates behind (rollout.async_steps = 2)
  async-8    eight updates behind, no correction and Jackpot only
  async-0    the synchronous controls: the async presets with rollout.async_steps = 0
Seed s varies both the RL seed and the pre-trained pair: the policy and the rollout model are
warm-started with their preset seeds + s (cached per seed), and every preset of seed s shares that pair.
At this scale the pair matters as much as the method (its accuracies after pre-training move by tens
of points with the seed), so a comparison on one pair says little. --fixed-pair keeps the presets'
pair for every seed and varies only the RL seed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jackpot.fileio import write_text_atomic  # noqa: E402
from jackpot.plot import plot_runs  # noqa: E402
from jackpot.train.cli import summarize  # noqa: E402
from jackpot.train.config import Config, build_config  # noqa: E402
from jackpot.train.config_io import preset_path  # noqa: E402
from jackpot.train.loop import train  # noqa: E402
from jackpot.train.models import model_dir  # noqa: E402

GROUPS = {
    "decoupled": ["on-policy", "decoupled-none", "reverse-kl-only", "tis-reverse-kl", "jackpot",
                  "jackpot-reverse-kl"],
    "staleness": ["staleness-clip", "staleness-noclip", "staleness-jackpot"],
    "wide-gap": ["on-policy", "wide-gap-none", "wide-gap-tis", "wide-gap-jackpot"],
    "async": ["jackpot", "async-none", "async-tis", "async-icepop", "async-jackpot"],
    "async-2": ["jackpot", "async2-none", "async2-tis", "async2-icepop", "async2-jackpot"],
    "async-8": ["jackpot", "async8-none", "async8-jackpot"],
    "async-0": ["jackpot", "async0-none", "async0-jackpot", "async0-tis", "async0-icepop"],
}
DEFAULT_GROUPS = ["decoupled", "staleness", "wide-gap"]  # docs/RESULTS.md; the async study is docs/RESULTS-async.md


def run_config(preset: str, seed: int, overrides: list[str], fixed_pair: bool = False) -> Config:
    """The config `train_once` trains: `preset` with `overrides` and RL seed `seed`; unless fixed_pair, seed s
    also shifts the pre-trained pair: policy.seed + s, rollout_model.seed + s."""
    path = str(preset_path(preset))
    seeds_of_run = [f"train.seed={seed}"]
    if not fixed_pair:
        base = build_config(path, overrides)
        seeds_of_run += [f"policy.seed={base.policy.seed + seed}",
                         f"rollout_model.seed={base.rollout_model.seed + seed}"]
    return build_config(path, [*overrides, *seeds_of_run])


def train_once(preset: str, seed: int, run_dir: Path, overrides: list[str], fixed_pair: bool = False) -> Path:
    """Train `run_config(preset, seed, overrides, fixed_pair)` into `run_dir` unless it already holds a finished
    run (summary.json)."""
    if not (run_dir / "summary.json").is_file():
        shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run from an interrupted comparison
        cfg = run_config(preset, seed, overrides, fixed_pair)
        t0 = time.perf_counter()
        train(cfg, run_dir, progress=False)
        summary = {**summarize(run_dir), "commit": _commit()}  # the code that made the run
        write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
        print(f"{run_dir.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return run_dir


def _pretrain(job: tuple[str, int, list[str], bool, str]) -> None:
    preset, seed, overrides, fixed_pair, role = job
    cfg = run_config(preset, seed, overrides, fixed_pair)
    model_dir(role, getattr(cfg, role), cfg, progress=False)


def _train(job: tuple[str, int, Path, list[str], bool]) -> None:
    train_once(*job)


def train_many(runs: list[tuple[str, int, Path]], overrides: list[str], fixed_pair: bool = False,
               jobs: int = 1) -> None:
    """`train_once` for each (preset, seed, run_dir) in order, or `jobs` at a time in processes of their own: every
    distinct pre-trained model is made first (one process each), so that no two runs pre-train the same one."""
    if jobs == 1:
        for preset, seed, run_dir in runs:
            train_once(preset, seed, run_dir, overrides, fixed_pair)
        return
    models = {}
    for preset, seed, _ in runs:
        cfg = run_config(preset, seed, overrides, fixed_pair)
        for role in ["policy"] + (["rollout_model"] if cfg.decoupled else []):
            models.setdefault((role, repr(getattr(cfg, role))), (preset, seed, overrides, fixed_pair, role))
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_pretrain, models.values()))
        list(pool.map(_train, [(preset, seed, run_dir, overrides, fixed_pair) for preset, seed, run_dir in runs]))


def run_path(out: Path, preset: str, seed: int, fixed_pair: bool) -> Path:
    return out / f"{preset}-seed{seed}{'-fixedpair' if fixed_pair else ''}"


def mean_std(values: list[float | None], spec: str = ".3f") -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return format(vals[0], spec)
    return f"{statistics.mean(vals):{spec}} ± {statistics.stdev(vals):{spec.lstrip('+')}}"


def table(runs: dict[str, list[Path]]) -> str:
    """One row per preset. 'vs first row' is Δ minus the first preset's Δ on the same seed (same
    pre-trained pair and evaluation problems), which removes most of the pair-to-pair spread."""
    reference = next(iter(runs))
    head = (f"| preset | policy eval before | policy eval after | Δ | Δ vs {reference} (paired) | rollout model Δ "
            "| acceptance | actor–policy KL k3 (mean) | staleness (mean) | sampler drift KL k3 (mean) "
            "| rollout s/step | update s/step | step s/step |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    summaries = {p: [json.loads((d / "summary.json").read_text()) for d in dirs] for p, dirs in runs.items()}
    ref_delta = [x["eval_after"] - x["eval_before"] for x in summaries[reference]]
    for preset, s in summaries.items():
        delta = [x["eval_after"] - x["eval_before"] for x in s]
        paired = [d - r for d, r in zip(delta, ref_delta, strict=True)] if preset != reference else [None]
        rm_delta = [None if x["rollout_model_eval_before"] is None
                    else x["rollout_model_eval_after"] - x["rollout_model_eval_before"] for x in s]
        rows.append(f"| {preset} | {mean_std([x['eval_before'] for x in s])} "
                    f"| {mean_std([x['eval_after'] for x in s])} "
                    f"| {mean_std(delta, '+.3f')} | {mean_std(paired, '+.3f')} | {mean_std(rm_delta, '+.3f')} "
                    f"| {mean_std([x['accept_rate_mean'] for x in s])} "
                    f"| {mean_std([x['actor_policy_kl_k3_mean'] for x in s], '.4f')} "
                    f"| {mean_std([x.get('staleness_mean') for x in s], '.2f')} "
                    f"| {mean_std([x.get('sampler_drift_kl_k3_mean') for x in s], '.1e')} "
                    f"| {mean_std([x['rollout_s_mean'] for x in s], '.2f')} "
                    f"| {mean_std([x['update_s_mean'] for x in s], '.2f')} "
                    f"| {mean_std([x.get('step_s_mean') for x in s], '.2f')} |")
    return head + "\n".join(rows) + "\n"


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip() or "unknown"


def write_results(groups: dict[str, dict[str, list[Path]]], path: Path, seeds: list[int], overrides: list[str],
                  fixed_pair: bool = False, flags: str = "") -> None:
    dirs = [d for runs in groups.values() for ds in runs.values() for d in ds]
    commits = sorted({json.loads((d / "summary.json").read_text()).get("commit", "unrecorded") for d in dirs})
    parts = ["# Results\n",
             f"Produced by `python scripts/compare.py{' --fixed-pair' if fixed_pair else ''}{flags}"
             f"{' ' + ' '.join(overrides) if overrides else ''}` (seeds {seeds}; "
             f"runs made at commit{'s' if len(commits) > 1 else ''} "
             f"{', '.join(commits)}; "
             f"{'one pre-trained pair for every seed' if fixed_pair else 'each seed its own pre-trained pair'}). "
             "Mean ± standard deviation over seeds; "
             "'eval' is Mean@k accuracy on held-out problems; times are seconds per training step on the "
             "machine that ran it.\n"]
    for name, runs in groups.items():
        figure = path.parent / f"{path.stem.lower()}-{name}.png"
        figures = plot_figures([d for dirs in runs.values() for d in dirs], figure, name)
        parts += [f"\n## {name}\n\n", table(runs), *(f"\n![{name}, x = {x}]({f.name})\n" for f, x in figures)]
    write_page(path, parts)


def plot_figures(runs: list[Path], figure: Path, title: str, smooth: int = 5) -> list[tuple[Path, str]]:
    """The runs against steps into `figure`, against the measured seconds of their training steps into
    `<figure>-seconds.png`, and — when every run logs its costs (jackpot.train.costs) — against the FLOPs counted and
    the modelled H100 seconds into `<figure>-flops.png`, `<figure>-gpu-model.png`: [(file, x axis)]."""
    if not runs:
        return []
    figures = [(figure, "steps"), (figure.with_name(f"{figure.stem}-seconds.png"), "seconds")]
    if all(json.loads((d / "summary.json").read_text()).get("flops") is not None for d in runs):
        figures += [(figure.with_name(f"{figure.stem}-{x}.png"), x) for x in ("flops", "gpu-model")]
    for file, x in figures:
        plot_runs(runs, file, title=title + ("" if x == "steps" else f", against {x}"), smooth=smooth, x=x)
    return figures


def write_page(path: Path, parts: list[str]) -> None:
    """Write `parts` into `path`, followed by the hand-written reading of its numbers if there is one
    (`<stem>-notes.md` beside it, lower case, kept across re-runs)."""
    notes = path.parent / f"{path.stem.lower()}-notes.md"
    if notes.is_file():
        parts = [*parts, "\n", notes.read_text()]
    write_text_atomic(path, "".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--groups", nargs="+", default=DEFAULT_GROUPS, choices=list(GROUPS))
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--results", default=str(ROOT / "docs" / "RESULTS.md"))
    ap.add_argument("--fixed-pair", action="store_true",
                    help="one pre-trained pair (the presets' model seeds) for every seed; only the RL seed varies")
    ap.add_argument("--presets", nargs="+", default=None,
                    help="only these presets of each group (its first preset, the paired reference, is always run)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at once, one process each (with train.threads=1, give each its own core)")
    ap.add_argument("overrides", nargs="*", help="config overrides applied to every run")
    args = ap.parse_args()
    chosen = {g: [p for i, p in enumerate(GROUPS[g]) if i == 0 or args.presets is None or p in args.presets]
              for g in args.groups}
    chosen = {g: presets for g, presets in chosen.items() if len(presets) > 1 or args.presets is None}
    out = Path(args.out)
    runs = {(p, s): run_path(out, p, s, args.fixed_pair) for presets in chosen.values() for p in presets
            for s in args.seeds}
    train_many([(p, s, d) for (p, s), d in runs.items()], args.overrides, args.fixed_pair, args.jobs)
    groups = {g: {p: [runs[p, s] for s in args.seeds] for p in presets} for g, presets in chosen.items()}
    flags = (f" --groups {' '.join(args.groups)}" if args.groups != DEFAULT_GROUPS else "") + \
        (f" --presets {' '.join(args.presets)}" if args.presets else "") + \
        (f" --results {args.results}" if args.results != ap.get_default("results") else "")
    write_results(groups, Path(args.results), args.seeds, args.overrides, args.fixed_pair, flags)
    print(Path(args.results).read_text())


if __name__ == "__main__":
    main()
