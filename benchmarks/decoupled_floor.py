"""The floor of an RL step and the peak memory of a step, for bench_decoupled_speed.py (issue 25).

The floor of a step is the sum of the work it cannot avoid, each component timed on its own in the same run
and on the same models, engines and batch shapes as the measured steps:

    gen policy / gen rollout      the engine's `generate` of each model (the weights pushed first, untimed)
    body policy / body rollout    a no-grad forward to the last hidden states over the batch (`model_head`)
    head policy / head rollout    the chunked head's sampled log-probs from those states (`sampled_logp`),
                                  so body + head is prepare's forward of a model (jackpot.train.prepare._score)
    exact Z                       one pass over both heads: both sampled log-probs and Z
                                  (`jackpot.core.head.logprobs_and_normalizer`)
    train policy / train rollout  a forward + backward of the model through the chunked head
                                  (`jackpot.core.head.logprobs_at`) under the PPO token loss
    opt policy / opt rollout      gradient clipping and the AdamW step of the model

Per variant (its config decides; nothing keyed on its name):

    rollout   gen of the sampling model (the rollout model decoupled, the policy on-policy)
    prepare   one policy forward for p_old (body + head); decoupled with exact Z: both bodies + the exact-Z
              pass (which yields p_old, p_omega_old and Z at once); otherwise the rollout model's forward is
              not counted: its recorded log-probs (and top-K, for top-k Z) can serve (issue 25, item 2)
    update    train + opt of the policy, and of the rollout model when it is trained jointly; the teacher's
              distribution for the distillation term is taken to come from the policy's own forward

The floor leaves out what the variants do not measure either (the init policy of kl_coef > 0, target='new''s
extra forward per mini-batch) and counts a policy forward for p_old even where the engine's log-probs could
serve on-policy (the brief's choice: a conservative floor).

Memory (`StepPeak`): Linux only. Before a step, glibc's free memory is returned to the system
(`malloc_trim(0)`) and the resident-set high-water mark is reset (`/proc/self/clear_refs` "5"); after it,
VmHWM is the step's peak resident set of this process (every model, optimizer and engine of the run
included: in-process engines such as `hf`; an engine in a worker process is not seen), and VmHWM - VmRSS
before is the step's own transient memory. tracemalloc does not see torch's allocations, so it is not used.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import time

import torch

COMPONENTS = ("gen policy", "gen rollout", "body policy", "head policy", "body rollout", "head rollout", "exact Z",
              "train policy", "train rollout", "opt policy", "opt rollout")
PHASES = ("rollout", "prepare", "update")


@contextlib.contextmanager
def clock(times: dict[str, float], key: str, device: torch.device):
    """Add the wall time of the block (device synchronised at both ends) to times[key]."""
    sync(device)
    t0 = time.perf_counter()
    yield
    sync(device)
    times[key] = times.get(key, 0.0) + time.perf_counter() - t0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- the components
def measure_components(fl: dict, prompts: torch.Tensor, rewards: torch.Tensor, i: int, length: int
                       ) -> dict[str, float]:
    """Seconds of each of COMPONENTS once, on `fl` (from bench_decoupled_speed.setup_floor: cfg, policy,
    rollout, their engines and optimizers, device); the forwards and backwards run over the rollout model's
    batch in prepare's micro-batches."""
    from jackpot.core.advantages import group_advantages
    from jackpot.rollout.weights import push_weights

    cfg, device, times = fl["cfg"], fl["device"], {}
    batches = {}
    for who in ("policy", "rollout"):
        engine = fl[f"{who}_engine"]
        push_weights(engine, fl[who], engine.model_version + 1)
        with clock(times, f"gen {who}", device):
            batches[who] = engine.generate(prompts, torch.ones_like(prompts), max_new_tokens=length,
                                           temperature=1.0, top_p=1.0, topk=cfg.sampling.topk, seed=i)
    batch = batches["rollout"]
    old = _forwards(fl, batch, times)
    advantages = group_advantages(rewards, mode=cfg.train.advantages).reshape(-1)
    for who in ("policy", "rollout"):
        _train(fl, who, batch, old[who], advantages, times)
    return times


def _split(cfg, batch) -> list[torch.Tensor]:
    from jackpot.train.prepare import micro_size

    return list(torch.arange(len(batch)).split(micro_size(cfg, batch.response_len)))


