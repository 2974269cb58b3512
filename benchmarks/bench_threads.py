"""The offline default `jackpot train` at each torch thread count, alone and beside a second identical job.

Each setting runs `jackpot train --no-progress train.steps=N train.threads=T` as a subprocess (both models
pre-trained once, beforehand, into a shared cache), once alone and then as two jobs started together. It
prints wall seconds per run, the mean seconds per training step (perf/step_s from metrics.jsonl) and each
figure's ratio to the 1-thread run measured in the same invocation. The verdict compares the thread count
`jackpot train` picks by default (jackpot/train/threads.py) with torch's own default (the CPU count).

    python benchmarks/bench_threads.py                 # --steps 20 --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jackpot.metric_names import PERF_STEP_S

OVERRIDES: list[str] = []  # --overrides, passed to every run


def launch(out: Path, cache: Path, steps: int, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jackpot.cli", "train", "--no-progress", "--out", str(out), f"cache_dir={cache}",
           f"train.steps={steps}", f"train.threads={threads}", "tensorboard=false", *OVERRIDES]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_together(outs: list[Path], cache: Path, steps: int, threads: int) -> list[tuple[float, float]]:
    """Start one job per directory at once; (wall seconds, mean step seconds) of each."""
    start = time.perf_counter()
    procs = [launch(out, cache, steps, threads) for out in outs]
    walls = []
    for proc in procs:
        _, err = proc.communicate()
        walls.append(time.perf_counter() - start)
        if proc.returncode:
            raise SystemExit(f"jackpot train failed:\n{err}")
    results = []
    for out, wall in zip(outs, walls):
        steps_s = [r[PERF_STEP_S] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                   if r.get(PERF_STEP_S) is not None]
        results.append((wall, sum(steps_s) / len(steps_s)))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="training steps per run (default: %(default)s)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                        help="thread counts to compare (default: 1 and the CPU count, torch's default)")
    parser.add_argument("--overrides", nargs="*", default=[], metavar="section.field=value",
                        help="config overrides for every run (default: none, the offline default)")
    args = parser.parse_args(argv)
    OVERRIDES[:] = args.overrides
    from jackpot.train.config import build_config
    from jackpot.train.threads import available_cpus, default_threads

    chosen, why = default_threads(build_config(None, args.overrides))
    print(f"CPUs usable: {available_cpus()}; jackpot's default: {chosen} thread(s) ({why}); torch's default: "
          f"{os.cpu_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run_together([root / "warm"], root / "cache", 1, 1)  # pre-train both models once, outside the timing
        table = {}
        for threads in args.threads:
            alone = run_together([root / f"alone-{threads}"], root / "cache", args.steps, threads)
            pair = run_together([root / f"pair-{threads}-{i}" for i in range(2)], root / "cache", args.steps, threads)
            table[threads] = (alone[0], max(pair, key=lambda r: r[0]))
    base_alone, base_pair = table[min(args.threads)]
    print(f"\n{'threads':>7} | {'alone: wall s':>13} {'step s':>7} {'x':>6} | {'pair: wall s':>12} {'step s':>7} "
          f"{'x':>6}")
    for threads, ((wall_a, step_a), (wall_p, step_p)) in table.items():
        print(f"{threads:>7} | {wall_a:13.1f} {step_a:7.3f} {step_a / base_alone[1]:6.2f} | {wall_p:12.1f} "
              f"{step_p:7.3f} {step_p / base_pair[1]:6.2f}")
    best_alone = min(table, key=lambda t: table[t][0][1])
    best_pair = min(table, key=lambda t: table[t][1][1])
    ok = chosen in (best_alone, best_pair)
    print(f"\nverdict: fastest per step alone with {best_alone} thread(s), beside a second job with {best_pair}; "
          f"jackpot's default is {chosen}: {'OK' if ok else 'NOT the fastest'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
