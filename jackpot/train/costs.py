"""What a training step costs: FLOPs by phase, counted from the models' sizes and the tokens each phase
processed, and a modelled GPU time by phase (a roofline model, not a measurement). docs/METHOD.md §11.

FLOPs (the usual 2N / 6N accounting, Kaplan et al. 2020; attention's own products ignored, see below).
N is a model's weights in matrix products (every `torch.nn.Linear`, the LM head included, tied or not);
H = hidden x V is the LM head's part of it. For a row with a prompt of P tokens and a response of R tokens:
    forward over the row (scoring)   2 (N - H) (P + R) + 2 H R        the head runs at the R response positions
    generation of the row            2 (N - H) (P + R - 1) + 2 H R    the last sampled token is never fed back
    training on the row              3 x its forward: 6 (N - H) (P + R) + 6 H R   (forward + backward)
Phases of one step (each summed over the batch's rows):
    generation      the sampler (the rollout model; the policy on-policy) generates every row
    prepare         a forward of the policy (p_old), of the rollout model in decoupled mode (p_omega_old) and of
                    the initial policy when train.kl_coef > 0 (p_init)
    update_policy   ppo_epochs x training on every row; with correction.target='new' one more forward per epoch
                    (the correction under the current policy)
    update_rollout_model   ppo_epochs x training on every row, when the rollout model is trained (joint)
Not counted: attention's score and value products (2 x layers x context x width per token: a few per cent at
these lengths), norms, the softmax and the per-vocabulary sums of Z and the distillation KL (O(V) per
position beside the head's O(hidden x V)), a second forward under gradient checkpointing, the evaluation.
Counted as an engine with per-sequence stopping (vLLM's continuous batching) would spend them: transformers'
`generate` also runs finished rows to the batch's longest response.

Modelled GPU seconds (a roofline, labelled as a model wherever it appears). A card is a bandwidth B and a bf16
throughput F x the fraction `efficiency` of it that training and scoring reach (ROOFLINE: an H100, B = 3 TB/s,
F = 800 TFLOP/s measured bf16, efficiency 0.5). Weights and KV cache in bf16 (2 bytes).
    training and scoring:  FLOPs / (efficiency F)   (compute-bound)
    generation:            one prefill, then one decoding step per response position; a step reads the
                           sampler's weights once for the whole batch and every live row's KV cache, and
                           does 2N FLOPs per live row:
                           step time = max(bytes / B, FLOPs / (efficiency F))
    KV bytes per token:    2 (K and V) x layers x kv_heads x head_dim x 2 bytes
The model ignores kernel-launch latency, which dominates decoding with models as small as the offline tiny pair
(a real GPU would spend microseconds a layer where the model says nanoseconds): its use is the ratio between
phases and between samplers, and scaling the measured token counts to the paper's model sizes. Phases add up
(no overlap, also with rollout.async_steps > 0, where generation runs beside the update).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from jackpot import metric_names as names

PHASES = ("generation", "prepare", "update_policy", "update_rollout_model")
BF16_BYTES = 2


@dataclass(frozen=True)
class ModelSize:
    """What the accounting needs of a model."""

    matmul_params: int
    """N: weights in matrix products, the LM head included (a tied head counted as a product of its own)."""
    head_params: int
    """H: the LM head's weights, hidden x vocabulary."""
    kv_bytes_per_token: int
    """Bytes of KV cache one token holds: 2 x layers x kv_heads x head_dim x 2 (bf16)."""

    def __post_init__(self) -> None:
        if not 0 <= self.head_params <= self.matmul_params or self.kv_bytes_per_token < 0:
            raise ValueError(f"need 0 <= head_params <= matmul_params and kv_bytes_per_token >= 0, got {self}")

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelSize:
        """The size of a Hugging Face causal LM (a LoRA wrapper's base and adapter products both count)."""
        linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        head = model.get_output_embeddings()
        c = model.config
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        return cls(matmul_params=sum(m.weight.numel() for m in linear), head_params=head.weight.numel(),
                   kv_bytes_per_token=2 * c.num_hidden_layers * kv_heads * head_dim * BF16_BYTES)


@dataclass(frozen=True)
class Roofline:
    """A card as the modelled GPU time sees it."""

    bandwidth: float = 3.0e12
    """Memory bandwidth, bytes/s (an H100 SXM: about 3.35 TB/s on paper, 3 TB/s reached)."""
    peak_flops: float = 8.0e14
    """Dense bf16 throughput, FLOP/s (an H100: 989 TFLOP/s on paper, about 800 measured)."""
    efficiency: float = 0.5
    """The fraction of peak_flops that training, scoring and prefill reach (a stated assumption)."""
    weight_bytes: int = BF16_BYTES
    """Bytes per weight read when decoding."""


ROOFLINE = Roofline()
"""The H100 of docs/METHOD.md §11."""


