"""Configuration of a training run: frozen dataclasses, one docstring per field, the only source of truth.

A run is configured by, in order of precedence: command-line overrides `section.field=value`
(values parsed as YAML), a YAML file (`--config FILE`, may name a `preset` it extends), and the
defaults below — which are the offline default: a tiny rollout model training a ~4x larger tiny
policy on 2-digit addition with Jackpot, on CPU, in a few minutes.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from jackpot.core.corrections import CORRECTIONS, LEVELS, TARGETS, Z_MODES, correction_needs, correction_params
from jackpot.core.losses import AGGREGATIONS, KL_DIRECTIONS, KL_ESTIMATORS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"  # presets ship inside the package
CACHE_ENV = "JACKPOT_CACHE_DIR"
RUNS_ENV = "JACKPOT_RUNS_DIR"


def default_cache_dir() -> Path:
    """$JACKPOT_CACHE_DIR, else $XDG_CACHE_HOME/jackpot, else ~/.cache/jackpot (the user cache directory)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "jackpot"


def default_runs_dir() -> Path:
    """$JACKPOT_RUNS_DIR, else ./runs (under the current directory, where a user looks for them)."""
    return Path(os.environ.get(RUNS_ENV) or "runs").expanduser()
MODES = ("decoupled", "on-policy")
DTYPES = ("float32", "bfloat16", "float16")


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
    """Parameter dtype: 'float32', 'bfloat16' or 'float16' (log-softmax, ratios and losses stay in float32;
    the optimizer updates the parameters in this dtype)."""
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
    """RL learning rate (AdamW) of this model. Tiny models are fragile: AdamW at 1e-4 already erodes the
    warm-started accuracy of the offline default (measured), 3e-5 does not."""


@dataclass(frozen=True)
class TaskConfig:
    name: str = "addition"
    """Task name (jackpot.tasks.TASKS): 'addition', 'chain_sum', 'multiply', 'file' (your data: options.path,
    prompt_field, answer_field, template, ...) or 'reasoning-gym' (options.dataset plus its settings)."""
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
    """Rollout engine (jackpot.rollout.ENGINES): 'hf' (transformers' generate with a dynamic KV cache)."""
    batch_size: int | None = None
    """Sequences each process generates at once (null: its whole share of the batch). The KV cache grows
    with it — the largest part of a long-response run's memory (benchmarks/memory_plan.py); the samples do
    not depend on it (each row's draws are its own)."""


@dataclass(frozen=True)
class CorrectionConfig:
    name: str = "jackpot"
    """Correction of the policy loss: one of jackpot.core.corrections.CORRECTIONS."""
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
    """Jackpot: clip of the OBRS weight Z * max(lam, r) (Algorithm 1's c1; None: no clip). Measured on the
    offline default (docs/RESULTS.md, "Defaults"): unclipped, single weights reach 235 and the policy's
    gradient norm is ~25% larger; c1 = 2 clips 0.7% of tokens and gained the most accuracy of
    {none, 2, 5, 10} (+0.011 ± 0.004 over no clip, paired, 2 seeds). Equal to TIS's default cap."""
    c2: float | None = 5.0
    """Jackpot, target='new': clip of p_old/p_new (Algorithm 1's c2; None: no clip, eq. 5). Measured on the
    staleness preset (docs/RESULTS.md, "Defaults"): {none, 2, 5} are within noise of each other in accuracy;
    unclipped, single weights reached ~12 (c1 * p_old/p_new), with c2 = 5 at most 2.4. A finite bound at no
    measured cost."""
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
    """TIS / IcePop: 'token', 'sequence' or 'geometric'."""

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments the chosen correction function accepts, taken from these fields."""
        return {k: getattr(self, k) for k in correction_params(self.name)}


@dataclass(frozen=True)
class DistillConfig:
    rollout_model: str = "joint"
    """'joint': train the rollout model on the same trajectories (PPO + distillation, eq. 8);
    'frozen': never update it."""
    coef: float = 1.0
    """Weight of the distillation loss toward the policy (0: PPO only)."""
    ppo: bool = True
    """Include the rollout model's own PPO loss L_PPO(omega)."""
    direction: str = "forward"
    """'forward' KL(SG(p_new) || p_omega) (eq. 7) or 'reverse'."""
    estimator: str = "full"
    """'full' vocabulary (streamed), 'topk' or 'sampled'."""
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
    head_chunk: int = 1024
    """Response positions per chunk of every per-vocabulary computation (log-probs, Z, top-k, distillation
    KL): at most head_chunk x V logits exist at once, in the forward and (recomputed) in the backward.
    Changes memory and speed only, never a result (jackpot/core/head.py)."""
    clip_eps: float | None = 0.2
    """PPO clip range; None: no clip (pure importance-weighted policy gradient)."""
    clip_eps_high: float | None = None
    """Upper clip range (DAPO's clip-higher); None: same as clip_eps."""
    dual_clip: float | None = None
    """Dual-clip PPO (verl's clip_ratio_c, whose default is 3): for negative advantages the loss is capped
    at -dual_clip * A; must be > 1. None: no dual clip. Applies to the policy and the rollout model."""
    loss_agg: str = "token-mean"
    """Loss aggregation, see jackpot.core.losses.AGGREGATIONS."""
    advantages: str = "grpo"
    """'grpo', 'drgrpo' or 'rloo'."""
    kl_coef: float = 0.0
    """Coefficient of a KL penalty to the initial policy (0: none, no reference model kept): the k3 term
    (rho - 1) - log rho, rho = p_init / p_new, per token, weighted and masked by the correction like the PPO
    term; its value estimates KL(p_new || p_init) under the correction's target (see jackpot/train/update.py)."""
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
    """torch CPU threads. None: 1 for tiny models (under 5M parameters: a second thread gains ~20% on an idle
    machine and costs 4-10x beside another job), else the CPUs this process may use (affinity mask and
    cgroup quota; jackpot/train/threads.py)."""