@torch.no_grad()
def _forwards(fl: dict, batch, times: dict[str, float]) -> dict[str, torch.Tensor]:
    """body + head of each model and the exact-Z pass over both heads, per micro-batch; each model's sampled
    log-probs (B, T)."""
    from jackpot.core import head as vocab
    from jackpot.train.prepare import model_head, needs_of, sampled_logp

    cfg, device = fl["cfg"], fl["device"]
    temp, lam = cfg.sampling.temperature, needs_of(cfg).z_lam
    logp: dict[str, list[torch.Tensor]] = {"policy": [], "rollout": []}
    for idx in _split(cfg, batch):
        mb, heads = batch.select(idx), {}
        for who in ("policy", "rollout"):
            with clock(times, f"body {who}", device):
                heads[who] = model_head(fl[who], mb, temp)
            with clock(times, f"head {who}", device):
                logp[who].append(sampled_logp(cfg, heads[who], mb.response_ids))
        with clock(times, "exact Z", device):
            vocab.logprobs_and_normalizer(heads["policy"], heads["rollout"], mb.response_ids.reshape(-1), lam,
                                          chunk=cfg.train.head_chunk)
    return {who: torch.cat(parts) for who, parts in logp.items()}


def _train(fl: dict, who: str, batch, old_logp: torch.Tensor, advantages: torch.Tensor,
           times: dict[str, float]) -> None:
    """One forward + backward of `who` under the token-mean PPO loss through the chunked head, then its
    clipped optimizer step, timed apart."""
    from jackpot.core.losses import ppo_token_loss
    from jackpot.train.prepare import model_head, sampled_logp

    cfg, device, model, opt = fl["cfg"], fl["device"], fl[who], fl[f"{who}_opt"]
    t = cfg.train
    denominator = batch.response_mask.sum().clamp_min(1)
    opt.zero_grad(set_to_none=True)
    with _train_mode(model), clock(times, f"train {who}", device):
        for idx in _split(cfg, batch):
            mb = batch.select(idx)
            new = sampled_logp(cfg, model_head(model, mb, cfg.sampling.temperature), mb.response_ids)
            tok, _ = ppo_token_loss(new, old_logp[idx], advantages[idx], clip_eps=t.clip_eps,
                                    clip_eps_high=t.clip_eps_high, dual_clip=t.dual_clip)
            ((tok * mb.response_mask).sum() / denominator).backward()
    with clock(times, f"opt {who}", device):
        params = [p for p in model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip is not None else float("inf"))
        opt.step()


@contextlib.contextmanager
def _train_mode(model: torch.nn.Module):
    """Train mode while a model with gradient checkpointing trains (Hugging Face checkpoints only then), as
    jackpot.train.update does; dropout is 0 either way."""
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    checkpointed = bool(getattr(model, flag, False))
    if checkpointed:
        model.train()
    try:
        yield
    finally:
        model.eval()


# ----------------------------------------------------------------------------- the floor of a variant
def rollout_forward_needed(cfg) -> bool:
    """Whether prepare cannot do without the rollout model's forward: exact Z needs its full distribution.
    Elsewhere the engine's recorded log-probs (and top-K) are p_omega_old (issue 25 item 2,
    train.recompute_old=auto, where the engine's numerics are the trainer's)."""
    from jackpot.train.prepare import needs_of

    needs = needs_of(cfg)
    return cfg.train.mode == "decoupled" and needs.z == "exact" and not needs.current_policy


def floor_of(cfg, comp: dict[str, float]) -> dict[str, float]:
    """The floor of each phase (PHASES) and of the step, in seconds, of a variant with config `cfg` from the
    component times `comp` (module docstring)."""
    decoupled = cfg.train.mode == "decoupled"
    rollout = comp["gen rollout"] if decoupled else comp["gen policy"]
    if rollout_forward_needed(cfg):
        prepare = comp["body policy"] + comp["body rollout"] + comp["exact Z"]
    else:
        prepare = comp["body policy"] + comp["head policy"]
    update = comp["train policy"] + comp["opt policy"]
    if decoupled and cfg.distill.rollout_model == "joint":
        update += comp["train rollout"] + comp["opt rollout"]
    return {"rollout": rollout, "prepare": prepare, "update": update, "step": rollout + prepare + update}


# ----------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class StepPeak:
    """The peak resident set of this process during a block, and its rise over the resident set before
    (module docstring); `peak_mib` / `extra_mib` are None where the high-water mark cannot be reset."""

    def __init__(self) -> None:
        self.peak_mib: float | None = None
        self.extra_mib: float | None = None
        self._before: int | None = None

    def __enter__(self) -> StepPeak:
        try:
            _malloc_trim()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._before = _status_kib("VmRSS")
        except OSError:
            self._before = None
        return self

    def __exit__(self, *exc) -> None:
        if self._before is not None:
            peak = _status_kib("VmHWM")
            self.peak_mib, self.extra_mib = peak / 1024, (peak - self._before) / 1024


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if name:
        getattr(ctypes.CDLL(name), "malloc_trim", lambda _: None)(0)
