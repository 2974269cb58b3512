"""`batch_lambda` (exact, sort + prefix sums) against a 60-step bisection, on 10^6 sampled tokens.

batch_lambda solves mean_t min(1, r_t / lam) = budget over the masked tokens of a batch (METHOD.md
§4.2). The baseline bisects log lam on [min log r, max log r] for a fixed number of iterations, as the
OBRS authors do. Reported: median wall time of each, |lam_exact - lam_bisect| / lam, and the mean
acceptance each lam achieves. Goal: batch_lambda on 10^6 tokens in < 1 s on this CPU.

    python benchmarks/bench_batch_lambda.py [--tokens 1000000] [--budget 0.9] [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

from jackpot.core.obrs import batch_lambda

LOG_RATIO_STD = 0.5  # log(p_tgt / p_inf) at sampled tokens ~ N(0, 0.5^2) (a large actor-policy mismatch)
MASKED_FRAC = 0.1  # share of padding tokens (mask 0)
GOAL_SECONDS = 1.0


def make_batch(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    log_ratio = torch.randn(tokens, generator=gen) * LOG_RATIO_STD
    mask = (torch.rand(tokens, generator=gen) >= MASKED_FRAC).float()
    return log_ratio, mask


def mean_acceptance(log_ratio: torch.Tensor, mask: torch.Tensor, log_lam: float) -> float:
    a = (log_ratio.double() - log_lam).clamp_max(0.0).exp()
    return float((a * mask).sum() / mask.sum())


def bisect_lambda(log_ratio: torch.Tensor, mask: torch.Tensor, budget: float, iters: int) -> float:
    """Baseline: bisection on log lam (acceptance decreases in lam), `iters` full passes."""
    lr = log_ratio.double()
    m = mask.double()
    n = m.sum()
    kept = lr[mask > 0]
    lo, hi = float(kept.min()), float(kept.max())  # acceptance 1 at lam = r_min, 1/r_max-ish at r_max
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        acc = float(((lr - mid).clamp_max(0.0).exp() * m).sum() / n)
        lo, hi = (mid, hi) if acc > budget else (lo, mid)
    return math.exp(0.5 * (lo + hi))


def timed(fn, repeats: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--budget", type=float, default=0.9, help="target mean acceptance")
    p.add_argument("--iters", type=int, default=60, help="bisection iterations of the baseline")
    p.add_argument("--repeats", type=int, default=5, help="timed calls (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default); "
                   "on a shared CPU, OpenMP threads spin-wait and 2 threads are slower and noisier than 1")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    log_ratio, mask = make_batch(args.tokens, args.seed)
    batch_lambda(log_ratio[:1000], mask[:1000], args.budget)  # warm-up
    t_exact, lam_exact = timed(lambda: float(batch_lambda(log_ratio, mask, args.budget)), args.repeats)
    t_bisect, lam_bisect = timed(lambda: bisect_lambda(log_ratio, mask, args.budget, args.iters), args.repeats)

    print(f"{args.tokens:,} tokens ({int(mask.sum()):,} unmasked), log r ~ N(0, {LOG_RATIO_STD}^2), "
          f"budget {args.budget}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print(f"{'method':<24}{'time s':>9}{'lambda':>14}{'mean acceptance':>18}")
    for name, t, lam in (("batch_lambda (exact)", t_exact, lam_exact),
                         (f"bisection ({args.iters} iters)", t_bisect, lam_bisect)):
        print(f"{name:<24}{t:>9.3f}{lam:>14.8f}{mean_acceptance(log_ratio, mask, math.log(lam)):>18.10f}")
    rel = abs(lam_exact - lam_bisect) / lam_exact
    print(f"agreement: |lam_exact - lam_bisect| / lam = {rel:.1e}; speed-up over bisection {t_bisect / t_exact:.1f}x")
    verdict = "PASS" if t_exact < GOAL_SECONDS else "FAIL"
    print(f"verdict: {verdict} - batch_lambda on {args.tokens:,} tokens takes {t_exact:.3f} s "
          f"(goal < {GOAL_SECONDS:g} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
