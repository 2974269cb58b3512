"""The OBRS normaliser Z = sum_x min(p_inf, p_tgt/lam) three ways, side by side in one run.

    naive    log_softmax of both full logits (float32), then `normalizer` (holds several (N, V) floats)
    chunked  `normalizer_from_logits(..., chunk_size=c)`, exact, streams over vocabulary chunks
    topk     `torch.topk` of both logits per row + `topk_normalizer` (paper §4.4, under-estimates Z);
             the row log-normalisers it needs are computed in row blocks

Inputs are bf16 logits (as models emit) of shape (positions, vocab), default 8192 x 151,936 (Qwen3).
Reported per variant: median wall time over --repeats, peak extra memory, max |Z - Z_naive|.
Peak extra memory: on CUDA torch.cuda.max_memory_allocated minus the allocation before the call; on
CPU each variant runs in a fresh subprocess that loads the inputs, records its RSS, resets the
high-water mark (/proc/self/clear_refs) and reads getrusage(RUSAGE_SELF).ru_maxrss after the calls.
If the naive path cannot fit at --positions, the largest position count that fits is used for all
variants (and said so). Goal: chunked exact Z with peak extra memory <= 1/8 of naive at <= 1.5x its time.

    python benchmarks/bench_normalizer.py [--positions 8192] [--chunk-sizes 4096,8192] [--row-block 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from jackpot.core.obrs import normalizer, normalizer_from_logits, topk_normalizer

# target logits = LOGIT_SCALE * Gumbel(0, 1): peaked like an LM's next-token distribution (entropy ~1.5
# nats, top-20 mass ~0.97 at V = 151,936); rollout logits = target + SIGMA * N(0, 1): KL ~ 0.01, Z ~ 0.95
LOGIT_SCALE = 2.0
SIGMA = 0.2
GEN_ROWS = 256  # rows generated (and top-k log-normalised) at a time
REF_ROWS = 64  # positions checked against a float64 computation of Z
CALIBRATION_ROWS = 256  # the naive path's bytes per element are measured at this size
ROUND_ROWS = 512  # a fallback position count is a multiple of this
GOAL_MEM, GOAL_TIME = 1 / 8, 1.5


def make_inputs(positions: int, vocab: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, rollout) bf16 logits (positions, vocab).

    GEN_ROWS distinct rows are drawn; each further block of GEN_ROWS rows is that block rolled by a
    random shift along the vocabulary (drawing 2 x 10^9 random numbers takes minutes on 2 CPU cores;
    a roll relabels tokens, so the cost of every variant, and Z itself, are unchanged).
    """
    gen = torch.Generator(device).manual_seed(seed)
    n = min(GEN_ROWS, positions)
    z = torch.empty(n, vocab, device=device).exponential_(generator=gen)
    z.clamp_min_(torch.finfo(z.dtype).tiny).log_().mul_(-LOGIT_SCALE)  # -log Exp(1) ~ Gumbel(0, 1)
    base_t = z.to(torch.bfloat16)
    base_r = z.add_(torch.randn(n, vocab, generator=gen, device=device).mul_(SIGMA)).to(torch.bfloat16)
    target = torch.empty(positions, vocab, dtype=torch.bfloat16, device=device)
    rollout = torch.empty_like(target)
    for start in range(0, positions, n):
        m = min(n, positions - start)
        shift = int(torch.randint(vocab, (1,), generator=gen, device=device))
        target[start:start + m] = base_t[:m].roll(shift, -1)
        rollout[start:start + m] = base_r[:m].roll(shift, -1)
    return target, rollout


def z_naive(t: torch.Tensor, r: torch.Tensor, lam: float) -> torch.Tensor:
    return normalizer(F.log_softmax(t.float(), -1), F.log_softmax(r.float(), -1), lam)


def z_chunked(t: torch.Tensor, r: torch.Tensor, lam: float, chunk: int) -> torch.Tensor:
    return normalizer_from_logits(t, r, lam, chunk_size=chunk)


def z_topk(t: torch.Tensor, r: torch.Tensor, lam: float, k: int) -> torch.Tensor:
    out = []
    for start in range(0, t.shape[0], GEN_ROWS):
        tb, rb = t[start:start + GEN_ROWS], r[start:start + GEN_ROWS]
        lse_t = torch.logsumexp(tb.float(), -1, keepdim=True)
        lse_r = torch.logsumexp(rb.float(), -1, keepdim=True)
        r_val, r_ids = torch.topk(rb, k, dim=-1)
        t_val, t_ids = torch.topk(tb, k, dim=-1)
        out.append(topk_normalizer(
            r_ids, r_val.float() - lse_r, tb.gather(-1, r_ids).float() - lse_t, lam,
            target_topk_ids=t_ids, target_topk_logp=t_val.float() - lse_t,
            rollout_logp_at_target_topk=rb.gather(-1, t_ids).float() - lse_r))
    return torch.cat(out)


