"""Configuration of a training run: frozen dataclasses, one docstring per field, the only source of truth.

A run is configured by, in order of precedence: command-line overrides `section.field=value`
(values parsed as YAML), a YAML file (`--config FILE` or a preset by name, which may name a `preset` it
extends), and the defaults below — which are the offline default: a tiny rollout model training a ~4x
larger tiny policy on 2-digit addition with Jackpot, on CPU, in a few minutes.

This module is the schema. The machinery — YAML files, presets, overrides, type coercion, the listing of
`jackpot config` — is `config_io.py`; the checks and the task's defaults are `config_checks.py`, with each
field's choices read from the registry that owns them. `build_config` puts the three together. Why a
default is what it is, where it was measured: docs/CONFIG.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jackpot.core.corrections import correction_params
from jackpot.train import config_io
from jackpot.train.config_checks import CHOICES, RECOMPUTE_OLD, ROLLOUT_MODEL_TRAINING, TRAIN_MODES, resolve
from jackpot.train.config_io import describe_presets, presets, to_dict

# with the schema, the entry points the trainer and the CLI use (the rest of the machinery: config_io)
__all__ = ["CACHE_ENV", "RECOMPUTE_OLD", "ROLLOUT_MODEL_TRAINING", "RUNS_ENV", "TRAIN_MODES", "Config",
           "CorrectionConfig", "DistillConfig", "ModelConfig", "ParallelConfig", "RolloutConfig", "SamplingConfig",
           "TaskConfig", "TrainConfig", "build_config", "default_cache_dir", "default_runs_dir", "describe_fields",
           "describe_presets", "field_docs", "presets", "to_dict"]

CACHE_ENV = "JACKPOT_CACHE_DIR"
RUNS_ENV = "JACKPOT_RUNS_DIR"
# TRAIN_MODES (train.mode), RECOMPUTE_OLD (train.recompute_old) and ROLLOUT_MODEL_TRAINING (distill.rollout_model)
# are the checks' (config_checks.py), re-exported here


def default_cache_dir() -> Path:
    """$JACKPOT_CACHE_DIR, else $XDG_CACHE_HOME/jackpot, else ~/.cache/jackpot (the user cache directory)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "jackpot"


def default_runs_dir() -> Path:
    """$JACKPOT_RUNS_DIR, else ./runs (under the current directory, where a user looks for them)."""
    return Path(os.environ.get(RUNS_ENV) or "runs").expanduser()


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None
    """Hugging Face checkpoint (local directory or hub id). None: build a tiny Qwen3 model from the
    fields below and pre-train it on the task (cached on disk)."""
    hidden_size: int = 128
    """Tiny model only: hidden width."""
    num_layers: int = 3
    """Tiny model only: transformer layers."""
    num_heads: int = 4
    """Tiny model only: attention heads."""
    sft_steps: int = 600
    """Tiny model only: supervised warm-start steps (0: random initialisation)."""
    sft_lr: float = 2e-3
    """Tiny model only: supervised warm-start learning rate."""
    seed: int = 0
    """Tiny model only: initialisation and warm-start seed."""
    dtype: str = "float32"
    """Parameter dtype; the optimizer updates the parameters in it (log-softmax, ratios and losses stay in
    float32)."""
    lora_rank: int | None = None
    """Train LoRA adapters of this rank instead of every weight (needs peft: pip install 'jackpot[lora]');
    None: full fine-tuning. Checkpoints then hold the adapters (and optimizer state) only."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_rank)."""
    lora_target_modules: str = "all-linear"
    """Which linear layers get adapters: 'all-linear' (every linear layer but the output head) or a
    comma-separated list of module names, e.g. 'q_proj,v_proj'."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass (Hugging Face's gradient checkpointing):
    less memory, about one more forward of time. Results are unchanged."""
    lr: float = 3e-5
    """RL learning rate (AdamW) of this model; 3e-5 because 1e-4 erodes the tiny models' warm-started accuracy
    (docs/CONFIG.md)."""


