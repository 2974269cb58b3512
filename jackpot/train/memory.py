"""Does the pair fit the device? Checked from parameter counts before anything is loaded (`check_fits`).

What a process keeps for the whole run, per parameter (b = bytes of the model's dtype):
    trained model          weights b + gradients b + AdamW's two moments 2b = 4b (float32: 16, bfloat16: 8);
                           with train.mixed_precision=bf16 the master copy is float32: 16
    frozen model           b (the rollout model with distill.rollout_model=frozen, the KL reference copy)
An FSDP2-sharded model (`parallel.*=fsdp`) keeps 1/N of that on each of N processes. Activations, the chunked
head's logits and the KV cache come on top (benchmarks/memory_plan.py estimates them): the sum here is a lower
bound, so a run it refuses cannot fit, and one it lets through may still run out of memory later.

Colocated vLLM (`rollout.engine=vllm` on CUDA) takes `gpu_memory_utilization` (u, vLLM's default 0.9) of the
device's total memory when it is built, after the trainer's models: the trainer's weights plus u x total must
fit in the device (vLLM refuses to start otherwise, with a less direct message). In decoupled mode there are
two engines (the rollout model's, and the policy's for evaluation): asleep (sleep_level 1 or 2) the trainer
keeps one awake at a time, awake (0) both hold u each. The optimizer's states are made at the first update,
while the engines sleep or beside them (sleep_level 0). docs/SCALING.md works the pairs through.

The parameter count of a checkpoint comes from its config (`AutoConfig`), the model built on the meta device
(no memory, no weights read); a tiny model's from its shape (`tiny_parameters`). A source whose config cannot be
read here is skipped (loading it names the problem). On CPU the check compares with the memory the kernel calls
available (/proc/meminfo; skipped where there is none) times the processes sharing it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from jackpot.core.dtypes import DTYPES
from jackpot.errors import JackpotError

GiB = 2**30
TINY_VOCAB = 260  # at most the byte-level tokenizer's size (the character one has 56)
VLLM_DEFAULT_UTILIZATION = 0.9


@dataclass(frozen=True)
class Need:
    """Bytes a run keeps on each device: `weights` from the start, `states` (gradients, moments) from the first
    update, `engine` one vLLM engine's share (0 without colocated vLLM) and `engines` how many it builds (the
    sampling model's, and in decoupled mode the policy's for evaluation), and the parts by name for the message."""

    weights: int
    states: int
    engine: int
    parts: tuple[str, ...]
    engines: int = 1


def tiny_parameters(hidden: int, layers: int, vocab: int = TINY_VOCAB) -> int:
    """A tiny Qwen3 model's parameters (jackpot.models.loading.build_tiny_qwen: no GQA, MLP 3 x hidden, tied):
    q, k, v, o (4 h^2) and the MLP (9 h^2) per layer, and the embedding."""
    return layers * 13 * hidden * hidden + vocab * hidden


def checkpoint_parameters(source: str) -> int | None:
    """Parameters of the checkpoint at `source` from its config, built on the meta device; None if unreadable."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)  # no network: a hub id not yet
        # downloaded is skipped here (the download comes with loading)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - an unreadable config is reported by the loader, with its reason
        return None
    return sum(p.numel() for p in model.parameters())


def run_need(cfg, counts: dict[str, int], world: int, device_total: int | None) -> Need:
    """The bytes `cfg` keeps per device for models of `counts` parameters ({"policy": n, "rollout_model": m}) over
    `world` processes; `device_total`: the GPU's memory, for vLLM's share (None: no colocated engine)."""
    mixed = cfg.train.mixed_precision is not None
    weights = states = 0
    parts = []
    roles = [("policy", True)]
    if cfg.train.mode == "decoupled":
        roles.append(("rollout_model", cfg.distill.rollout_model == "joint"))
    for role, trained in roles:
        n, b = counts[role], DTYPES[getattr(cfg, role).dtype].itemsize
        shards = world if getattr(cfg.parallel, role) == "fsdp" else 1
        if getattr(cfg, role).lora_rank is not None:
            trained = False  # adapters only: their states are small beside the frozen weights
        weights += n * b // shards
        states += (n * (16 if mixed else 4 * b) - n * b) // shards if trained else 0
        parts.append(f"{role} {n / 1e9:.2f}B parameters x {(16 if mixed else 4 * b) if trained else b} bytes"
                     + (f" / {shards} shards" if shards > 1 else ""))
    if cfg.train.kl_coef > 0:
        n, b = counts["policy"], DTYPES[cfg.policy.dtype].itemsize
        weights += n * b
        parts.append(f"the KL reference {n / 1e9:.2f}B x {b}")
    engine = 0
    if device_total is not None:
        u = cfg.rollout.gpu_memory_utilization or VLLM_DEFAULT_UTILIZATION
        engine = int(u * device_total)
        parts.append(f"vLLM's rollout.gpu_memory_utilization={u} x {device_total / GiB:.1f} GiB per engine")
    return Need(weights, states, engine, tuple(parts), engines=2 if cfg.train.mode == "decoupled" else 1)


def check_fits(cfg) -> None:
    """JackpotError (one line, naming the numbers) if the run's lower bound exceeds what its device offers."""
    counts = {}
    for role in ("policy", "rollout_model"):
        mc = getattr(cfg, role)
        n = tiny_parameters(mc.hidden_size, mc.num_layers) if mc.path is None else checkpoint_parameters(mc.path)
        if n is None:
            return
        counts[role] = n
    device = torch.device(cfg.train.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cuda":
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", "0"))
        free, total = torch.cuda.mem_get_info(index)
        vllm = cfg.rollout.engine == "vllm"
        if vllm and cfg.rollout.gpu_memory_utilization is not None:
            from jackpot.rollout.vllm import check_memory_fraction  # no vLLM import

            actor = "rollout_model" if cfg.train.mode == "decoupled" else "policy"
            dtype = DTYPES[cfg.rollout.dtype or getattr(cfg, actor).dtype]
            check_memory_fraction(cfg.rollout.gpu_memory_utilization, counts[actor] * dtype.itemsize, total)
        need = run_need(cfg, counts, world, total if vllm else None)
        _check(need, free, f"cuda:{index} has {free / GiB:.1f} GiB free of {total / GiB:.1f}", cfg)
    elif device.type == "cpu":
        free = available_memory()
        if free is not None:
            need = run_need(cfg, counts, world, None)
            share = f" for {world} processes" if world > 1 else ""
            _check(Need(need.weights * world, need.states * world, 0, need.parts), free,
                   f"this machine has {free / GiB:.1f} GiB of memory available{share}", cfg)


def _check(need: Need, free: int, where: str, cfg) -> None:
    from jackpot.train.config_checks import engine_options

    sleeps = engine_options(cfg).get("sleep_level", 0) > 0
    awake = need.engine * (1 if sleeps else need.engines)  # asleep, the trainer keeps one engine awake at a time
    at_build = need.weights + awake
    at_update = need.weights + need.states + (0 if sleeps else awake)
    total = max(at_build, at_update)
    if total > free:
        hint = (" (lower rollout.gpu_memory_utilization)" if need.engine and at_build > free else
                "; see docs/SCALING.md: parallel.policy=fsdp over more GPUs, LoRA, a frozen rollout model")
        raise JackpotError(f"the models do not fit: at least {total / GiB:.1f} GiB ({'; '.join(need.parts)}) before "
                           f"activations, and {where}{hint}")


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes; None where there is no such file."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