def z_rowblock(t: torch.Tensor, r: torch.Tensor, lam: float, rows: int) -> torch.Tensor:
    """Not in the brief: the naive math on `rows` rows at a time (contiguous blocks, bounded memory)."""
    return torch.cat([z_naive(t[i:i + rows], r[i:i + rows], lam) for i in range(0, t.shape[0], rows)])


def run_variant(spec: dict, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    if spec["variant"] == "naive":
        return z_naive(t, r, spec["lam"])
    if spec["variant"] == "rowblock":
        return z_rowblock(t, r, spec["lam"], spec["chunk"])
    if spec["variant"] == "chunked":
        return z_chunked(t, r, spec["lam"], spec["chunk"])
    return z_topk(t, r, spec["lam"], spec["k"])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (Linux >= 4.0), so ru_maxrss covers only what follows
        return True
    except OSError:
        return False


def worker(spec: dict) -> dict:
    """Run one variant in this (fresh) process; CPU memory from RSS and ru_maxrss."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec.get("inputs"):
        data = torch.load(spec["inputs"], weights_only=True)
        t, r = data["target"], data["rollout"]
        del data
    else:
        t, r = make_inputs(spec["positions"], spec["vocab"], spec["seed"], "cpu")
    run_variant(spec, t[:2], r[:2])  # fault in code pages and thread pools before the baseline
    baseline = _rss_bytes()
    reset = _reset_peak_rss()
    times, z = [], None
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        z = run_variant(spec, t, r)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if spec.get("z_out"):
        torch.save(z, spec["z_out"])
    return {"times": times, "extra_bytes": peak - baseline, "peak_reset": reset}


def run_cpu(spec: dict) -> dict:
    """worker(spec) in a fresh Python process."""
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['variant']} failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cuda(spec: dict, t: torch.Tensor, r: torch.Tensor) -> dict:
    times, z = [], None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        z = run_variant(spec, t, r)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    extra = torch.cuda.max_memory_allocated() - base
    if spec.get("z_out"):
        torch.save(z.cpu(), spec["z_out"])
    del z
    torch.cuda.empty_cache()
    return {"times": times, "extra_bytes": extra, "peak_reset": True}


def available_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":") for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def choose_positions(args, device: str, naive_per_elem: float) -> tuple[int, str]:
    """Largest position count <= --positions at which inputs + naive extra memory fit the budget."""
    budget = args.mem_fraction * available_bytes(device)
    per_row = args.vocab * (2 * 2 + naive_per_elem)  # two bf16 inputs + the naive path's extra
    need = args.positions * per_row
    if need <= budget:
        return args.positions, f"naive path fits at {args.positions} positions ({need / 2**30:.1f} GiB)"
    fit = int(budget // per_row) // ROUND_ROWS * ROUND_ROWS
    if fit < ROUND_ROWS:
        raise SystemExit(f"not even {ROUND_ROWS} positions fit in {budget / 2**30:.1f} GiB")
    return fit, (f"naive path does NOT fit at {args.positions} positions: needs ~{need / 2**30:.1f} GiB "
                 f"({naive_per_elem:.1f} B/element extra + 4 B inputs), budget {budget / 2**30:.1f} GiB "
                 f"= {args.mem_fraction:g} x available; FALLING BACK to {fit} positions for every variant")


def build_specs(args, positions: int) -> list[dict]:
    base = {"lam": args.lam, "k": args.k, "repeats": args.repeats, "positions": positions,
            "vocab": args.vocab, "seed": args.seed, "chunk": None, "threads": args.threads}
    rowblock = [dict(base, variant="rowblock", chunk=args.row_block)] if args.row_block else []
    return ([dict(base, variant="naive")] + [dict(base, variant="chunked", chunk=c) for c in args.chunk_sizes]
            + [dict(base, variant="topk")] + rowblock)


def calibrate_naive(args, device: str) -> float:
    """Extra bytes per (position, vocab) element of the naive path, measured at CALIBRATION_ROWS."""
    spec = {"variant": "naive", "lam": args.lam, "repeats": 1, "positions": CALIBRATION_ROWS,
            "vocab": args.vocab, "seed": args.seed, "threads": args.threads}
    if device == "cuda":
        t, r = make_inputs(CALIBRATION_ROWS, args.vocab, args.seed, device)
        res = run_cuda(spec, t, r)
    else:
        res = run_cpu(spec)
    return res["extra_bytes"] / (CALIBRATION_ROWS * args.vocab)


def measure_all(args, device: str, specs: list[dict], workdir: Path) -> list[dict]:
    """Run every spec (CPU: one subprocess each, inputs shared through a file); attach Z paths."""
    start = time.perf_counter()
    t, r = make_inputs(specs[0]["positions"], args.vocab, args.seed, device)
    print(f"generated inputs in {time.perf_counter() - start:.1f} s", flush=True)
    rows = min(REF_ROWS, t.shape[0])
    z_ref = normalizer(F.log_softmax(t[:rows].double(), -1), F.log_softmax(r[:rows].double(), -1), args.lam)
    if device == "cpu":
        torch.save({"target": t, "rollout": r}, workdir / "inputs.pt")
        del t, r
    results = []
    for i, spec in enumerate(specs):
        spec = dict(spec, z_out=str(workdir / f"z{i}.pt"), inputs=str(workdir / "inputs.pt"))
        res = run_cuda(spec, t, r) if device == "cuda" else run_cpu(spec)
        z = torch.load(spec["z_out"], weights_only=True)
        results.append({**spec, **res, "z": z, "err64": (z[:rows].double() - z_ref.cpu()).abs().max().item()})
        print(f"  {spec['variant']:8s} chunk={spec['chunk']}: median {statistics.median(res['times']):.2f} s,"
              f" extra {res['extra_bytes'] / 2**30:.2f} GiB", flush=True)
    return results


def report(results: list[dict], args, positions: int, device: str) -> None:
    naive = results[0]
    t0, m0, z0 = statistics.median(naive["times"]), naive["extra_bytes"], naive["z"]
    print(f"\nZ on {device}: {positions} positions x V={args.vocab}, bf16 logits, lam={args.lam}, "
          f"median of {args.repeats}")
    print(f"{'variant':<12}{'chunk':>7}{'time s':>9}{'x naive':>9}{'extra GiB':>11}{'/ naive':>9}"
          f"{'max|dZ|':>10}{'mean dZ':>10}{'err f64':>10}")
    for res in results:
        t, m, dz = statistics.median(res["times"]), res["extra_bytes"], res["z"] - z0
        name = res["variant"] + (f"(k={args.k})" if res["variant"] == "topk" else "")
        # chunk column: vocabulary chunk (chunked) or rows per block (rowblock)
        print(f"{name:<12}{res['chunk'] or '-':>7}{t:>9.2f}{t / t0:>9.2f}{m / 2**30:>11.3f}{m / m0:>9.3f}"
              f"{dz.abs().max().item():>10.1e}{dz.mean().item():>10.1e}{res['err64']:>10.1e}")
    print(f"dZ = Z - Z_naive over all positions; err f64 = max |Z - Z_float64| over the first {REF_ROWS}")
    if not all(res["peak_reset"] for res in results):
        print("note: could not reset the peak RSS; extra memory may include the input loading")
    ok = [res for res in results if res["variant"] == "chunked"
          and res["extra_bytes"] <= GOAL_MEM * m0 and statistics.median(res["times"]) <= GOAL_TIME * t0]
    if ok:
        best = min(ok, key=lambda res: statistics.median(res["times"]))
        print(f"verdict: PASS - chunked exact Z meets the goal (extra memory <= 1/8 of naive at <= 1.5x its "
              f"time) with chunk_size in {[res['chunk'] for res in ok]}; fastest: {best['chunk']}")
    else:
        print("verdict: FAIL - no chunk size gives extra memory <= 1/8 of naive at <= 1.5x its time")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--positions", type=int, default=8192, help="rows (batch x length) of logits")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary size (Qwen3: 151,936)")
    p.add_argument("--chunk-sizes", type=lambda s: [int(x) for x in s.split(",")],
                   default=[4096, 8192],
                   help="comma-separated chunk_size values of normalizer_from_logits to try")
    p.add_argument("--row-block", type=int, default=0,
                   help="also time the naive math on this many rows at a time (0: off)")
    p.add_argument("--k", type=int, default=20, help="top-k of each model (paper: 20)")
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=2, help="timed calls per variant (median reported)")
    p.add_argument("--mem-fraction", type=float, default=0.6,
                   help="fraction of available memory the naive run may use (the machine is shared)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default); "
                   "on a shared CPU, OpenMP threads spin-wait and 2 threads are slower and noisier than 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    per_elem = calibrate_naive(args, device)
    positions, why = choose_positions(args, device, per_elem)
    print(why, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_normalizer_") as tmp:
        results = measure_all(args, device, build_specs(args, positions), Path(tmp))
    report(results, args, positions, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
