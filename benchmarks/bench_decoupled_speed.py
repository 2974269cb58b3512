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
    jackpot joint topk / jackpot frozen topk   the same two with top-k Z (+ kappa, from the engine's recorded
                       top-K: the paper's estimator)

A variant is a list of config overrides (VARIANTS; more with --add-variant NAME OVERRIDE...), so e.g.
train.recompute_old=always against =auto is one more row. `--variants` picks some of them.

The step is the trainer's own: the rollout engine (`jackpot.rollout.make_engine`, config rollout.engine; every
variant on the same `--engine`, the weights pushed to it before each rollout as the trainer pushes them), then
`jackpot.train.prepare.prepare` and `update`, with random 0/1 rewards. Goal (issue: decoupled speed):
a decoupled step <= 0.5x an on-policy step at rollout-dominated shapes. The ratio printed is the median
decoupled step time over the median on-policy step time, measured side by side in this run.

The floor (issue 25; decoupled_floor.py says what it counts): each unavoidable component — generation of each
model, a no-grad forward of each (body + chunked head), the exact-Z pass over both heads, a forward + backward
of each and its optimizer step — is timed on its own in every measured round, beside the variants' steps;
per variant the table prints its floor, measured / floor for the step and for each phase, and the step's
peak resident memory (VmHWM, reset before each step; see decoupled_floor.StepPeak). Goal: every step within
1.15x of its floor, every phase within 1.2x of its own. All variants share one policy, one rollout model (and
one engine and optimizer each) — their weights move with every variant's update, which changes no timing.

`--profile VARIANT` prints instead the top operators (torch.profiler, CPU, by self CPU time) of one update
of that variant, after a warm-up step. `--preset` sets the shapes of a named table (PRESETS; flags given
explicitly win):

    vllm-table   64x2:256x4, V = 151,936, 2 x 512 tokens: docs/PERFORMANCE.md "Decoupled speed with both
                 modes on vLLM (CPU)"
    user         512x2:1024x2, V = 151,936, 16 x 128 tokens: the shape a new user tried (issue 25)
    body         192x8:512x8, V = 32,768, 8 x 128 tokens: body-dominated (the policy's 8 layers hold 62 % of
                 its 44M parameters), the rollout model 4.3x smaller

    python benchmarks/bench_decoupled_speed.py                                  # CPU, ~10 min on 2 busy cores
    python benchmarks/bench_decoupled_speed.py --pairs 256x2:512x4 --length 256 --batch 8
    .venv-vllm/bin/python benchmarks/bench_decoupled_speed.py --engine vllm --pairs 64x2:256x4 --vocab 151936 \\
        --batch 2 --length 512 --steps 3                                        # both modes on vLLM (CPU)
    python benchmarks/bench_decoupled_speed.py --pairs qwen3-1.7b:qwen3-8b --layers 4:4 --device cuda \\
        --dtype bfloat16 --vocab 151936 --batch 64 --length 1024
    python benchmarks/bench_decoupled_speed.py --preset body --steps 2              # the floor table
    python benchmarks/bench_decoupled_speed.py --preset body --profile "jackpot joint"
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from jackpot.core.dtypes import DTYPES
from jackpot.models.shapes import QWEN3  # the published widths, no download

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decoupled_floor import COMPONENTS, PHASES, StepPeak, floor_of, measure_components  # noqa: E402