@dataclass(frozen=True)
class TaskConfig:
    name: str = "addition"
    """Task (jackpot.tasks.TASKS); 'file' reads your data (options.path, prompt_field, answer_field, template,
    ...), 'reasoning-gym' a reasoning-gym dataset (options.dataset plus its settings)."""
    options: dict = field(default_factory=dict)
    """Keyword arguments of the task's constructor; the task's own defaults fill in the rest when the config is
    built (so config.yaml records every option a run used, e.g. the verifier), never another task's."""
    chat_template: bool | None = None
    """Wrap each prompt in the tokenizer's chat template (one user message plus the generation prompt);
    None: when the tokenizer has one (the tiny offline tokenizers have none)."""


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    """Sampling temperature of the rollout engine (the policy's log-probs use the same)."""
    top_p: float = 1.0
    """Nucleus sampling; < 1 makes p_inf sparse, so exact Z needs z='topk' or 'batch'."""
    max_new_tokens: int | None = None
    """Maximum response length; None: the task's default (arithmetic: longest answer + 3, i.e. 6 for
    2-digit addition; file and reasoning-gym tasks: 1024)."""
    topk: int = 20
    """How many top log-probs of p_inf the rollout records per position (paper: 20)."""


@dataclass(frozen=True)
class RolloutConfig:
    engine: str = "hf"
    """Rollout engine (jackpot.rollout.ENGINES); 'hf' is transformers' generate with a dynamic KV cache."""
    batch_size: int | None = None
    """Sequences each process generates at once (null: its whole share of the batch). Bounds the KV cache,
    never changes the samples (docs/CONFIG.md)."""
    async_steps: int = 0
    """Batches generated ahead, while the trainer updates (0: synchronous); a batch is then sampled by the
    weights of up to this many updates ago (rollout/staleness). docs/CONFIG.md."""
    threads: int | None = None
    """With async_steps > 0: torch threads of the generator, beside train.threads (null: 1)."""
    dtype: str | None = None
    """vllm: the dtype of the engine's copy of the weights (null: the sampling model's)."""
    max_model_len: int | None = None
    """vllm: prompt + response tokens a sequence may hold (null: the model's max_position_embeddings)."""
    kv_cache_gib: float | None = None
    """vllm on CPU: KV cache in GiB (null: $VLLM_CPU_KVCACHE_SPACE, else 1)."""
    gpu_memory_utilization: float | None = None
    """vllm on a GPU: the fraction of its memory vLLM may take (null: vLLM's default, 0.9)."""
    enforce_eager: bool = True
    """vllm: run eagerly (no graph capture or compilation: faster start, slower decoding)."""
    sleep_level: int | None = None
    """vllm on a GPU: how the engine frees the device for every update (vLLM's sleep mode): 0 never, 1 weights to
    CPU memory and KV cache dropped, 2 both dropped (pushed again after). null: 0 on CPU and with async_steps,
    else 2 when the sampling model is trained, 1 when it is frozen (jackpot/rollout/vllm.py, docs/SCALING.md)."""


