"""The trainer on one GPU at real sizes: decoupled and on-policy steps of a Qwen3-shaped random-weight pair, one table.

    python scripts/device_check.py                 # both modes, each in a process of its own; prints the table
    python scripts/device_check.py --mode decoupled --out DIR   # one mode (what the parent runs)

The pair is built from configs, nothing downloaded (as tests/models/test_real_vocab.py does): the rollout model at
Qwen3-0.6B's widths and the policy at Qwen3-1.7B's (jackpot.models.shapes; every layer, V = 151,936, random
weights), saved once as bfloat16 checkpoints beside the character tokenizer, loaded as float32 master weights and
trained under bf16 autocast (train.mixed_precision=bf16), fused AdamW, the policy with gradient checkpointing,
the `hf` engine, `train.head_chunk` from jackpot.train.precision.gpu_head_chunk. Random weights rarely emit EOS,
so every response is `--new-tokens` long: the regime that sizes memory and speed.

Each mode runs the trainer's `setup` and `train_step` (what `jackpot train` runs) for `--steps` steps (16 prompts x
8 samples; no evaluation, checkpoint or export: a real-size checkpoint with its optimizer states is tens of GB of
the machine's 64 GiB disk) and reports the mean over the steps after the first (the first pays for kernel
selection and allocation): rollout, prepare and update seconds, sampled tokens per second, and the peak memory
torch allocated during the steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROLLOUT, POLICY = "qwen3-0.6b", "qwen3-1.7b"
KEYS = ("perf/rollout_s", "perf/prepare_s", "perf/update_s", "perf/step_s", "perf/rollout_tokens_per_s")


SMOKE = (64, 192, 2, 1, 32, 1, True)  # --smoke: a small shape for a CPU run of this script itself
SMOKE_VOCAB = 512


def build_pair(directory: Path, device: str, smoke: bool) -> dict[str, Path]:
    """Random-weight Qwen3 models of ROLLOUT and POLICY's published shapes, saved as bfloat16 checkpoints."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from jackpot.models.loading import save_model_and_tokenizer
    from jackpot.models.shapes import SHAPES, VOCAB
    from jackpot.models.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    paths = {}
    for role, name, seed in (("rollout_model", ROLLOUT, 1), ("policy", POLICY, 0)):
        h, inter, heads, kv, hd, layers, tied = SMOKE if smoke else SHAPES[name]
        torch.manual_seed(seed)
        config = Qwen3Config(vocab_size=SMOKE_VOCAB if smoke else VOCAB, hidden_size=h, intermediate_size=inter,
                             num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd, tie_word_embeddings=tied,
                             rope_theta=1e6, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        with torch.device(device):
            model = Qwen3ForCausalLM(config).to(torch.bfloat16)
        paths[role] = save_model_and_tokenizer(model.cpu(), tok, directory / name)
        del model
    return paths


def run_mode(mode: str, models: dict[str, str], out: Path, steps: int, new_tokens: int, device: str,
             prompts: int) -> dict:
    """`train` for `steps` steps of `mode` on `device`; the per-step means and the peak memory."""
    import torch

    from jackpot.models.shapes import VOCAB
    from jackpot.train.config import build_config
    from jackpot.train.loop import setup, train_step
    from jackpot.train.precision import gpu_head_chunk

    cuda = device == "cuda"
    chunk = gpu_head_chunk(VOCAB, torch.cuda.mem_get_info()[1]) if cuda else 1024
    overrides = [f"policy.path={models['policy']}", f"train.mode={mode}", f"train.device={device}",
                 f"train.prompts_per_step={prompts}", *([] if cuda else ["train.threads=1"]),
                 "train.mixed_precision=bf16", "policy.gradient_checkpointing=true", f"train.steps={steps}",
                 "train.eval_prompts=8", f"sampling.max_new_tokens={new_tokens}",
                 f"train.head_chunk={chunk}", "tensorboard=false"]
    if mode == "decoupled":
        overrides += [f"rollout_model.path={models['rollout_model']}", "rollout_model.gradient_checkpointing=true"]
    cfg = build_config(None, overrides)
    run = setup(cfg, out)  # what `jackpot train` runs, without its evaluations, checkpoints and export (disk)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rows = [train_step(run, step) for step in range(1, steps + 1)]
    wall = time.perf_counter() - t0
    run.logger.close()
    rows = rows[1:] or rows  # the first step pays for kernel selection and allocation
    result = {k: statistics.mean(float(r[k]) for r in rows) for k in KEYS}
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    result.update(peak_gib=peak, wall_s=wall, head_chunk=chunk, steps_averaged=len(rows))
    return result


def table(results: dict[str, dict], device: str, new_tokens: int, prompts: int) -> str:
    lines = [f"{device}; {ROLLOUT} -> {POLICY} (random weights, V = 151,936), {prompts} prompts x 8 samples x "
             f"{new_tokens} new tokens, bf16 autocast over fp32 masters, fused AdamW, head_chunk "
             f"{next(iter(results.values()))['head_chunk']}; seconds per step (mean of steps >= 2)", "",
             "| mode | rollout s | prepare s | update s | step s | sampled tok/s | peak GiB | all steps wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, r in results.items():
        lines.append(f"| {mode} | {r['perf/rollout_s']:.2f} | {r['perf/prepare_s']:.2f} | {r['perf/update_s']:.2f} | "
                     f"{r['perf/step_s']:.2f} | {r['perf/rollout_tokens_per_s']:.0f} | {r['peak_gib']:.1f} | "
                     f"{r['wall_s']:.0f} |")
    if {"decoupled", "on-policy"} <= results.keys():
        d, o = results["decoupled"], results["on-policy"]
        ratio = {k: d[f"perf/{k}_s"] / o[f"perf/{k}_s"] for k in ("step", "rollout", "update")}
        lines.append(f"\ndecoupled / on-policy: step {ratio['step']:.2f}, rollout {ratio['rollout']:.2f}, "
                     f"update {ratio['update']:.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["decoupled", "on-policy"], help="run one mode (in this process)")
    ap.add_argument("--models", help="JSON {role: checkpoint directory} (with --mode)")
    ap.add_argument("--out", help="run directory (with --mode); the result goes to OUT.json")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=16, help="train.prompts_per_step (x 8 samples)")
    ap.add_argument("--smoke", action="store_true",
                    help="small models on the CPU: checks this script, measures nothing")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if args.mode:
        result = run_mode(args.mode, json.loads(args.models), Path(args.out), args.steps, args.new_tokens, device,
                          args.prompts)
        Path(args.out + ".json").write_text(json.dumps(result))
        return
    import torch

    name = "CPU (smoke run)" if args.smoke else \
        f"{torch.cuda.get_device_name()} ({torch.cuda.mem_get_info()[1] / 2**30:.0f} GiB)"
    with tempfile.TemporaryDirectory(prefix="jackpot-device-check-") as tmp:
        models = {k: str(v) for k, v in build_pair(Path(tmp), device, args.smoke).items()}
        results = {}
        for mode in ("decoupled", "on-policy"):  # each in a process of its own: its own peak memory
            out = Path(tmp) / mode
            subprocess.run([sys.executable, __file__, "--mode", mode, "--models", json.dumps(models), "--out",
                            str(out), "--steps", str(args.steps), "--new-tokens", str(args.new_tokens),
                            "--prompts", str(args.prompts), *(["--smoke"] if args.smoke else [])],
                           check=True, env={**os.environ})
            results[mode] = json.loads(Path(str(out) + ".json").read_text())
            shutil.rmtree(out, ignore_errors=True)
    print(table(results, name, args.new_tokens, args.prompts))


if __name__ == "__main__":
    main()