VARIANTS = {  # name -> config overrides
    "on-policy": ["train.mode=on-policy", "correction.name=none"],
    "jackpot joint": ["correction.name=jackpot", "correction.z=exact", "distill.rollout_model=joint"],
    "jackpot frozen": ["correction.name=jackpot", "correction.z=exact", "distill.rollout_model=frozen"],
    "jackpot joint topk": ["correction.name=jackpot", "correction.z=topk", "distill.rollout_model=joint"],
    "jackpot frozen topk": ["correction.name=jackpot", "correction.z=topk", "distill.rollout_model=frozen"],
    # every variant above runs with train.recompute_old=auto (the default): the engine's recorded log-probs serve
    # as p_omega_old / p_old where they are the trainer's own; beside them, the same recomputed
    "on-policy always": ["train.mode=on-policy", "correction.name=none", "train.recompute_old=always"],
    "jackpot frozen topk always": ["correction.name=jackpot", "correction.z=topk", "distill.rollout_model=frozen",
                                   "train.recompute_old=always"],
}
FLOOR_VARIANT = "jackpot joint"  # the config whose models, engines and optimizers the components use
PRESETS = {  # name -> step_arguments defaults (module docstring)
    "vllm-table": {"pairs": ["64x2:256x4"], "vocab": 151936, "batch": 2, "length": 512},
    "user": {"pairs": ["512x2:1024x2"], "vocab": 151936, "batch": 16, "length": 128},
    "body": {"pairs": ["192x8:512x8"], "vocab": 32768, "batch": 8, "length": 128},
}
GOAL = 0.5
GOAL_FLOOR_STEP, GOAL_FLOOR_PHASE = 1.15, 1.2
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


def setup_variant(variant: str, rollout_spec: str, policy_spec: str, args, *, overrides: list[str] | None = None,
                  shared: dict | None = None) -> dict:
    """Models, engine, optimizers and config of one variant, ready for `step`. overrides: the variant's
    config overrides (default VARIANTS[variant]). shared: a cache across variants (None: everything built
    afresh) — variants whose model sections of the config agree get the same model, engine and optimizer."""
    from jackpot.rollout import ENGINE_OPTIONS, make_engine
    from jackpot.train.config import build_config
    from jackpot.train.config_checks import engine_options
    from jackpot.train.loop import prepared_model

    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    # an engine with a KV cache sized by the longest sequence (vLLM) gets this run's, not the model's 40,960
    sized = "max_model_len" in ENGINE_OPTIONS[args.engine]
    fit = [f"rollout.max_model_len={PROMPT_LEN + args.length}"] if sized else []
    overrides = VARIANTS[variant] if overrides is None else overrides
    cfg = build_config(None, [*overrides, f"train.prompts_per_step={args.batch // 2}", "train.group_size=2",
                              f"sampling.max_new_tokens={args.length}", f"rollout.engine={args.engine}", *fit])
    cache = {} if shared is None else shared
    r_layers, p_layers = (int(x) if x else None for x in args.layers.split(":"))

    def get(key, make):
        if key not in cache:
            cache[key] = make()
        return cache[key]

    policy = get(("policy", policy_spec, repr(cfg.policy)),
                 lambda: prepared_model(build(policy_spec, p_layers, args.vocab, 0, dtype, device), cfg.policy))
    rollout = get(("rollout", rollout_spec, repr(cfg.rollout_model)), lambda: prepared_model(
        build(rollout_spec, r_layers, args.vocab, 1, dtype, device), cfg.rollout_model))
    opt = lambda m: get(("opt", id(m)), lambda: torch.optim.AdamW(m.parameters(), lr=1e-6))  # noqa: E731
    if cfg.train.mode == "on-policy":
        rollout = None
    actor = rollout if rollout is not None else policy
    options = engine_options(cfg)
    engine = get(("engine", id(actor), cfg.rollout.engine, repr(sorted(options.items()))),
                 lambda: make_engine(cfg.rollout.engine, actor, _Ids(), **options))
    return {"cfg": cfg, "policy": policy, "rollout": rollout, "actor": actor, "device": device, "engine": engine,
            "policy_opt": opt(policy),
            "rollout_opt": opt(rollout) if rollout is not None and cfg.distill.rollout_model == "joint" else None}


def setup_floor(rollout_spec: str, policy_spec: str, args, shared: dict) -> dict:
    """What decoupled_floor.measure_components runs on: the policy and the rollout model (and their
    engines and optimizers) of the variants, from `shared`, with FLOOR_VARIANT's config."""
    joint = setup_variant(FLOOR_VARIANT, rollout_spec, policy_spec, args, shared=shared)
    on = setup_variant("on-policy", rollout_spec, policy_spec, args, shared=shared)
    return {"cfg": joint["cfg"], "device": joint["device"], "policy": joint["policy"], "rollout": joint["rollout"],
            "policy_engine": on["engine"], "rollout_engine": joint["engine"], "policy_opt": joint["policy_opt"],
            "rollout_opt": joint["rollout_opt"]}


