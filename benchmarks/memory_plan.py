"""Per-GPU memory of a Jackpot run for a (rollout model, policy) pair over N GPUs — an estimate, by parts.

    python benchmarks/memory_plan.py                       # the paper's pairs, 64 prompts x 8, 1 / 4 / 8 GPUs
    python benchmarks/memory_plan.py --pairs qwen3-1.7b:qwen3-8b --response 16384 --gpus 8 16

Both models sharded with FSDP2 (`parallel.policy=fsdp parallel.rollout_model=fsdp`), float32 master
weights computed in bfloat16 (`parallel.mixed_precision=bfloat16`), AdamW, gradient checkpointing on,
the rollout model trained jointly. The parts, per GPU:

    states       16 bytes per trained parameter / N (fp32 weight, gradient, two AdamW moments); a frozen
                 rollout model 4 bytes / N
    gathered     the units FSDP2 holds unsharded at once: the root (embeddings + output head, bf16) and
                 two decoder layers (the one computing and the one prefetched), per model
    activations  one micro-batch of `--micro-tokens` positions (train.micro_batch_tokens): the layer
                 inputs kept by checkpointing (2 bytes x hidden per layer) plus one layer recomputed in
                 full, ACT_PER_LAYER x hidden values per position — the constant measured by
                 benchmarks/bench_update_step.py on CPU (0.27 MB per position for two float32 layers of
                 hidden 1024 = 33 values x hidden; docs/PERFORMANCE.md), here in bf16
    head         three float32 (head_chunk x V) buffers: the chunk's logits, softmax and gradient
    kv cache     generation of min(this GPU's share of the batch, `--gen-batch` = rollout.batch_size)
                 sequences at once: sequences x (prompt + response) x layers x 2 x kv heads x head_dim x 2 bytes
    record       the rollout batch kept for the update: top-k ids (8 bytes) and log-probs (4 bytes)
                 per stored candidate, plus ~5 per-token tensors (float32)

It is an estimate from shapes and one CPU-measured constant — not a GPU measurement (none was available
when it was written): check it against `torch.cuda.max_memory_allocated()` on the first real run.
"""

from __future__ import annotations

import argparse

from jackpot.models.shapes import SHAPES, VOCAB, parameters

GiB = 1024 ** 3
ACT_PER_LAYER = 33     # values per position x hidden for one layer's saved activations (measured, see above)
PAIRS = ("qwen3-1.7b:qwen3-8b", "qwen3-1.7b:qwen3-4b", "qwen2.5-1.5b:qwen2.5-3b")


def parts(rollout: str, policy: str, *, gpus: int, prompts: int, group: int, prompt_len: int, response: int,
          micro_tokens: int, head_chunk: int, topk: int, joint: bool = True,
          gen_batch: int | None = None) -> dict[str, float]:
    """GiB per GPU by part (see the module docstring)."""
    out = {}
    p_pol, p_roll = parameters(policy), parameters(rollout)
    out["states"] = (16 * p_pol + (16 if joint else 4) * p_roll) / gpus
    gathered = 0.0
    for name in (policy, rollout):
        h, inter, heads, kv, hd, layers, tied = SHAPES[name]
        root = VOCAB * h * (1 if tied else 2)
        layer = (parameters(name) - root - h) / layers
        gathered += 2 * (root + 2 * layer)
    out["gathered"] = gathered
    act = 0.0
    for name in (policy, rollout) if joint else (policy,):
        h, _, _, _, _, layers, _ = SHAPES[name]
        act += micro_tokens * h * 2 * (layers + ACT_PER_LAYER)
    out["activations"] = act
    out["head"] = 3 * head_chunk * VOCAB * 4
    seqs = prompts * group / gpus
    h, inter, heads, kv, hd, layers, tied = SHAPES[rollout]
    at_once = seqs if gen_batch is None else min(seqs, gen_batch)
    out["kv cache"] = at_once * (prompt_len + response) * layers * 2 * kv * hd * 2
    out["record"] = seqs * response * (topk * 12 + 5 * 4)
    return {k: v / GiB for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS), help="ROLLOUT:POLICY names from jackpot.models.shapes")
    ap.add_argument("--gpus", nargs="+", type=int, default=[1, 4, 8])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--response", type=int, default=8192)
    ap.add_argument("--micro-tokens", type=int, default=16384)
    ap.add_argument("--head-chunk", type=int, default=1024)
    ap.add_argument("--topk", type=int, default=20)
    ap.add_argument("--gen-batch", type=int, default=None, help="rollout.batch_size (default: the whole share)")
    ap.add_argument("--frozen", action="store_true", help="the rollout model frozen (distill.rollout_model=frozen)")
    args = ap.parse_args()
    names = ["states", "gathered", "activations", "head", "kv cache", "record"]
    print(f"{args.prompts} prompts x {args.group} samples, prompt {args.prompt_len} + response {args.response} "
          f"tokens, micro-batch {args.micro_tokens} positions, head_chunk {args.head_chunk}, top-k {args.topk}, "
          f"generation batch {args.gen_batch or 'whole share'}, rollout model {'frozen' if args.frozen else 'joint'}; "
          "GiB per GPU\n")
    print("| rollout → policy | GPUs | " + " | ".join(names) + " | total |")
    print("|---|---|" + "---|" * (len(names) + 1))
    for pair in args.pairs:
        rollout, policy = pair.split(":")
        for gpus in args.gpus:
            p = parts(rollout, policy, gpus=gpus, prompts=args.prompts, group=args.group,
                      prompt_len=args.prompt_len, response=args.response, micro_tokens=args.micro_tokens,
                      head_chunk=args.head_chunk, topk=args.topk, joint=not args.frozen, gen_batch=args.gen_batch)
            print(f"| {rollout} → {policy} | {gpus} | " + " | ".join(f"{p[n]:.1f}" for n in names)
                  + f" | **{sum(p.values()):.1f}** |")


if __name__ == "__main__":
    main()