def _lengths(prompt: torch.Tensor, response: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    prompt, response = torch.as_tensor(prompt, dtype=torch.float64), torch.as_tensor(response, dtype=torch.float64)
    if prompt.shape != response.shape or prompt.dim() != 1 or (prompt < 0).any() or (response < 0).any():
        raise ValueError(f"prompt and response lengths must be two non-negative (B,) vectors, got shapes "
                         f"{tuple(prompt.shape)} and {tuple(response.shape)}")
    return prompt, response


def forward_flops(size: ModelSize, prompt: torch.Tensor, response: torch.Tensor) -> float:
    """2 (N - H) (P + R) + 2 H R summed over rows: a forward over prompts and responses, the head on responses.
    prompt, response: (B,) token counts."""
    p, r = _lengths(prompt, response)
    return float(2 * (size.matmul_params - size.head_params) * (p + r).sum() + 2 * size.head_params * r.sum())


def generation_flops(size: ModelSize, prompt: torch.Tensor, response: torch.Tensor) -> float:
    """The forward of the sampled rows less their last token (sampled, never fed back); rows of R = 0 cost 0."""
    p, r = _lengths(prompt, response)
    fed = torch.where(r > 0, p + r - 1, torch.zeros_like(r))
    return float(2 * (size.matmul_params - size.head_params) * fed.sum() + 2 * size.head_params * r.sum())


def generation_seconds(size: ModelSize, prompt: torch.Tensor, response: torch.Tensor,
                       card: Roofline = ROOFLINE) -> float:
    """Modelled seconds to generate the rows as one batch: a prefill of every prompt, then for each response
    position t = 2..max R a decoding step over the rows still generating (module docstring)."""
    p, r = _lengths(prompt, response)
    compute = card.peak_flops * card.efficiency
    weights = size.matmul_params * card.weight_bytes
    body = size.matmul_params - size.head_params
    live = r > 0
    prefill = 2 * body * p[live].sum() + 2 * size.head_params * live.sum()
    seconds = max(weights / card.bandwidth, float(prefill) / compute) if live.any() else 0.0
    for t in range(2, int(r.max().item()) + 1 if len(r) else 0):
        rows = r >= t
        kv = size.kv_bytes_per_token * float((p[rows] + t - 1).sum())
        seconds += max((weights + kv) / card.bandwidth, 2 * size.matmul_params * float(rows.sum()) / compute)
    return seconds


def step_flops(*, sampler: ModelSize, policy: ModelSize, rollout_model: ModelSize | None, trained_rollout: bool,
               prompt: torch.Tensor, response: torch.Tensor, epochs: int, init_policy: bool = False,
               current_policy: bool = False) -> dict[str, float]:
    """FLOPs of one step by phase (PHASES): `sampler` generated the rows (prompt, response: (B,) token counts);
    `rollout_model` is None on-policy; `trained_rollout`: it is trained (joint); `epochs`: train.ppo_epochs;
    `init_policy`: a KL reference is scored (train.kl_coef > 0); `current_policy`: the correction is recomputed
    under the current policy once per epoch (correction.target='new')."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    policy_fwd = forward_flops(policy, prompt, response)
    prepare = policy_fwd * (2 if init_policy else 1)
    if rollout_model is not None:
        prepare += forward_flops(rollout_model, prompt, response)
    return {
        "generation": generation_flops(sampler, prompt, response),
        "prepare": prepare,
        "update_policy": epochs * policy_fwd * (3 + (1 if current_policy else 0)),
        "update_rollout_model": epochs * 3 * forward_flops(rollout_model, prompt, response)
        if rollout_model is not None and trained_rollout else 0.0,
    }


def step_seconds(flops: dict[str, float], generation_s: float, card: Roofline = ROOFLINE) -> dict[str, float]:
    """Modelled seconds by phase: generation as `generation_seconds` gave it, the other phases compute-bound."""
    compute = card.peak_flops * card.efficiency
    return {phase: generation_s if phase == "generation" else flops[phase] / compute for phase in PHASES}


@dataclass(frozen=True)
class CostMeter:
    """A run's models' sizes and what its config says each phase runs: `metrics(batch)` gives a step's
    perf/flops_* and perf/gpu_model_s_* (and their totals perf/flops, perf/gpu_model_s)."""

    policy: ModelSize
    rollout_model: ModelSize | None
    trained_rollout: bool
    epochs: int
    init_policy: bool
    current_policy: bool

    @classmethod
    def of(cls, cfg, policy: torch.nn.Module, rollout_model: torch.nn.Module | None) -> CostMeter:
        """cfg: the run's jackpot.train.config.Config; the models unwrapped (Hugging Face modules)."""
        return cls(ModelSize.of(policy), None if rollout_model is None else ModelSize.of(rollout_model),
                   trained_rollout=cfg.distill.rollout_model == "joint", epochs=cfg.train.ppo_epochs,
                   init_policy=cfg.train.kl_coef > 0, current_policy=cfg.correction.target == "new"
                   and cfg.correction.name == "jackpot")

    def metrics(self, prompt: torch.Tensor, response: torch.Tensor) -> dict[str, float]:
        """The step's costs; prompt, response: (B,) token counts of every row of the global batch."""
        sampler = self.rollout_model or self.policy
        flops = step_flops(sampler=sampler, policy=self.policy, rollout_model=self.rollout_model,
                           trained_rollout=self.trained_rollout, prompt=prompt, response=response,
                           epochs=self.epochs, init_policy=self.init_policy, current_policy=self.current_policy)
        seconds = step_seconds(flops, generation_seconds(sampler, prompt, response))
        out = {names.perf_flops(k): v for k, v in flops.items()}
        out.update({names.perf_gpu_model_s(k): v for k, v in seconds.items()})
        out.update({names.PERF_FLOPS: sum(flops.values()), names.PERF_GPU_MODEL_S: sum(seconds.values())})
        return out


__all__ = ["PHASES", "ROOFLINE", "CostMeter", "ModelSize", "Roofline", "forward_flops", "generation_flops",
           "generation_seconds", "step_flops", "step_seconds"]