def step(v: dict, prompts: torch.Tensor, rewards: torch.Tensor, i: int, args) -> dict[str, float]:
    """One trainer step (rollout, prepare, update) of a variant set up by `setup_variant`, timed by phase, and
    its peak resident memory (decoupled_floor.StepPeak; None off Linux)."""
    from jackpot.rollout.weights import push_weights
    from jackpot.train.prepare import prepare, recorded_logprobs_serve
    from jackpot.train.update import update

    cfg, device, engine = v["cfg"], v["device"], v["engine"]
    sync(device)
    with StepPeak() as peak:
        t0 = time.perf_counter()
        push_weights(engine, v["actor"], engine.model_version + 1)  # the weights now (an engine may be shared)
        batch = engine.generate(prompts, torch.ones_like(prompts), max_new_tokens=args.length, temperature=1.0,
                                top_p=1.0, topk=cfg.sampling.topk, seed=i)
        sync(device)
        t1 = time.perf_counter()
        # the trainer's choice (train.recompute_old); the batch's version stands for the step (engines are shared)
        recorded = recorded_logprobs_serve(cfg, engine, v["actor"], batch, batch.model_version)
        prep = prepare(cfg, batch, rewards, policy=v["policy"], rollout_model=v["rollout"], init_policy=None, step=i,
                       recorded_old=recorded)
        sync(device)
        t2 = time.perf_counter()
        update(cfg, prep, policy=v["policy"], rollout_model=v["rollout"], policy_opt=v["policy_opt"],
               rollout_opt=v["rollout_opt"], step=i)
        sync(device)
        t3 = time.perf_counter()
    return {"rollout": t1 - t0, "prepare": t2 - t1, "update": t3 - t2, "step": t3 - t0,
            "tokens": float(batch.response_mask.sum()), "peak_mib": peak.peak_mib, "extra_mib": peak.extra_mib}


