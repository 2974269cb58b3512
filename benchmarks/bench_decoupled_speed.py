"""Wall time of one RL step, split into rollout / prepare / update: on-policy vs decoupled Jackpot.

The premise of decoupling: generation dominates an RL step, and a model several times smaller generates
several times faster. This measures it on random-weight Qwen3 models built from config (no download;
random models rarely emit EOS, so every response runs to --length tokens — the long-response regime).
Per size pair (rollout model, policy) and per variant, `--steps` measured steps after one warm-up step,
the variants interleaved step by step (so load from other processes falls on all of them alike):

    on-policy          the policy samples its own rollouts; correction none
    jackpot joint      the rollout model samples; Jackpot (exact Z); the rollout model trained jointly
                       (PPO + full-vocabulary distillation, eq. 8)
    jackpot frozen     the same with the rollout model frozen (no second backward)

The step is the trainer's own: the rollout engine (`jackpot.rollout.make_engine`, config rollout.engine; every
variant on the same `--engine`, the weights pushed to it before each rollout as the trainer pushes them), then
`jackpot.train.prepare.prepare` and `update`, with random 0/1 rewards. Goal (issue: decoupled speed):
a decoupled step <= 0.5x an on-policy step at rollout-dominated shapes. The ratio printed is the median
decoupled step time over the median on-policy step time, measured side by side in this run.

    python benchmarks/bench_decoupled_speed.py                                  # CPU, ~10 min on 2 busy cores
    python benchmarks/bench_decoupled_speed.py --pairs 256x2:512x4 --length 256 --batch 8
    .venv-vllm/bin/python benchmarks/bench_decoupled_speed.py --engine vllm --pairs 64x2:256x4 --vocab 151936 \\
        --batch 2 --length 512 --steps 3                                        # both modes on vLLM (CPU)
    python benchmarks/bench_decoupled_speed.py --pairs qwen3-1.7b:qwen3-8b --layers 4:4 --device cuda \\
        --dtype bfloat16 --vocab 151936 --batch 64 --length 1024
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from jackpot.core.dtypes import DTYPES
from jackpot.models.shapes import QWEN3  # the published widths, no download

VARIANTS = {
    "on-policy": ["train.mode=on-policy", "correction.name=none"],
    "jackpot joint": ["correction.name=jackpot", "correction.z=exact", "distill.rollout_model=joint"],
    "jackpot frozen": ["correction.name=jackpot", "correction.z=exact", "distill.rollout_model=frozen"],
}
GOAL = 0.5
PROMPT_LEN = 16


def build(spec: str, layers: int | None, vocab: int, seed: int, dtype, device):
    """A random Qwen3 causal LM: spec 'HIDDENxLAYERS' (heads = hidden / 32) or a QWEN3 name (+ layers)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if spec in QWEN3:
        hidden, inter, heads, kv, head_dim, tied = QWEN3[spec]
        n_layers = layers or 2
    else:
        hidden, n_layers = (int(x) for x in spec.split("x"))
        inter, heads, tied = 3 * hidden, max(1, hidden // 32), True
        kv, head_dim = heads, hidden // heads
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=n_layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, tie_word_embeddings=tied,
                      rope_theta=1e6, max_position_embeddings=40960, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(cfg)
    return model.to(device=device, dtype=dtype).eval()


class _Ids:
    """The two ids an engine needs from a tokenizer (random models have no text)."""

    pad_token_id, eos_token_id = 0, 1


def setup_variant(variant: str, rollout_spec: str, policy_spec: str, args) -> dict:
    """Models, engine, optimizers and config of one variant, ready for `step`."""
    from jackpot.rollout import ENGINE_OPTIONS, make_engine
    from jackpot.train.config import build_config
    from jackpot.train.config_checks import engine_options
    from jackpot.train.loop import prepared_model

    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    # an engine with a KV cache sized by the longest sequence (vLLM) gets this run's, not the model's 40,960
    sized = "max_model_len" in ENGINE_OPTIONS[args.engine]
    fit = [f"rollout.max_model_len={PROMPT_LEN + args.length}"] if sized else []
    cfg = build_config(None, [*VARIANTS[variant], f"train.prompts_per_step={args.batch // 2}", "train.group_size=2",
                              f"sampling.max_new_tokens={args.length}", f"rollout.engine={args.engine}", *fit])
    r_layers, p_layers = (int(x) if x else None for x in args.layers.split(":"))
    policy = prepared_model(build(policy_spec, p_layers, args.vocab, 0, dtype, device), cfg.policy)
    rollout = None if cfg.train.mode == "on-policy" else \
        prepared_model(build(rollout_spec, r_layers, args.vocab, 1, dtype, device), cfg.rollout_model)
    actor = rollout if rollout is not None else policy
    return {"cfg": cfg, "policy": policy, "rollout": rollout, "actor": actor, "device": device,
            "engine": make_engine(cfg.rollout.engine, actor, _Ids(), **engine_options(cfg)),
            "policy_opt": torch.optim.AdamW(policy.parameters(), lr=1e-6),
            "rollout_opt": torch.optim.AdamW(rollout.parameters(), lr=1e-6)
            if rollout is not None and cfg.distill.rollout_model == "joint" else None}


def step(v: dict, prompts: torch.Tensor, rewards: torch.Tensor, i: int, args) -> dict[str, float]:
    """One trainer step (rollout, prepare, update) of a variant set up by `setup_variant`, timed by phase."""
    from jackpot.rollout.weights import push_weights
    from jackpot.train.prepare import prepare
    from jackpot.train.update import update

    cfg, device = v["cfg"], v["device"]
    sync(device)
    t0 = time.perf_counter()
    push_weights(v["engine"], v["actor"], i + 1)  # the weights after i updates
    batch = v["engine"].generate(prompts, torch.ones_like(prompts), max_new_tokens=args.length, temperature=1.0,
                                 top_p=1.0, topk=cfg.sampling.topk, seed=i)
    sync(device)
    t1 = time.perf_counter()
    prep = prepare(cfg, batch, rewards, policy=v["policy"], rollout_model=v["rollout"], init_policy=None, step=i)
    sync(device)
    t2 = time.perf_counter()
    update(cfg, prep, policy=v["policy"], rollout_model=v["rollout"], policy_opt=v["policy_opt"],
           rollout_opt=v["rollout_opt"], step=i)
    sync(device)
    t3 = time.perf_counter()
    return {"rollout": t1 - t0, "prepare": t2 - t1, "update": t3 - t2, "step": t3 - t0,
            "tokens": float(batch.response_mask.sum())}


def run_pair(rollout_spec: str, policy_spec: str, args) -> dict[str, list[dict[str, float]]]:
    """Every variant's measured steps, interleaved (step i of each variant in turn) so that load from other
    processes falls on all variants alike; step 0 of each warms up and is dropped."""
    variants = {name: setup_variant(name, rollout_spec, policy_spec, args) for name in VARIANTS}
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, args.vocab, (args.batch, PROMPT_LEN), generator=g).to(args.device)
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for i in range(1 + args.steps):
        rewards = torch.randint(0, 2, (args.batch // 2, 2), generator=g).float().to(args.device)
        for name, v in variants.items():
            row = step(v, prompts, rewards, i, args)
            if i:
                rows[name].append(row)
    return rows


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def params(spec: str, layers: int | None, vocab: int) -> int:
    with torch.device("meta"):  # built there, not moved there: a move unties the tied output head
        return sum(p.numel() for p in build(spec, layers, vocab, 0, torch.float32, "meta").parameters())


def step_arguments(parser: argparse.ArgumentParser, *, pairs: list[str], length: int, steps: int) -> None:
    """The models, shapes, engine and device of a benchmarked trainer step (also bench_async.py's)."""
    parser.add_argument("--pairs", nargs="+", default=pairs,
                        help="ROLLOUT:POLICY model specs, each HIDDENxLAYERS or a Qwen3 name (see --layers)")
    parser.add_argument("--layers", default=":", help="ROLLOUT:POLICY layers for Qwen3-named specs (default 2)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (prompts x 2)")
    parser.add_argument("--length", type=int, default=length, help="response tokens (random models rarely stop)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=steps, help="measured steps per variant, after one warm-up")
    parser.add_argument("--engine", default="hf", help="rollout.engine of every variant (vllm: run from .venv-vllm)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    step_arguments(parser, pairs=["96x2:256x4", "192x2:512x4"], length=256, steps=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    r_layers, p_layers = (int(x) if x else None for x in args.layers.split(":"))
    print(f"device {args.device}, {args.dtype}, batch {args.batch}, response {args.length} tokens, "
          f"vocab {args.vocab}, engine {args.engine}, {args.steps} measured steps (median), {args.threads} thread(s)")
    print(f"{'pair (rollout : policy)':32s} {'variant':15s} {'rollout s':>9s} {'prepare s':>9s} {'update s':>9s} "
          f"{'step s':>8s} {'tok/s':>7s} {'vs on-policy':>12s}")
    met = True
    for pair in args.pairs:
        rollout_spec, policy_spec = pair.split(":")
        size_r, size_p = params(rollout_spec, r_layers, args.vocab), params(policy_spec, p_layers, args.vocab)
        label = f"{rollout_spec} {size_r / 1e6:.1f}M : {policy_spec} {size_p / 1e6:.1f}M"
        if size_p < 4 * size_r:
            print(f"{label}: the policy is only {size_p / size_r:.1f}x the rollout model (want >= 4x)", file=sys.stderr)
        medians = {}
        for variant, rows in run_pair(rollout_spec, policy_spec, args).items():
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            medians[variant] = med
            ratio = med["step"] / medians["on-policy"]["step"]
            print(f"{label:32s} {variant:15s} {med['rollout']:9.3f} {med['prepare']:9.3f} {med['update']:9.3f} "
                  f"{med['step']:8.3f} {med['tokens'] / med['rollout']:7.0f} {ratio:11.2f}x", flush=True)
        best = min(medians[v]["step"] for v in VARIANTS if v != "on-policy") / medians["on-policy"]["step"]
        share = medians["on-policy"]["rollout"] / medians["on-policy"]["step"]
        met &= best <= GOAL
        print(f"{label:32s} on-policy rollout share {share:.0%}; best decoupled step {best:.2f}x on-policy "
              f"(goal <= {GOAL}x: {'met' if best <= GOAL else 'missed'})")
    print(f"verdict: {'goal met' if met else 'goal missed'} at every pair" if met else
          "verdict: goal missed on at least one pair (see the ratios above)")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
