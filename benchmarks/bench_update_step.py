"""Peak memory and time of one prepare + update step at a real vocabulary (Qwen3, V = 151,936).

Random-weight models built from the real Qwen3 configs (real widths, heads and vocabulary, a few layers —
nothing is downloaded): by default the policy has Qwen3-0.6B's widths (2 layers) and the rollout model
the same widths with 1 layer. One `prepare` + `update` (SGD, so no optimizer state is created during the
step) per variant and size, each in a fresh process; memory is the process's peak resident set during
the step minus its resident set before it (Linux: VmHWM after resetting it through /proc/self/clear_refs),
so model weights count once and everything the step adds is measured.

Variants: on-policy (the policy samples, no correction), TIS, Jackpot with exact Z, Jackpot with top-k Z +
kappa (rollout model frozen; also with target = new, whose correction needs a gradient-free policy pass), and
Jackpot with exact Z with the rollout model trained jointly (PPO + full-vocabulary distillation).
Implementations, on the same batches:
    chunked   train.head_chunk = --chunk positions per per-vocabulary computation (the default path)
    full      train.head_chunk = B x T: the same code forming all B x T x V logits at once
    baseline  (with --baseline-ref REF) the code of a git commit, e.g. the materialising trainer before the
              chunked head, run from a temporary worktree

Goals (issue: real vocabularies): Jackpot (exact Z) <= 1.1x TIS in peak memory and <= 1.15x in time; the growth
of peak memory with the number of tokens at most 1/8 of what the materialising path adds.

    python benchmarks/bench_update_step.py                                # ~20 min on 2 CPU cores
    python benchmarks/bench_update_step.py --sizes 4x64 4x256 --large 4x1024 --baseline-ref 3c4d2e1
    python benchmarks/bench_update_step.py --policy qwen3-1.7b --device cuda --dtype bfloat16 --sizes 4x8192
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

from jackpot.models.shapes import QWEN3, VOCAB  # the published widths, no download

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "on-policy": ["train.mode=on-policy", "correction.name=none"],
    "tis": ["correction.name=tis", "distill.rollout_model=frozen"],
    "jackpot exact Z": ["correction.name=jackpot", "correction.z=exact", "distill.rollout_model=frozen"],
    "jackpot top-k Z": ["correction.name=jackpot", "correction.z=topk", "distill.rollout_model=frozen"],
    # the correction recomputed from the policy being optimised: a gradient-free pass per mini-batch
    "jackpot top-k Z, new": ["correction.name=jackpot", "correction.z=topk", "correction.target=new",
                             "distill.rollout_model=frozen"],
    "jackpot exact, joint": ["correction.name=jackpot", "correction.z=exact", "distill.rollout_model=joint",
                             "distill.estimator=full"],
}


# ----------------------------------------------------------------------------- one measurement (child process)
def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _model(name: str, layers: int, seed: int, dtype, device):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hidden, inter, heads, kv, head_dim, tied = QWEN3[name]
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, tie_word_embeddings=tied,
                      rope_theta=1e6, max_position_embeddings=40960)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def measure(args) -> dict:
    import torch

    from jackpot.rollout.base import RolloutBatch
    from jackpot.train.config import build_config
    from jackpot.train.update import update

    try:
        from jackpot.train.prepare import prepare
    except ImportError:  # a --baseline-ref commit from before jackpot.train.prepare
        from jackpot.train.update import prepare

    torch.set_num_threads(args.threads)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    B, T = (int(x) for x in args.size.split("x"))
    overrides = [*VARIANTS[args.variant], f"train.prompts_per_step={B // 2}", "train.group_size=2",
                 f"sampling.max_new_tokens={T}", "train.grad_clip=1.0"]
    overrides += args.overrides
    if args.impl == "full":
        overrides.append(f"train.head_chunk={B * T}")
    elif args.impl == "chunked":
        overrides.append(f"train.head_chunk={args.chunk}")
    cfg = build_config(None, overrides)
    policy = _model(args.policy, args.policy_layers, 0, dtype, device)
    rollout = None if not cfg.decoupled else _model(args.rollout, args.rollout_layers, 1, dtype, device)
    if args.impl != "baseline":  # dropout off, gradient checkpointing / LoRA as configured, as `jackpot train` does
        from jackpot.train.loop import prepared_model

        policy = prepared_model(policy, cfg.policy)
        rollout = rollout if rollout is None else prepared_model(rollout, cfg.rollout_model)
    g = torch.Generator().manual_seed(2)
    P = 16
    prompt = torch.randint(0, VOCAB, (B, P), generator=g).to(device)
    response = torch.randint(0, VOCAB, (B, T), generator=g).to(device)
    mask = torch.ones(B, T, device=device)
    with torch.no_grad():  # the rollout record: p_inf at the sampled tokens and its top-k, one sequence at a time
        import jackpot

        sampler = rollout if rollout is not None else policy
        ids = torch.cat([prompt, response], 1)
        logp, top_v, top_i = [], [], []
        for i in range(B):
            logits = sampler(input_ids=ids[i:i + 1], use_cache=False).logits[0, P - 1:-1].float()  # no padding
            lp = torch.log_softmax(logits, -1)
            logp.append(lp.gather(-1, response[i, :, None])[:, 0])
            top = lp.topk(cfg.sampling.topk, -1)
            top_v.append(top.values)
            top_i.append(top.indices)
            del lp
        logp, top_v, top_i = torch.stack(logp), torch.stack(top_v), torch.stack(top_i)
    batch = RolloutBatch(prompt, torch.ones_like(prompt), response, mask, logp, top_i, top_v)
    rewards = torch.randn(B // 2, 2, generator=g).to(device)
    policy_opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1e-6)
    rollout_opt = torch.optim.SGD([p for p in rollout.parameters() if p.requires_grad], lr=1e-6) \
        if cfg.trains_rollout_model else None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set to the current one
        before = _status("VmRSS")
    t0 = time.perf_counter()
    prep = prepare(cfg, batch, rewards, policy=policy, rollout_model=rollout, init_policy=None, step=1)
    t1 = time.perf_counter()
    update(cfg, prep, policy=policy, rollout_model=rollout, policy_opt=policy_opt, rollout_opt=rollout_opt, step=1)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status("VmHWM")
    t2 = time.perf_counter()
    # the bias of top-k Z is the same for every implementation: measured with the current code only
    topk = "correction.z=topk" in VARIANTS[args.variant] and args.impl != "baseline"
    extra = _topk_bias(cfg, policy, rollout, batch, args) if topk else {}
    return {**extra, "added_gib": (peak - before) / 2**30, "prepare_s": t1 - t0, "update_s": t2 - t1,
            "logits_gib": B * T * VOCAB * 4 / 2**30, "code": str(Path(jackpot.__file__).parent.parent)}


def _topk_bias(cfg, policy, rollout, batch, args) -> dict:
    """Top-k Z scaled by kappa against exact Z on the same positions (p_tgt = the policy before the update is
    not at hand any more: both are computed with the updated policy, which is what the bias depends on)."""
    import torch

    from jackpot.core import head as vocab
    from jackpot.core import obrs
    from jackpot.train.prepare import model_head, needs_of, target_logps

    with torch.no_grad():
        tgt, roll = model_head(policy, batch, 1.0), model_head(rollout, batch, 1.0)
        needs = needs_of(cfg)
        tgt_lp, raw = target_logps(cfg, needs, tgt, batch)  # the sampled tokens' and the top-K's in one pass
        exact = vocab.normalizer(tgt, roll, needs.z_lam, chunk=args.chunk).reshape(raw.shape)
        k = obrs.kappa(obrs.acceptance_prob(tgt_lp, batch.rollout_logp, needs.z_lam), raw, batch.response_mask)
    rel = (k * raw - exact) / exact
    return {"topk_kappa": float(k), "topk_z_rel_bias_mean": float(rel.mean()), "topk_z_rel_err_abs_mean":
            float(rel.abs().mean()), "exact_z_mean": float(exact.mean()), "topk_z_raw_mean": float(raw.mean())}


# ----------------------------------------------------------------------------- the table (parent process)
def _child(args, variant: str, size: str, impl: str, code: Path) -> dict | None:
    cmd = [sys.executable, __file__, "--child", "--variant", variant, "--size", size, "--impl", impl,
           "--policy", args.policy, "--rollout", args.rollout, "--policy-layers", str(args.policy_layers),
           "--rollout-layers", str(args.rollout_layers), "--chunk", str(args.chunk), "--threads", str(args.threads),
           "--dtype", args.dtype, "--device", args.device]
    if args.overrides and impl != "baseline":
        cmd += ["--overrides", *args.overrides]
    env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        why = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode
        print(f"  {variant} {size} {impl}: failed ({why})", flush=True)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default="qwen3-0.6b", choices=list(QWEN3))
    p.add_argument("--rollout", default="qwen3-0.6b", choices=list(QWEN3))
    p.add_argument("--policy-layers", type=int, default=2)
    p.add_argument("--rollout-layers", type=int, default=1)
    p.add_argument("--sizes", nargs="+", default=["4x64", "4x256"], help="B x T measured by every implementation")
    p.add_argument("--large", nargs="*", default=["4x1024"], help="B x T measured by the chunked path only")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--chunk", type=int, default=256, help="train.head_chunk of the chunked path")
    p.add_argument("--baseline-ref", default=None, help="also run the code of this git commit (a worktree)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", help="a name in jackpot.core.dtypes.DTYPES")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overrides", nargs="*", default=[], help="config overrides for every run, e.g. "
                   "policy.gradient_checkpointing=true (not given to the baseline, whose config may lack them)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # may run the older jackpot of --baseline-ref: it imports only what `measure` needs
        print(json.dumps(measure(args)))
        return 0
    from jackpot.core.dtypes import DTYPES

    if args.dtype not in DTYPES:
        p.error(f"--dtype must be one of {list(DTYPES)}, got {args.dtype!r}")
    codes = {"chunked": ROOT, "full": ROOT}
    tmp = None
    if args.baseline_ref:
        tmp = tempfile.mkdtemp(prefix="jackpot-baseline-")
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", tmp, args.baseline_ref], check=True,
                       capture_output=True)
        codes["baseline"] = Path(tmp)
    print(f"policy {args.policy} x {args.policy_layers} layers, rollout model {args.rollout} x {args.rollout_layers} "
          f"layers, V = {VOCAB:,}, {args.dtype} on {args.device}, {args.threads} threads, chunk {args.chunk}")
    results: dict[tuple, dict] = {}
    try:
        for size in [*args.sizes, *args.large]:
            for variant in args.variants:
                for impl, code in codes.items():
                    if size in args.large and impl != "chunked":
                        continue
                    r = _child(args, variant, size, impl, code)
                    if r is not None:
                        results[(variant, size, impl)] = r
                        print(f"  {variant:22s} {size:8s} {impl:8s} +{r['added_gib']:6.2f} GiB "
                              f"({r['added_gib'] / r['logits_gib']:4.1f}x BxTxV)  prepare {r['prepare_s']:6.1f} s  "
                              f"update {r['update_s']:6.1f} s", flush=True)
                        if "topk_kappa" in r:
                            print(f"    top-k Z (k = 20) vs exact: mean exact Z {r['exact_z_mean']:.4f}, raw top-k "
                                  f"{r['topk_z_raw_mean']:.4f}, kappa {r['topk_kappa']:.2f}, kappa x top-k relative "
                                  f"bias {r['topk_z_rel_bias_mean']:+.4f}, mean |error| "
                                  f"{r['topk_z_rel_err_abs_mean']:.4f}", flush=True)
    finally:
        if tmp:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", tmp], capture_output=True)
    print(verdicts(results, args))
    return 0


def _tokens(size: str) -> int:
    """'4x64' -> 256."""
    b, t = size.split("x")
    return int(b) * int(t)


def verdicts(results: dict, args) -> str:
    lines = ["", "verdict:"]

    def get(v, s, i, key):
        r = results.get((v, s, i))
        return None if r is None else (r[key] if key != "time" else r["prepare_s"] + r["update_s"])

    for size in [*args.sizes, *args.large]:
        for key, goal in (("added_gib", 1.1), ("time", 1.15)):
            j, t = get("jackpot exact Z", size, "chunked", key), get("tis", size, "chunked", key)
            if j is not None and t is not None:
                ok = j <= goal * t
                lines.append(f"  {size}: jackpot exact Z / tis {key}: {j / t:.2f} (goal <= {goal}) "
                             f"{'PASS' if ok else 'FAIL'}")
    small, big = args.sizes[0], (args.large or args.sizes)[-1]
    for variant in args.variants:
        chunked = [get(variant, s, "chunked", "added_gib") for s in (small, big)]
        ref_impl = "baseline" if args.baseline_ref else "full"
        ref = {s: get(variant, s, ref_impl, "added_gib") for s in args.sizes}
        if None in chunked or len([v for v in ref.values() if v is not None]) < 2:
            continue
        (s0, m0), (s1, m1) = [(s, m) for s, m in ref.items() if m is not None][:2]
        tokens = {s: _tokens(s) for s in {small, big, s0, s1}}
        slope = (m1 - m0) / (tokens[s1] - tokens[s0])  # GiB per token added by the materialising path
        ref_growth = slope * (tokens[big] - tokens[small])
        growth = chunked[1] - chunked[0]
        if ref_growth <= 0:
            lines.append(f"  {variant}: the {ref_impl} path did not grow over {s0}..{s1}: sizes too small to compare")
            continue
        lines.append(f"  {variant}: peak growth {small} -> {big}: chunked {growth:+.2f} GiB, {ref_impl} "
                     f"{ref_growth:+.2f} GiB (its slope over {s0}..{s1}); ratio {growth / ref_growth:.3f} "
                     f"(goal <= 0.125) {'PASS' if growth <= ref_growth / 8 else 'FAIL'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