def run_pair(rollout_spec: str, policy_spec: str, args, variants: dict[str, list[str]] | None = None
             ) -> tuple[dict[str, list[dict]], list[dict[str, float]], dict]:
    """Every variant's measured steps and the floor's components, interleaved (round i: step i of each
    variant in turn, then the components) so that load from other processes falls on all alike; round 0
    warms up and is dropped. Returns (rows per variant, components per round, each variant's config)."""
    variants = VARIANTS if variants is None else variants
    shared: dict = {}
    setups = {name: setup_variant(name, rollout_spec, policy_spec, args, overrides=ov, shared=shared)
              for name, ov in variants.items()}
    floor = setup_floor(rollout_spec, policy_spec, args, shared)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, args.vocab, (args.batch, PROMPT_LEN), generator=g).to(args.device)
    rows: dict[str, list[dict]] = {name: [] for name in variants}
    comps: list[dict[str, float]] = []
    for i in range(1 + args.steps):
        rewards = torch.randint(0, 2, (args.batch // 2, 2), generator=g).float().to(args.device)
        if not i and args.warmup == "components":  # every model, engine and optimizer once: a cheaper warm-up
            measure_components(floor, prompts, rewards, i, args.length)
            continue
        for name, v in setups.items():
            row = step(v, prompts, rewards, i, args)
            print(f"round {i} {name}: step {row['step']:.2f} s", file=sys.stderr, flush=True)  # progress
            if i:
                rows[name].append(row)
        comp = measure_components(floor, prompts, rewards, i, args.length)
        if i:
            comps.append(comp)
    return rows, comps, {name: v["cfg"] for name, v in setups.items()}


def profile_update(rollout_spec: str, policy_spec: str, args, variant: str, overrides: list[str]) -> str:
    """The top operators (torch.profiler, CPU, by self CPU time) of one update of `variant`, after one
    warm-up step and a rollout + prepare."""
    from torch.profiler import ProfilerActivity, profile

    from jackpot.rollout.weights import push_weights
    from jackpot.train.prepare import prepare
    from jackpot.train.update import update

    v = setup_variant(variant, rollout_spec, policy_spec, args, overrides=overrides)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, args.vocab, (args.batch, PROMPT_LEN), generator=g).to(args.device)
    rewards = torch.randint(0, 2, (args.batch // 2, 2), generator=g).float().to(args.device)
    step(v, prompts, rewards, 0, args)
    cfg, engine = v["cfg"], v["engine"]
    push_weights(engine, v["actor"], engine.model_version + 1)
    batch = engine.generate(prompts, torch.ones_like(prompts), max_new_tokens=args.length, temperature=1.0,
                            top_p=1.0, topk=cfg.sampling.topk, seed=1)
    prep = prepare(cfg, batch, rewards, policy=v["policy"], rollout_model=v["rollout"], init_policy=None, step=1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        update(cfg, prep, policy=v["policy"], rollout_model=v["rollout"], policy_opt=v["policy_opt"],
               rollout_opt=v["rollout_opt"], step=1)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows)


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


def _arguments(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, list[str]]]:
    """The parsed arguments (a --preset's shapes as defaults) and the variants to run, name -> overrides."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    step_arguments(parser, pairs=["96x2:256x4", "192x2:512x4"], length=256, steps=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--preset", choices=list(PRESETS), help="the shapes of a named table (module docstring)")
    parser.add_argument("--variants", nargs="+", metavar="NAME", help=f"run only these of {list(VARIANTS)}")
    parser.add_argument("--add-variant", nargs="+", action="append", default=[], metavar=("NAME", "OVERRIDE"),
                        help="one more variant: a name and its config overrides (repeatable)")
    parser.add_argument("--warmup", choices=["round", "components"], default="round",
                        help="the dropped first round: every variant's step and the components (round), or only "
                             "the components, which run every model, engine and optimizer once (cheaper at large "
                             "shapes; the first variant's first measured step may then pay first-call costs)")
    parser.add_argument("--profile", metavar="VARIANT",
                        help="print the top operators of one update of this variant (first pair) instead")
    parser.add_argument("--profile-rows", type=int, default=15, help="operators --profile prints")
    known, _ = parser.parse_known_args(argv)
    if known.preset:
        parser.set_defaults(**PRESETS[known.preset])
    args = parser.parse_args(argv)
    unknown = [n for n in args.variants or [] if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}: choose from {list(VARIANTS)} or define one with --add-variant")
    variants = {n: VARIANTS[n] for n in args.variants or VARIANTS}
    variants.update({name: overrides for name, *overrides in args.add_variant})
    if args.profile is not None and args.profile not in variants:
        parser.error(f"--profile {args.profile!r} is not a variant of this run: {list(variants)}")
    return args, variants


def _ratio(measured: float, floor: float) -> float:
    return measured / floor if floor > 0 else float("inf")


def print_floor(label: str, rows: dict[str, list[dict]], comps: list[dict[str, float]], cfgs: dict) -> bool:
    """The components' medians, then per variant its floor, measured / floor for the step and each phase, and
    its peak memory; True when every variant is within the floor goals. A variant that recomputes what the engine
    recorded (train.recompute_old=always) is a reference row, shown beside, outside the goal: its prepare exceeds
    the floor by exactly the forward the default saves."""
    comp = {k: statistics.median(c[k] for c in comps) for k in COMPONENTS}
    print(f"{label}: components (median s): " + ", ".join(f"{k} {comp[k]:.3f}" for k in COMPONENTS))
    print(f"{'pair (rollout : policy)':32s} {'variant':20s} {'floor s':>8s} {'step s':>8s} {'x floor':>7s} "
          + " ".join(f"{p + ' s/floor':>21s}" for p in PHASES) + f" {'peak MiB':>9s} {'step +MiB':>9s}")
    met = True
    for variant, vrows in rows.items():
        floor = floor_of(cfgs[variant], comp)
        med = {k: statistics.median(r[k] for r in vrows) for k in (*PHASES, "step")}
        x = {k: _ratio(med[k], floor[k]) for k in (*PHASES, "step")}
        if cfgs[variant].train.recompute_old != "always":
            met &= x["step"] <= GOAL_FLOOR_STEP and all(x[p] <= GOAL_FLOOR_PHASE for p in PHASES)
        mem = [statistics.median(r[k] for r in vrows) if vrows[0][k] is not None else None
               for k in ("peak_mib", "extra_mib")]
        mem_s = " ".join(f"{m:9.0f}" if m is not None else f"{'n/a':>9s}" for m in mem)
        print(f"{label:32s} {variant:20s} {floor['step']:8.3f} {med['step']:8.3f} {x['step']:6.2f}x "
              + " ".join(f"{f'{med[p]:.3f}/{floor[p]:.3f} {x[p]:.2f}x':>21s}" for p in PHASES) + f" {mem_s}",
              flush=True)
    print(f"{label:32s} floor goal (step <= {GOAL_FLOOR_STEP}x its floor, each phase <= {GOAL_FLOOR_PHASE}x; "
          f"recompute_old=always rows aside): {'met' if met else 'missed'}")
    return met


def main(argv: list[str] | None = None) -> int:
    args, variants = _arguments(argv)
    torch.set_num_threads(args.threads)
    r_layers, p_layers = (int(x) if x else None for x in args.layers.split(":"))
    print(f"device {args.device}, {args.dtype}, batch {args.batch}, response {args.length} tokens, "
          f"vocab {args.vocab}, engine {args.engine}, {args.steps} measured steps (median), {args.threads} thread(s)"
          + (", warm-up: the components only" if args.warmup == "components" else ""))
    if args.profile is not None:
        rollout_spec, policy_spec = args.pairs[0].split(":")
        print(f"{args.pairs[0]} {args.profile}: top {args.profile_rows} operators of one update, by self CPU time")
        print(profile_update(rollout_spec, policy_spec, args, args.profile, variants[args.profile]))
        print("verdict: profile only (no goal checked)")
        return 0
    print(f"{'pair (rollout : policy)':32s} {'variant':20s} {'rollout s':>9s} {'prepare s':>9s} {'update s':>9s} "
          f"{'step s':>8s} {'tok/s':>7s} {'vs on-policy':>12s}")
    met = floor_met = True
    for pair in args.pairs:
        rollout_spec, policy_spec = pair.split(":")
        size_r, size_p = params(rollout_spec, r_layers, args.vocab), params(policy_spec, p_layers, args.vocab)
        label = f"{rollout_spec} {size_r / 1e6:.1f}M : {policy_spec} {size_p / 1e6:.1f}M"
        if size_p < 4 * size_r:
            print(f"{label}: the policy is only {size_p / size_r:.1f}x the rollout model (want >= 4x)", file=sys.stderr)
        rows, comps, cfgs = run_pair(rollout_spec, policy_spec, args, variants)
        medians = {}
        for variant, vrows in rows.items():
            med = {k: statistics.median(r[k] for r in vrows) for k in (*PHASES, "step", "tokens")}
            medians[variant] = med
            base = medians.get("on-policy")
            ratio = f"{med['step'] / base['step']:11.2f}x" if base else f"{'-':>12s}"
            print(f"{label:32s} {variant:20s} {med['rollout']:9.3f} {med['prepare']:9.3f} {med['update']:9.3f} "
                  f"{med['step']:8.3f} {med['tokens'] / med['rollout']:7.0f} {ratio}", flush=True)
        decoupled = [v for v in rows if cfgs[v].train.mode == "decoupled"]
        if "on-policy" in medians and decoupled:
            best = min(medians[v]["step"] for v in decoupled) / medians["on-policy"]["step"]
            share = medians["on-policy"]["rollout"] / medians["on-policy"]["step"]
            met &= best <= GOAL
            print(f"{label:32s} on-policy rollout share {share:.0%}; best decoupled step {best:.2f}x on-policy "
                  f"(goal <= {GOAL}x: {'met' if best <= GOAL else 'missed'})")
        floor_met &= print_floor(label, rows, comps, cfgs)
    print(f"verdict: decoupled-vs-on-policy goal {'met at every pair' if met else 'missed on at least one pair'}; "
          f"floor goal {'met' if floor_met else 'missed'} (see the ratios above)")
    return 0 if met and floor_met else 1


if __name__ == "__main__":
    sys.exit(main())
