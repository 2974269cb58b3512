"""Cost of the Jackpot (OBRS) token weights against TIS and the other corrections, (B, T) = (64, 2048).

Every variant is looked up in `jackpot.core.corrections.CORRECTIONS` and called on the same
`CorrectionInputs` (sampled-token log-probs, built once, so its input checks are not timed):
    none, tis (token), icepop (token), jackpot with fixed lam (batch-mean Z), jackpot with a
    per-state Z supplied, jackpot with a budget (lam solved by batch_lambda: a sort of B*T tokens),
    jackpot aligned to p_new (two ratios).
Goal (ours; the paper states none): Jackpot with fixed lam within 5x the time of TIS and under 50 ms
per batch on this CPU, i.e. negligible next to the forward passes that produce the log-probs.

    python benchmarks/bench_weights.py [--batch 64] [--length 2048] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from jackpot.core.corrections import CORRECTIONS, CorrectionInputs

GOAL_FACTOR, GOAL_MS = 5.0, 50.0
LOG_RATIO_STD = 0.3  # log p_old - log p_inf at sampled tokens

VARIANTS = {  # label -> (name in CORRECTIONS, kwargs, needs a per-state z)
    "none": ("none", {}, False),
    "tis (token, cap 2)": ("tis", {"cap": 2.0}, False),
    "icepop (token)": ("icepop", {}, False),
    "jackpot lam=1": ("jackpot", {"lam": 1.0, "z": "batch"}, False),
    "jackpot lam=1, z given": ("jackpot", {"lam": 1.0, "z": "exact"}, True),
    "jackpot budget=0.9": ("jackpot", {"budget": 0.9}, False),
    "jackpot lam=1, tgt=new": ("jackpot", {"lam": 1.0, "z": "batch", "target": "new", "c1": 5.0, "c2": 2.0}, False),
}


def make_inputs(batch: int, length: int, seed: int, with_z: bool) -> CorrectionInputs:
    gen = torch.Generator().manual_seed(seed)
    rollout = -torch.empty(batch, length).exponential_(generator=gen) * 0.7
    old = (rollout + LOG_RATIO_STD * torch.randn(batch, length, generator=gen)).clamp_max(0.0)
    new = (old + 0.05 * torch.randn(batch, length, generator=gen)).clamp_max(0.0)
    lengths = torch.randint(length // 4, length + 1, (batch, 1), generator=gen)
    mask = (torch.arange(length).unsqueeze(0) < lengths).float()
    uniforms = torch.rand(batch, length, generator=gen)
    z = torch.rand(batch, length, generator=gen) * 0.1 + 0.9 if with_z else None
    return CorrectionInputs(rollout_logp=rollout, old_logp=old, mask=mask, new_logp=new, uniforms=uniforms, z=z)


def time_variants(inputs: dict[bool, CorrectionInputs], repeats: int) -> dict[str, list[float]]:
    """Milliseconds per call of every variant, interleaved round by round so that load from other
    processes on a shared CPU spreads over all variants instead of hitting one."""
    calls = {label: (CORRECTIONS[name].fn, inputs[with_z], kwargs)
             for label, (name, kwargs, with_z) in VARIANTS.items()}
    for fn, inp, kwargs in calls.values():
        fn(inp, **kwargs)  # warm-up
    ms: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(repeats):
        for label, (fn, inp, kwargs) in calls.items():
            start = time.perf_counter()
            fn(inp, **kwargs)
            ms[label].append((time.perf_counter() - start) * 1e3)
    return ms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=20, help="timed calls per variant (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default); "
                   "on a shared CPU, OpenMP threads spin-wait and 2 threads are slower and noisier than 1")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    inputs = {z: make_inputs(args.batch, args.length, args.seed, z) for z in (False, True)}
    runs = time_variants(inputs, args.repeats)
    ms = {label: statistics.median(t) for label, t in runs.items()}
    tokens = args.batch * args.length
    print(f"correction weights on (B, T) = ({args.batch}, {args.length}) = {tokens:,} tokens, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} interleaved rounds")
    print(f"{'variant':<26}{'median ms':>10}{'min ms':>9}{'x tis':>8}{'ns/token':>10}")
    t_tis = ms["tis (token, cap 2)"]
    for label, t in ms.items():
        print(f"{label:<26}{t:>10.2f}{min(runs[label]):>9.2f}{t / t_tis:>8.2f}{t * 1e6 / tokens:>10.1f}")
    t_jp = ms["jackpot lam=1"]
    ok = t_jp <= GOAL_FACTOR * t_tis and t_jp <= GOAL_MS
    print(f"verdict: {'PASS' if ok else 'FAIL'} - Jackpot (lam=1) takes {t_jp:.2f} ms = {t_jp / t_tis:.1f}x TIS "
          f"(goal <= {GOAL_FACTOR:g}x and <= {GOAL_MS:g} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