@dataclass(frozen=True)
class ParallelConfig:
    """How the models are spread over several processes (torchrun / accelerate launch); unused in one."""

    policy: str = "ddp"
    """'ddp': a full replica per process (DistributedDataParallel); 'fsdp': sharded (FSDP2 fully_shard,
    one unit per decoder layer)."""
    rollout_model: str = "ddp"
    """The same for the rollout model (frozen and 'ddp': a plain replica per process)."""
    mixed_precision: str | None = None
    """FSDP2 compute dtype of the sharded models' parameters ('bfloat16', 'float16'; gradients reduced
    in float32); null: the parameters' own dtype."""


@dataclass(frozen=True)
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    policy: ModelConfig = field(default_factory=ModelConfig)
    rollout_model: ModelConfig = field(default_factory=lambda: ModelConfig(
        hidden_size=64, num_layers=2, num_heads=4, sft_steps=600, sft_lr=3e-3, seed=1))
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

    def validate(self) -> Config:
        """This config with the task's defaults filled in (options, max_new_tokens), checked; ValueError if bad."""
        cfg = self._with_task_defaults()
        cfg._check()
        return cfg

    def _with_task_defaults(self) -> Config:
        from jackpot.tasks import default_max_new_tokens, task_options

        if not isinstance(self.task.options, dict):
            raise ValueError(f"task.options must be a mapping, got {self.task.options!r}")
        options = task_options(self.task.name, self.task.options)
        max_new = self.sampling.max_new_tokens
        if max_new is None:
            max_new = default_max_new_tokens(self.task.name, options)
        return dataclasses.replace(self, task=dataclasses.replace(self.task, options=options),
                                   sampling=dataclasses.replace(self.sampling, max_new_tokens=max_new))

    def _check(self) -> None:
        from jackpot.rollout import ENGINES

        _check_choice("rollout.engine", self.rollout.engine, tuple(ENGINES))
        _check_choice("train.mode", self.train.mode, MODES)
        _check_choice("policy.dtype", self.policy.dtype, DTYPES)
        _check_choice("rollout_model.dtype", self.rollout_model.dtype, DTYPES)
        _check_choice("correction.name", self.correction.name, tuple(CORRECTIONS))
        _check_choice("correction.target", self.correction.target, TARGETS)
        _check_choice("correction.z", self.correction.z, Z_MODES)
        _check_choice("correction.level", self.correction.level, LEVELS)
        _check_choice("train.loss_agg", self.train.loss_agg, AGGREGATIONS)
        _check_choice("train.advantages", self.train.advantages, ("grpo", "drgrpo", "rloo"))
        _check_choice("distill.rollout_model", self.distill.rollout_model, ("joint", "frozen"))
        _check_choice("distill.direction", self.distill.direction, KL_DIRECTIONS)
        _check_choice("distill.estimator", self.distill.estimator, KL_ESTIMATORS)
        _check_choice("parallel.policy", self.parallel.policy, ("ddp", "fsdp"))
        _check_choice("parallel.rollout_model", self.parallel.rollout_model, ("ddp", "fsdp"))
        if self.parallel.mixed_precision is not None:
            _check_choice("parallel.mixed_precision", self.parallel.mixed_precision, DTYPES)
        for name in ("train.steps", "train.prompts_per_step", "train.minibatches", "train.ppo_epochs",
                     "train.eval_every", "train.eval_prompts", "train.eval_samples", "train.checkpoint_every",
                     "sampling.max_new_tokens", "sampling.topk"):
            _check_positive_int(name, _get(self, name))
        if self.train.group_size < 2:
            raise ValueError("train.group_size must be >= 2 for group-relative advantages, "
                             f"got {self.train.group_size}")
        total = self.train.prompts_per_step * self.train.group_size
        if total % self.train.minibatches:
            raise ValueError(f"train.minibatches ({self.train.minibatches}) must divide the rollout batch "
                             f"prompts_per_step x group_size = {total}")
        for name in ("sampling.temperature", "correction.lam", "correction.cap", "correction.low",
                     "correction.high", "distill.is_cap", "policy.lr", "rollout_model.lr"):
            if not _get(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {_get(self, name)!r}")
        self._validate_ranges()
        if not 0 < self.sampling.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.sampling.top_p!r}")
        if self.correction.budget is not None and not 0 < self.correction.budget <= 1:
            raise ValueError(f"correction.budget must be in (0, 1] or null, got {self.correction.budget!r}")
        needs = correction_needs(self.correction.name, **self.correction.kwargs())
        if needs.z == "exact" and self.sampling.top_p < 1:
            raise ValueError("correction.z='exact' needs sampling.top_p = 1 (the rollout model's logits then "
                             "give p_inf exactly); use correction.z='topk' or 'batch' with nucleus sampling")
        if needs.z == "exact" and needs.current_policy:
            raise ValueError("correction.z='exact' with target='new' is not supported (it needs the pre-update "
                             "rollout model at every mini-batch); use correction.z='topk' or 'batch'")


    def _validate_ranges(self) -> None:
        """Values that would otherwise fail only after pre-training, or silently train wrongly."""
        t, c = self.train, self.correction
        for name in ("train.grad_clip", "correction.c1", "correction.c2", "train.eval_temperature",
                     "train.clip_eps_high", "correction.cap_min"):
            value = _get(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or null, got {value!r}")
        if t.clip_eps is not None and not 0 < t.clip_eps < 1:
            raise ValueError(f"train.clip_eps must be in (0, 1) or null (no clip), got {t.clip_eps!r}")
        if t.clip_eps is None and t.clip_eps_high is not None:
            raise ValueError("train.clip_eps_high is set but train.clip_eps is null (no clip): set both or neither")
        if t.dual_clip is not None and not t.dual_clip > 1:
            raise ValueError(f"train.dual_clip must be > 1 or null, got {t.dual_clip!r}")
        if c.cap_min is not None and c.cap_min > c.cap:
            raise ValueError(f"correction.cap_min ({c.cap_min}) must be <= correction.cap ({c.cap})")
        if c.low > c.high:
            raise ValueError(f"correction.low ({c.low}) must be <= correction.high ({c.high})")
        _check_positive_int("train.head_chunk", t.head_chunk)
        _check_positive_int("train.micro_batch_tokens", t.micro_batch_tokens)
        for name in ("train.micro_batch_size", "rollout.batch_size", "train.threads", "policy.lora_rank",
                     "rollout_model.lora_rank"):
            if _get(self, name) is not None:
                _check_positive_int(name, _get(self, name))
        for name in ("train.kl_coef", "distill.coef"):
            if not _get(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {_get(self, name)!r}")
        if c.target != "old" and "target" not in correction_params(c.name):
            raise ValueError(f"correction.target={c.target!r}: correction {c.name!r} has no target (it always "
                             "weights toward p_old)")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


# ----------------------------------------------------------------------------- building from dicts
def _from_dict(cls: type, data: dict, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise ValueError(f"unknown config key {where + key!r}; known keys: {sorted(known)}")
        sub = hints[key]
        if is_dataclass(sub):
            kwargs[key] = _from_dict(sub, value, f"{where}{key}.")
        else:
            kwargs[key] = _coerce(where + key, sub, value)
    return cls(**kwargs)


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """YAML reads '1e-4' as a string and '2' as an int: convert where the field is a float."""
    args = set(getattr(hint, "__args__", ()) or (hint,))
    if value is None:
        if type(None) not in args:
            raise ValueError(f"{name} may not be null")
        return None
    if float in args and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if int in args and not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if bool in args and not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if str in args and not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    return value


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# fields holding free-form mappings: an update replaces them whole instead of merging into them
_LEAF_MAPPINGS = ("options",)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        nested = isinstance(v, dict) and isinstance(out.get(k), dict) and k not in _LEAF_MAPPINGS
        out[k] = _deep_merge(out[k], v) if nested else v
    return out


def presets() -> list[str]:
    """Names of the presets shipped with the package (jackpot/configs/*.yaml)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def preset_descriptions() -> dict[str, str]:
    """Preset name -> the comment block at the top of its YAML file, as one line."""
    out = {}
    for name in presets():
        lines = (CONFIG_DIR / f"{name}.yaml").read_text().splitlines()
        comment = []
        for line in lines:
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("#").strip())
        out[name] = " ".join(comment)
    return out


def field_docs() -> dict[str, tuple[Any, str]]:
    """'section.field' -> (default, docstring) for every field of `Config`, read from the attribute
    docstrings in this module's source (the single place they are written)."""
    out: dict[str, tuple[Any, str]] = {}

    def walk(obj: Any, prefix: str) -> None:
        docs = _attribute_docstrings(type(obj))
        for f in fields(obj):
            value = getattr(obj, f.name)
            if is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out[prefix + f.name] = (value, " ".join(docs.get(f.name, "").split()))

    walk(Config(), "")
    return out


def _attribute_docstrings(cls: type) -> dict[str, str]:
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def describe_fields(cfg: Config | None = None, width: int = 100) -> str:
    """Every field as `section.field = value` and its docstring, wrapped; the values of `cfg` if given, else
    the defaults."""
    import textwrap

    values = {k: v for k, (v, _) in field_docs().items()}
    if cfg is not None:
        values.update(_flat(to_dict(cfg)))
    lines = []
    for name, (_, doc) in field_docs().items():
        lines.append(f"  {name} = {_yaml_scalar(values[name])}")
        lines.extend(textwrap.wrap(doc, width=width, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and k not in _LEAF_MAPPINGS:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def describe_presets(width: int = 100) -> str:
    """Every preset by name with its description, wrapped."""
    import textwrap

    lines = []
    for name, text in preset_descriptions().items():
        lines.extend(textwrap.wrap(text, width=width, initial_indent=f"  {name:<20s}", subsequent_indent=" " * 22))
    return "\n".join(lines)


def preset_path(name: str | Path) -> Path:
    """A preset name ('tis-reverse-kl') or a path to a YAML file -> the file; a clear error otherwise."""
    path = Path(name)
    if path.is_file():
        return path
    if path.suffix not in (".yaml", ".yml") and (CONFIG_DIR / f"{name}.yaml").is_file():  # "qwen3-1.7b-to-8b"
        return CONFIG_DIR / f"{name}.yaml"
    raise FileNotFoundError(f"config file not found: {path} (not a file, and not a preset; presets: "
                            f"{', '.join(presets())})")


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config (a file or a preset name); `preset: NAME` in it is merged underneath it."""
    path = preset_path(path)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    preset = data.pop("preset", None)
    if preset is not None:
        base = Path(preset)
        relative = path.parent / base
        data = _deep_merge(load_yaml(relative if base.suffix and not base.is_absolute() and relative.is_file()
                                     else preset), data)
    return data


def parse_overrides(items: list[str]) -> dict:
    """['train.steps=5', 'correction.name=tis'] -> nested dict, values parsed as YAML scalars."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw) if raw != "" else None
    return out


def build_config(config_file: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (and its preset) <- command-line overrides, validated."""
    data = load_yaml(config_file) if config_file else {}
    data = _deep_merge(_deep_merge(to_dict(Config()), data), parse_overrides(overrides or []))
    return _from_dict(Config, data, "").validate()