@dataclass(frozen=True)
class CorrectionConfig:
    name: str = "jackpot"
    """Correction of the policy loss (jackpot.core.corrections.CORRECTIONS)."""
    lam: float = 1.0
    """Jackpot: fixed lambda (the paper's figures use 1)."""
    budget: float | None = None
    """Jackpot: solve lambda per batch for this mean acceptance (METHOD.md §4.2); None: fixed lam."""
    target: str = "old"
    """Jackpot: align p_inf to 'old' (the policy at collection, the paper's p_ref) or 'new' (the current
    policy; its correction is then recomputed per mini-batch, see jackpot/train/update.py)."""
    z: str = "exact"
    """Jackpot per-state normaliser: 'exact' (streamed over the vocabulary), 'topk' (+ kappa) or
    'batch' (the batch's mean acceptance). Ignored when budget is set."""
    c1: float | None = 2.0
    """Jackpot: clip of the OBRS weight Z * max(lam, r) (Algorithm 1's c1; None: no clip). 2: the best of a
    sweep on the offline default, and TIS's default cap (docs/CONFIG.md)."""
    c2: float | None = 5.0
    """Jackpot, target='new': clip of p_old/p_new (Algorithm 1's c2; None: no clip, eq. 5). 5: a finite bound
    at no measured cost (docs/CONFIG.md)."""
    sampled_mask: bool = True
    """Jackpot: sample Mask ~ Bernoulli(a) once per batch (paper); False: the expected-mask ablation (each
    token kept with the fraction a, so every aggregation keeps the sampled mask's scale in expectation)."""
    cap: float = 2.0
    """TIS: upper truncation of the importance weight."""
    cap_min: float | None = None
    """TIS: lower truncation of the importance weight (TRL's vllm_importance_sampling_clip_min; None: none)."""
    low: float = 0.5
    """IcePop: lower bound of the kept ratio."""
    high: float = 2.0
    """IcePop: upper bound of the kept ratio."""
    level: str = "token"
    """TIS / IcePop: whether the ratio is taken per token, per sequence or as the sequence's geometric mean."""

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments the chosen correction function accepts, taken from these fields."""
        return {k: getattr(self, k) for k in correction_params(self.name)}


@dataclass(frozen=True)
class DistillConfig:
    rollout_model: str = "joint"
    """'joint': train the rollout model on the same trajectories (PPO + distillation, eq. 8);
    'frozen': never update it."""
    coef: float = 1.0
    """Weight of the distillation loss toward the policy (0: PPO only); with target_kl, its starting value."""
    target_kl: float | None = None
    """Adapt coef every step so that the actor-policy gap measured on the batch just sampled (mismatch/kl_k3, the
    sampled-token k3 estimate of KL(p_inf || p_old)) stays near this value (METHOD.md §10). None: coef fixed."""
    coef_min: float = 0.01
    """With target_kl: the smallest coefficient the controller sets (the rollout model's PPO then dominates)."""
    coef_max: float = 100.0
    """With target_kl: the largest coefficient the controller sets (distillation then dominates)."""
    coef_rate: float = 0.1
    """With target_kl: the controller's gain; each step log(coef) (or log of the lr multiplier, control='lr')
    moves by coef_rate x log(kl / target_kl), the log-error clipped to [-1, 1]: at most a factor e^0.1 (about
    10 %) a step."""
    control: str = "coef"
    """With target_kl: what the controller moves: 'coef' (this coefficient, within coef_min..coef_max) or 'lr'
    (a multiplier on rollout_model.lr, within lr_scale_min..lr_scale_max, starting at 1; coef stays fixed).
    Under AdamW the coefficient only sets the mix of the rollout model's losses; the lr sets its step size
    (METHOD.md §10)."""
    lr_scale_min: float = 0.1
    """With target_kl and control='lr': the smallest multiplier of rollout_model.lr the controller sets."""
    lr_scale_max: float = 10.0
    """With target_kl and control='lr': the largest multiplier of rollout_model.lr the controller sets."""
    signal: str = "k3"
    """With target_kl: the gap it holds: 'k3' (mismatch/kl_k3, the mean per-token k3 of KL(p_inf || p_old)) or
    'k3-clipped' (mismatch/kl_k3_clipped: each token's k3 capped at signal_cap first, so one token cannot swing
    it; biased low, so a target for it sits below one for 'k3')."""
    signal_cap: float = 10.0
    """The cap of each token's k3 in mismatch/kl_k3_clipped (logged by every decoupled run)."""
    ppo: bool = True
    """Include the rollout model's own PPO loss L_PPO(omega)."""
    direction: str = "forward"
    """Direction of the distillation KL: 'forward' KL(SG(p_new) || p_omega) (eq. 7) or 'reverse'."""
    estimator: str = "full"
    """Estimator of the distillation KL: over the 'full' vocabulary (streamed), the recorded 'topk', or the
    'sampled' token."""
    is_cap: float = 2.0
    """Truncation of the importance weights on the rollout model's side: p_omega_old/p_inf on its PPO
    loss (METHOD.md §5; ≈ 1 when it sampled the batch itself) and the sampled distillation estimator's."""


@dataclass(frozen=True)
class TrainConfig:
    mode: str = "decoupled"
    """'decoupled': the rollout model generates; 'on-policy': the policy generates its own rollouts."""
    steps: int = 300
    """Rollout phases (each followed by `minibatches` x `ppo_epochs` optimizer steps)."""
    prompts_per_step: int = 16
    """Prompts per rollout phase."""
    group_size: int = 8
    """Responses per prompt (GRPO group)."""
    minibatches: int = 1
    """Optimizer steps per epoch over one rollout batch; > 1 is the staleness setting (rollout batch
    = minibatches x train batch, p_old fixed at collection)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    micro_batch_size: int | None = None
    """Sequences per forward/backward (gradient accumulation); None: as many as fit in micro_batch_tokens
    response tokens (the whole mini-batch for short responses). Changes memory and speed, not results."""
    micro_batch_tokens: int = 16384
    """When micro_batch_size is None: response positions per forward/backward (16,384: the whole mini-batch
    of the offline default, 2 sequences of 8,192 tokens)."""
    mixed_precision: str | None = None
    """'bf16': forward and backward under bfloat16 autocast over float32 parameters, gradients and AdamW states
    (the master weights; jackpot/train/precision.py); needs float32 models. null: the parameters' own dtype."""
    head_chunk: int = 1024
    """Response positions per chunk of every per-vocabulary computation: at most head_chunk x V logits exist
    at once. Changes memory and speed only, never a result (jackpot/core/head.py)."""
    recompute_old: str = "auto"
    """The sampling model's log-probs before the update (p_omega_old decoupled, p_old on-policy): 'always'
    recomputes them with a forward of that model in prepare; 'auto' takes the engine's recorded ones instead
    (verl's bypass mode) exactly when they are the trainer's own — an engine that declares exact processed
    log-probs, sampled synchronously (rollout.async_steps=0, train.minibatches=1) by the very weights the trainer
    holds, in float32/float64 on both sides, no nucleus (sampling.top_p=1), no mixed precision — else recomputes;
    'never' always takes them (refused where the engine cannot serve them). Exact Z reads the rollout model's
    logits anyway. Every recompute_check_every steps it recomputes regardless (jackpot/train/prepare.py)."""
    recompute_check_every: int = 50
    """With recompute_old auto|never: recompute at step 1 and every this many steps after it, logging
    mismatch/rollout_model_kl_k3 (the engine's log-probs against the trainer's): the check never goes blind."""
    clip_eps: float | None = 0.2
    """PPO clip range; None: no clip (pure importance-weighted policy gradient)."""
    clip_eps_high: float | None = None
    """Upper clip range (DAPO's clip-higher); None: same as clip_eps."""
    dual_clip: float | None = None
    """Dual-clip PPO (verl's clip_ratio_c, whose default is 3): for negative advantages the loss is capped
    at -dual_clip * A; must be > 1. None: no dual clip. Applies to the policy and the rollout model."""
    loss_agg: str = "token-mean"
    """How token losses are summed and normalised into the batch loss (jackpot.core.losses.AGGREGATIONS)."""
    advantages: str = "grpo"
    """Group-relative advantage estimator (jackpot/core/advantages.py)."""
    kl_coef: float = 0.0
    """Coefficient of a k3 KL penalty to the initial policy, weighted and masked by the correction like the PPO
    term (0: none, no reference model kept; docs/CONFIG.md)."""
    grad_clip: float | None = 1.0
    """Gradient-norm clip for both models (None: none)."""
    seed: int = 0
    """Seeds prompts, sampling and the rejection uniforms of every step."""
    eval_every: int = 50
    """Evaluate the policy every this many steps (and before and after training)."""
    eval_prompts: int = 200
    """Evaluation prompts from the task's held-out split."""
    eval_samples: int = 4
    """Samples per evaluation prompt (Mean@k / Pass@k)."""
    eval_temperature: float | None = None
    """Sampling temperature for evaluation; None: sampling.temperature, so Mean@k measures the
    distribution that RL optimises."""
    checkpoint_every: int = 50
    """Save both models every this many steps (and at the end / on Ctrl-C)."""
    device: str = "cpu"
    """Torch device, e.g. 'cpu' or 'cuda'."""
    threads: int | None = None
    """torch CPU threads. None: 1 for tiny models (a second thread costs 4-10x beside another job), else the
    CPUs this process may use (jackpot/train/threads.py, docs/CONFIG.md)."""


@dataclass(frozen=True)
class ParallelConfig:
    """How the models are spread over several processes (torchrun / accelerate launch); unused in one."""

    policy: str = "ddp"
    """'ddp': a full replica per process (DistributedDataParallel); 'fsdp': sharded (FSDP2 fully_shard,
    one unit per decoder layer)."""
    rollout_model: str = "ddp"
    """The same for the rollout model (frozen and 'ddp': a plain replica per process)."""
    mixed_precision: str | None = None
    """FSDP2 compute dtype of the sharded models' parameters (gradients reduced in float32); null: the
    parameters' own dtype."""


@dataclass(frozen=True)
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    policy: ModelConfig = field(default_factory=ModelConfig)
    rollout_model: ModelConfig = field(default_factory=lambda: ModelConfig(
        hidden_size=64, num_layers=2, num_heads=2, sft_steps=600, sft_lr=3e-3, seed=1))
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cache_dir: str = field(default_factory=lambda: str(default_cache_dir() / "models"))
    """Where pre-trained tiny models are cached (shared by every run and by `jackpot pretrain`). Default:
    $JACKPOT_CACHE_DIR/models, else $XDG_CACHE_HOME/jackpot/models, else ~/.cache/jackpot/models."""
    tensorboard: bool = True
    """Write TensorBoard event files next to metrics.jsonl."""
    wandb_project: str | None = None
    """Log to Weights & Biases under this project (needs `wandb` installed)."""

    # ---- derived: what the mode and the rollout model's training mean, named once
    @property
    def decoupled(self) -> bool:
        """A rollout model samples every trajectory (train.mode=decoupled); else the policy samples its own."""
        return self.train.mode == "decoupled"

    @property
    def trains_rollout_model(self) -> bool:
        """The rollout model exists and is updated (decoupled, distill.rollout_model=joint)."""
        return self.decoupled and self.distill.rollout_model == "joint"

    @property
    def actor_role(self) -> str:
        """The role of the model that samples the rollouts: 'rollout_model' (decoupled) or 'policy'."""
        return "rollout_model" if self.decoupled else "policy"


# ----------------------------------------------------------------------------- entry points
def build_config(config_file: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file or preset (and the preset it names) <- command-line overrides, with the task's
    defaults filled in, checked (InputError naming the field)."""
    return resolve(config_io.build(Config, config_file, overrides))


def field_docs() -> dict[str, tuple[Any, str]]:
    """'section.field' -> (default, docstring) for every field of `Config`."""
    return config_io.field_docs(Config())


def describe_fields(cfg: Config | None = None, width: int = 100) -> str:
    """Every field as `section.field = value`, its docstring and its choices, wrapped; the values of `cfg` if
    given, else the defaults."""
    return config_io.describe_fields(cfg or Config(), CHOICES, width)
