"""The paper's Table 3 axis on the offline task: several optimizer steps per rollout batch, with and without the PPO
clip, synchronous and two updates behind, for each correction; writes a Table-3-shaped section into
docs/RESULTS-async.md (and into docs/results-async-notes.md, which scripts/compare.py appends to that page, so a
re-run of the async study keeps it).

    python scripts/staleness_table.py --seeds 0                     # 16 runs of 200 steps
    python scripts/staleness_table.py --seeds 0 1 2 --steps 300     # the issue's 3 seeds
    python scripts/staleness_table.py --seeds 0 --report-only       # the section from the finished runs

Why: with one optimizer step per batch (the async study's runs) the PPO ratio p_new / p_old is 1 at the update
(p_old is recomputed then), so the clip never binds and async staleness only shows as the gap p_inf vs p_old. With
train.minibatches = 4 the policy takes four steps on one batch: from the second on, p_new moves away from p_old,
the clip binds (policy/clipfrac), and removing it (train.clip_eps = null) is the paper's "no-clip" column.
Arms: corrections none / TIS / IcePop / Jackpot (the async presets: Jackpot aligned to the current policy, target
= new), rollout.async_steps 0 and 2, clip 0.2 or none; every seed on the presets' pre-trained pair (only the RL
seed varies).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from compare import mean_std, train_once  # noqa: E402

from jackpot.fileio import write_text_atomic  # noqa: E402
from jackpot.metric_names import EVAL_ACCURACY, MISMATCH_KL_K3, POLICY_CLIPFRAC  # noqa: E402
from jackpot.metrics import read_metrics  # noqa: E402

CORRECTIONS = ("none", "tis", "icepop", "jackpot")
ASYNC = (2, 0)  # the stale column first: the runs that answer the question go first
CLIPS = {"noclip": ["train.clip_eps=null"], "clip": []}
MINIBATCHES = 4
BEGIN, END = "<!-- staleness-table: begin -->", "<!-- staleness-table: end -->"


def preset(correction: str, k: int) -> str:
    return f"async{k}-{correction}"


def run_dir(out: Path, correction: str, k: int, clip: str, seed: int) -> Path:
    return out / f"{preset(correction, k)}-mb{MINIBATCHES}-{clip}-seed{seed}"


def overrides(steps: int, clip: str) -> list[str]:
    return [f"train.steps={steps}", f"train.eval_every={steps // 2}", f"train.checkpoint_every={steps}",
            "train.threads=1", "tensorboard=false", f"train.minibatches={MINIBATCHES}", *CLIPS[clip]]


def _figures(d: Path) -> dict[str, float]:
    records = read_metrics(d)
    evals = [r[EVAL_ACCURACY] for r in records if r.get(EVAL_ACCURACY) is not None]
    steps = [r for r in records if r["step"] > 0]

    def mean(key: str) -> float | None:
        vals = [r[key] for r in steps if r.get(key) is not None]
        return statistics.mean(vals) if vals else None

    return {"after": evals[-1], "delta": evals[-1] - evals[0], "kl": mean(MISMATCH_KL_K3),
            "clipfrac": mean(POLICY_CLIPFRAC)}


def section(out: Path, seeds: list[int], steps: int) -> str:
    """The Table-3-shaped section: a row per correction and clip, per async column the policy's accuracy after
    (its change from before), the mean gap and the fraction of tokens the clip bound."""
    head = " | ".join(f"async {k}: eval after (Δ) | KL k3 | clip frac" for k in ASYNC)
    lines = [f"| correction | PPO clip | {head} |", "|---|---|" + "---|" * 3 * len(ASYNC)]
    for correction in CORRECTIONS:
        for clip in ("clip", "noclip"):
            cells = []
            for k in ASYNC:
                dirs = [run_dir(out, correction, k, clip, s) for s in seeds]
                rows = [_figures(d) for d in dirs if (d / "summary.json").is_file()]
                cells += [f"{mean_std([r['after'] for r in rows])} ({mean_std([r['delta'] for r in rows], '+.3f')})",
                          mean_std([r["kl"] for r in rows]), mean_std([r["clipfrac"] for r in rows])]
            lines.append(f"| {correction} | {'0.2' if clip == 'clip' else 'none'} | {' | '.join(cells)} |")
    command = f"python scripts/staleness_table.py --seeds {' '.join(map(str, seeds))} --steps {steps}"
    return (f"{BEGIN}\n## Table 3's axis: {MINIBATCHES} optimizer steps per batch, with and without the clip\n\n"
            f"Produced by `{command}`: seeds {seeds} (RL seed only, the presets' pre-trained pair), {steps} steps, "
            f"`train.minibatches={MINIBATCHES}` (the rollout batch is {MINIBATCHES}× the train batch), "
            "`train.clip_eps=null` for 'none'; the async presets (`async0-*`, `async2-*`: Jackpot with target = new "
            "and top-k Z). 'eval' is Mean@4 on 200 held-out problems, '–' a run not made. "
            f"A short pilot-sized table, not the paper's scale.\n\n" + "\n".join(lines) + f"\n{END}\n")


def insert(path: Path, text: str) -> None:
    """Replace the marked section of `path` with `text`, or append it."""
    old = path.read_text() if path.is_file() else ""
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END) + "\n?", re.S)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    write_text_atomic(path, new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default="runs/staleness-table")
    ap.add_argument("--results", default=str(ROOT / "docs" / "RESULTS-async.md"))
    ap.add_argument("--report-only", action="store_true", help="write the section from the finished runs")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.report_only:
        for seed in args.seeds:
            for k in ASYNC:
                for clip in CLIPS:
                    for correction in CORRECTIONS:
                        train_once(preset(correction, k), seed, run_dir(out, correction, k, clip, seed),
                                   overrides(args.steps, clip), fixed_pair=True)
    text = section(out, args.seeds, args.steps)
    results = Path(args.results)
    insert(results, text)
    insert(results.parent / f"{results.stem.lower()}-notes.md", text)
    print(text)


if __name__ == "__main__":
    main()
