"""Wall time of one RL step with generation overlapping training (rollout.async_steps = 1) against the
synchronous step, on-policy and decoupled (Jackpot, rollout model trained jointly), on the same engine.

The models, prompts and trainer step are those of `bench_decoupled_speed.py` (random-weight Qwen3 models,
responses that run to --length tokens). An asynchronous step is the trainer's pipeline
(`jackpot.train.pipeline.Generator`, as `rollout.async_steps=1` runs it): hand the generator the next batch
with a copy of the sampling weights, take the current batch (generated during the previous update), prepare
and update. Printed per variant (medians over --steps measured steps after one warm-up; the variants run one
after the other, each variant's steps back to back, since a generator would use another variant's step as
free time; outside load can therefore fall on the variants unevenly: repeat on a busy machine):

    gen s      the engine's time on a batch (the synchronous step's rollout phase; async: the generator's)
    train s    prepare + update
    wait s     async: the trainer waiting for its batch
    step s     the trainer's step
    vs max     async step / max(gen, train)   goal <= 1.15 (the overlap is complete)
    vs sum     step / (gen + train)            1.0 for a synchronous step
    vs on-pol. step / the synchronous on-policy step   goal for decoupled + async: <= 0.4

Threads: synchronous variants run --threads torch threads; asynchronous ones --threads for the trainer plus
--gen-threads for the generator (the trainer's `rollout.threads`). On a CPU keep their sum within the cores.

    python benchmarks/bench_async.py                                   # CPU, ~5 min on 2 cores
    python benchmarks/bench_async.py --pairs 192x2:512x4 --length 256 --vocab 151936 --steps 3
    python benchmarks/bench_async.py --engine vllm ...                 # vLLM's environment (README)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decoupled_speed import PROMPT_LEN, _Ids, params, setup_variant, step, step_arguments, sync  # noqa: E402

VARIANTS = {  # name -> (bench_decoupled_speed variant, asynchronous)
    "on-policy": ("on-policy", False),
    "on-policy async": ("on-policy", True),
    "jackpot": ("jackpot joint", False),
    "jackpot async": ("jackpot joint", True),
}
GOAL_OVERLAP, GOAL_VS_ON_POLICY = 1.15, 0.4


def setup_async(v: dict, args) -> dict:
    """Give a variant a background generator over its own copy of the sampling model."""
    from jackpot.rollout import engine_options, make_engine
    from jackpot.train.pipeline import Generator

    engine = make_engine(v["cfg"].rollout.engine, v["actor"], _Ids(), own_copy=True,
                         **engine_options(v["cfg"].rollout, v["cfg"].sampling.topk))
    return {**v, "generator": Generator(engine, args.gen_threads)}


def async_step(v: dict, prompts: torch.Tensor, rewards: torch.Tensor, i: int, args) -> dict[str, float]:
    """One pipelined step (i from 0; the generator's steps from 1): queue batch i + 1 (and batch i at the first
    step) with the weights now, take batch i, prepare and update."""
    from jackpot.rollout.weights import checkpoint_weights
    from jackpot.train.prepare import prepare
    from jackpot.train.update import update

    cfg, device, g = v["cfg"], v["device"], v["generator"]
    sync(device)
    t0 = time.perf_counter()
    weights = [(name, t.clone()) for name, t in checkpoint_weights(v["actor"], g.engine.dtype)]
    for n in range(g.last_step + 1, i + 3):
        g.submit(n, i + 1, weights if n == g.last_step + 1 else None,
                 lambda engine, n=n: engine.generate(prompts, torch.ones_like(prompts), max_new_tokens=args.length,
                                                     temperature=1.0, top_p=1.0, topk=cfg.sampling.topk, seed=n))
    generated, waited = g.result(i + 1)
    t1 = time.perf_counter()
    prep = prepare(cfg, generated.batch, rewards, policy=v["policy"], rollout_model=v["rollout"], init_policy=None,
                   step=i)
    update(cfg, prep, policy=v["policy"], rollout_model=v["rollout"], policy_opt=v["policy_opt"],
           rollout_opt=v["rollout_opt"], step=i)
    sync(device)
    t2 = time.perf_counter()
    return {"gen": generated.seconds, "train": t2 - t1, "wait": waited, "step": t2 - t0}


def run_pair(rollout_spec: str, policy_spec: str, args) -> dict[str, list[dict[str, float]]]:
    """Every variant's measured steps, one variant after the other (each a warm-up step, then --steps back to
    back): interleaving would hand a generator the other variants' steps as free time."""
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, args.vocab, (args.batch, PROMPT_LEN), generator=g).to(args.device)
    rewards = [torch.randint(0, 2, (args.batch // 2, 2), generator=g).float().to(args.device)
               for _ in range(1 + args.steps)]
    rows: dict[str, list[dict[str, float]]] = {}
    for name, (base, is_async) in VARIANTS.items():
        v = setup_variant(base, rollout_spec, policy_spec, args)
        v = setup_async(v, args) if is_async else v
        rows[name] = []
        try:
            for i in range(1 + args.steps):
                if is_async:
                    row = async_step(v, prompts, rewards[i], i, args)
                else:
                    r = step(v, prompts, rewards[i], i, args)
                    row = {"gen": r["rollout"], "train": r["prepare"] + r["update"], "wait": 0.0, "step": r["step"]}
                if i:
                    rows[name].append(row)
        finally:
            if is_async:
                v["generator"].close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    step_arguments(parser, pairs=["192x2:512x4"], length=128, steps=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the trainer")
    parser.add_argument("--gen-threads", type=int, default=1, help="torch threads of the asynchronous generator")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    r_layers, p_layers = (int(x) if x else None for x in args.layers.split(":"))
    print(f"device {args.device}, {args.dtype}, batch {args.batch}, response {args.length} tokens, vocab {args.vocab}, "
          f"engine {args.engine}, {args.steps} measured steps (median); threads: trainer {args.threads}, "
          f"generator {args.gen_threads}")
    print(f"{'pair (rollout : policy)':28s} {'variant':16s} {'gen s':>7s} {'train s':>7s} {'wait s':>7s} "
          f"{'step s':>7s} {'vs max':>7s} {'vs sum':>7s} {'vs on-pol.':>10s}")
    met = True
    for pair in args.pairs:
        rollout_spec, policy_spec = pair.split(":")
        size_r, size_p = params(rollout_spec, r_layers, args.vocab), params(policy_spec, p_layers, args.vocab)
        label = f"{rollout_spec} {size_r / 1e6:.1f}M : {policy_spec} {size_p / 1e6:.1f}M"
        results = run_pair(rollout_spec, policy_spec, args)
        medians = {name: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for name, rows in results.items()}
        for name, m in medians.items():
            vs_max, vs_sum = m["step"] / max(m["gen"], m["train"]), m["step"] / (m["gen"] + m["train"])
            vs_on_policy = m["step"] / medians["on-policy"]["step"]
            print(f"{label:28s} {name:16s} {m['gen']:7.2f} {m['train']:7.2f} {m['wait']:7.2f} {m['step']:7.2f} "
                  f"{vs_max:7.2f} {vs_sum:7.2f} {vs_on_policy:10.2f}")
            if VARIANTS[name][1]:
                met &= vs_max <= GOAL_OVERLAP
        met &= medians["jackpot async"]["step"] / medians["on-policy"]["step"] <= GOAL_VS_ON_POLICY
    print(f"verdict: goals (async step <= {GOAL_OVERLAP} x max(gen, train); decoupled + async <= "
          f"{GOAL_VS_ON_POLICY} x on-policy synchronous) {'met' if met else 'missed'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
