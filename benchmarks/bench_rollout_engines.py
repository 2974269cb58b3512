"""Rollout engines side by side: generated tokens per second on long, ragged responses, and whether the
log-probs each records are those of the distribution it sampled from.

Engines (one random-weight Qwen3 model from config, the same prompts, sampling at temperature 1):
    hf              jackpot's engine: transformers' `generate` with its dynamic KV cache
    hf-static       jackpot's engine with a pre-allocated static KV cache (on CUDA transformers also compiles
                    the decoding forward for it; on CPU it does not)
    hf-compiled     (CPU only if asked: --engines ...,hf-compiled) static cache with the forward compiled on
                    every device (transformers' CompileConfig); the first call pays for the compilation
    generate_batch  transformers' continuous batching (paged attention, requests scheduled as they finish),
                    with `return_logprobs`; it records the sampled token's log-prob only, no top-k
    vllm            jackpot's vLLM engine (`vllm.LLM` in this process; --engines hf,vllm from an environment
                    with vLLM, e.g. `.venv-vllm/bin/python`, see the README); built in the untimed warm-up call

Ragged responses: the EOS row of the output embedding is scaled by --eos-scale so rows stop at different
lengths (the mean and spread are printed). tokens/s counts generated tokens up to each row's EOS, so padding
work that an engine does after a row has finished counts against it. Every engine's recorded log-probs are
compared with a teacher-forced forward of the same model on its own samples (max |difference| printed;
`tests/rollout/test_hf_engine.py` holds the jackpot engines to 1e-4).

    python benchmarks/bench_rollout_engines.py                     # CPU, ~3 min
    python benchmarks/bench_rollout_engines.py --device cuda --hidden 2048 --layers 8 --batch 64 --length 1024
    .venv-vllm/bin/python benchmarks/bench_rollout_engines.py --engines hf,vllm --hidden 1024 --vocab 151936 \
        --batch 16 --length 128 --threads 2                          # real vocabulary, hf beside vLLM
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from jackpot.core.dtypes import DTYPES

ENGINES = ("hf", "hf-static", "generate_batch")


def build(args):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    heads = max(1, args.hidden // 32)
    cfg = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                      head_dim=args.hidden // heads, tie_word_embeddings=False, max_position_embeddings=40960,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).to(device=args.device, dtype=DTYPES[args.dtype]).eval()
    with torch.no_grad():
        model.lm_head.weight[1] *= args.eos_scale
    return model


class _Ids:
    pad_token_id, eos_token_id = 0, 1


def make_bench_engine(name: str, model, prompts, args):
    from jackpot.rollout import make_engine
    from jackpot.rollout.hf import HFRolloutEngine

    if name == "hf-compiled":
        from transformers import CompileConfig

        engine = HFRolloutEngine(model, _Ids(), cache_implementation="static")
        model.generation_config.compile_config = CompileConfig(fullgraph=False)
        model.generation_config.compile_config._compile_all_devices = True
        return engine
    if name == "vllm":  # the KV cache (VLLM_CPU_KVCACHE_SPACE, 1 GiB) need only hold these sequences
        return make_engine(name, model, _Ids(), max_model_len=prompts.shape[1] + args.length)
    return make_engine(name, model, _Ids())


def run_jackpot_engine(engine, prompts, args, seed: int):
    batch = engine.generate(prompts, torch.ones_like(prompts), max_new_tokens=args.length, temperature=1.0,
                            top_p=1.0, topk=1, seed=seed)
    return batch.response_ids, batch.response_mask, batch.rollout_logp


def run_generate_batch(model, prompts, args, seed: int):
    from transformers import ContinuousBatchingConfig, GenerationConfig

    config = GenerationConfig(do_sample=True, max_new_tokens=args.length, temperature=1.0, top_k=0, top_p=1.0,
                              eos_token_id=1, pad_token_id=0)
    torch.manual_seed(seed)
    out = model.generate_batch(prompts.tolist(), generation_config=config, warmup=False,
                               continuous_batching_config=ContinuousBatchingConfig(return_logprobs=True))
    results = sorted(out.values(), key=lambda r: int(r.request_id.split("_")[-1]))
    B, T = len(results), args.length
    ids, mask, logp = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T), torch.zeros(B, T)
    for i, r in enumerate(results):
        n = len(r.generated_tokens)
        # `logprobs`: transformers' name for the sampled tokens' log-probs
        ids[i, :n], mask[i, :n], logp[i, :n] = torch.tensor(r.generated_tokens), 1.0, torch.tensor(r.logprobs[:n])
    return ids.to(prompts.device), mask.to(prompts.device), logp.to(prompts.device)


@torch.no_grad()
def logprob_error(model, prompts, ids, mask, logp) -> float:
    """max |recorded - teacher-forced| log-prob over generated tokens (float32 forward of the same model)."""
    from jackpot.models.forward import token_logprobs

    full = torch.cat([prompts, ids], 1)
    attention = torch.cat([torch.ones_like(prompts), mask.long()], 1)  # prompts unpadded: positions 0, 1, ...
    logits = model(input_ids=full, attention_mask=attention, use_cache=False).logits[:, prompts.shape[1] - 1:-1]
    expected = token_logprobs(logits, ids)
    m = mask.bool()
    return float((logp[m].float() - expected[m].float()).abs().max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--eos-scale", type=float, default=12.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per engine, interleaved (median)")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    engines = args.engines.split(",")
    model = build(args)
    g = torch.Generator().manual_seed(0)
    # Prompts are not ragged: every row is full width (the longest of the drawn lengths) with an all-ones mask;
    # the raggedness measured is the responses'. The draw stays so the prompt width is that of the runs recorded.
    lengths = torch.randint(4, 33, (args.batch,), generator=g)
    prompts = torch.randint(3, args.vocab, (args.batch, int(lengths.max())), generator=g).to(args.device)
    if "generate_batch" in engines:  # continuous batching takes unpadded prompts; give every row the same length
        prompts = prompts[:, -16:]
    times: dict[str, list[float]] = {e: [] for e in engines}
    built = {name: make_bench_engine(name, model, prompts, args) for name in engines if name != "generate_batch"}
    stats: dict[str, tuple[float, float, float]] = {}
    for rep in range(args.repeats + 1):  # repeat 0 warms up (and compiles, for hf-compiled)
        for name in engines:
            t0 = time.perf_counter()
            if name == "generate_batch":
                ids, mask, logp = run_generate_batch(model, prompts, args, seed=rep)
            else:
                ids, mask, logp = run_jackpot_engine(built[name], prompts, args, seed=rep)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if rep:
                times[name].append(time.perf_counter() - t0)
                lens = mask.sum(1)
                stats[name] = (float(lens.sum()), float(lens.float().mean()), float(lens.float().std()))
                stats[name] += (logprob_error(model, prompts, ids, mask, logp),)
    print(f"device {args.device}, {args.dtype}, Qwen3 h{args.hidden} x {args.layers} layers, vocab {args.vocab}, "
          f"batch {args.batch}, up to {args.length} new tokens, median of {args.repeats}, {args.threads} thread(s)")
    print(f"{'engine':15s} {'seconds':>8s} {'tokens':>7s} {'len mean':>8s} {'len sd':>7s} {'tok/s':>7s} "
          f"{'vs hf':>6s} {'max |dlogp|':>11s}")
    base = None
    for name in engines:
        sec = statistics.median(times[name])
        tokens, mean, sd, err = stats[name]
        base = base or tokens / sec
        print(f"{name:15s} {sec:8.3f} {tokens:7.0f} {mean:8.1f} {sd:7.1f} {tokens / sec:7.0f} "
              f"{tokens / sec / base:5.2f}x {err:11.2e}")
    print("verdict: tokens/s measured side by side; an engine is offered only where its log-probs match (<= 1e-4)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
