"""Checks of a built config, run before anything is loaded or pre-trained.

`resolve(cfg)` fills in the task's defaults (its options, the response length) and checks the result:
choices (each list read from the registry that owns it, `CHOICES`), ranges, and the rules between fields.
Every failure is an InputError (a ValueError) that names the field, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from jackpot.core.advantages import ADVANTAGE_MODES
from jackpot.core.control import ACTUATORS, SIGNALS
from jackpot.core.corrections import CORRECTIONS, LEVELS, TARGETS, Z_MODES, correction_needs, correction_params
from jackpot.core.dtypes import DTYPES
from jackpot.core.losses import AGGREGATIONS, KL_DIRECTIONS, KL_ESTIMATORS
from jackpot.errors import InputError
from jackpot.rollout import ENGINE_SPECS, engine_spec
from jackpot.rollout import engine_options as _engine_options
from jackpot.tasks import TASKS, default_max_new_tokens, task_options
from jackpot.train.distributed import PARALLEL_MODES
from jackpot.train.precision import MIXED_PRECISIONS

if TYPE_CHECKING:  # the schema imports these checks; they read it through the config object alone
    from jackpot.train.config import Config

TRAIN_MODES = ("decoupled", "on-policy")  # train.mode
RECOMPUTE_OLD = ("auto", "always", "never")  # train.recompute_old (jackpot.train.prepare.recorded_logprobs_serve)
ROLLOUT_MODEL_TRAINING = ("joint", "frozen")  # distill.rollout_model

# field -> its valid values, from the owner of each list (`jackpot config` shows them beside the docstrings)
CHOICES: dict[str, tuple] = {
    "task.name": tuple(TASKS),
    "rollout.engine": tuple(ENGINE_SPECS),
    "train.mode": TRAIN_MODES,
    "policy.dtype": tuple(DTYPES),
    "rollout_model.dtype": tuple(DTYPES),
    "correction.name": tuple(CORRECTIONS),
    "correction.target": TARGETS,
    "correction.z": Z_MODES,
    "correction.level": LEVELS,
    "train.loss_agg": AGGREGATIONS,
    "train.recompute_old": RECOMPUTE_OLD,
    "train.advantages": ADVANTAGE_MODES,
    "distill.rollout_model": ROLLOUT_MODEL_TRAINING,
    "distill.direction": KL_DIRECTIONS,
    "distill.estimator": KL_ESTIMATORS,
    "distill.control": ACTUATORS,
    "distill.signal": SIGNALS,
    "parallel.policy": PARALLEL_MODES,
    "parallel.rollout_model": PARALLEL_MODES,
    "parallel.mixed_precision": tuple(DTYPES),  # or null
    "rollout.dtype": tuple(DTYPES),  # or null
    "train.mixed_precision": tuple(MIXED_PRECISIONS),  # or null
}
POSITIVE_INTS = ("train.steps", "train.prompts_per_step", "train.minibatches", "train.ppo_epochs",
                 "train.eval_every", "train.eval_prompts", "train.eval_samples", "train.checkpoint_every",
                 "sampling.max_new_tokens", "sampling.topk", "train.head_chunk", "train.micro_batch_tokens",
                 "train.recompute_check_every")
POSITIVE_INTS_OR_NULL = ("train.micro_batch_size", "rollout.batch_size", "train.threads", "policy.lora_rank",
                         "rollout_model.lora_rank", "rollout.max_model_len", "rollout.threads")
POSITIVE = ("sampling.temperature", "correction.lam", "correction.cap", "correction.low", "correction.high",
            "distill.is_cap", "policy.lr", "rollout_model.lr", "distill.coef_min", "distill.coef_max",
            "distill.coef_rate", "distill.lr_scale_min", "distill.lr_scale_max", "distill.signal_cap")
POSITIVE_OR_NULL = ("train.grad_clip", "correction.c1", "correction.c2", "train.eval_temperature",
                    "train.clip_eps_high", "correction.cap_min", "rollout.kv_cache_gib",
                    "rollout.gpu_memory_utilization", "distill.target_kl")
NON_NEGATIVE = ("train.kl_coef", "distill.coef")


def resolve(cfg: Config) -> Config:
    """`cfg` with the task's defaults filled in (options, max_new_tokens), checked; InputError if bad."""
    check_choice("task.name", cfg.task.name, CHOICES["task.name"])
    if not isinstance(cfg.task.options, dict):
        raise InputError(f"task.options must be a mapping, got {cfg.task.options!r}")
    options = task_options(cfg.task.name, cfg.task.options)
    max_new = cfg.sampling.max_new_tokens
    if max_new is None:
        max_new = default_max_new_tokens(cfg.task.name, options)
    cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, options=options),
                              sampling=dataclasses.replace(cfg.sampling, max_new_tokens=max_new))
    check(cfg)
    return cfg


def check(cfg: Config) -> None:
    """InputError naming the field if any value of `cfg` is out of its choices or range."""
    for name, choices in CHOICES.items():
        if get(cfg, name) is not None:  # null only gets here where the field's type allows it
            check_choice(name, get(cfg, name), choices)
    _check_ranges(cfg)
    _check_rules(cfg)


def _check_ranges(cfg: Config) -> None:
    """Values that would otherwise fail only after pre-training, or silently train wrongly."""
    for name in POSITIVE_INTS:
        _check_positive_int(name, get(cfg, name))
    for name in POSITIVE_INTS_OR_NULL:
        if get(cfg, name) is not None:
            _check_positive_int(name, get(cfg, name))
    for name in POSITIVE:
        if not get(cfg, name) > 0:
            raise InputError(f"{name} must be > 0, got {get(cfg, name)!r}")
    for name in POSITIVE_OR_NULL:
        if get(cfg, name) is not None and not get(cfg, name) > 0:
            raise InputError(f"{name} must be > 0 or null, got {get(cfg, name)!r}")
    for name in NON_NEGATIVE:
        if not get(cfg, name) >= 0:
            raise InputError(f"{name} must be >= 0, got {get(cfg, name)!r}")
    t, c = cfg.train, cfg.correction
    if t.group_size < 2:
        raise InputError(f"train.group_size must be >= 2 for group-relative advantages, got {t.group_size}")
    if not 0 < cfg.sampling.top_p <= 1:
        raise InputError(f"sampling.top_p must be in (0, 1], got {cfg.sampling.top_p!r}")
    if c.budget is not None and not 0 < c.budget <= 1:
        raise InputError(f"correction.budget must be in (0, 1] or null, got {c.budget!r}")
    if t.clip_eps is not None and not 0 < t.clip_eps < 1:
        raise InputError(f"train.clip_eps must be in (0, 1) or null (no clip), got {t.clip_eps!r}")
    if t.dual_clip is not None and not t.dual_clip > 1:
        raise InputError(f"train.dual_clip must be > 1 or null, got {t.dual_clip!r}")


def _check_rules(cfg: Config) -> None:
    """Fields that constrain each other."""
    t, c = cfg.train, cfg.correction
    total = t.prompts_per_step * t.group_size
    if total % t.minibatches:
        raise InputError(f"train.minibatches ({t.minibatches}) must divide the rollout batch "
                         f"prompts_per_step x group_size = {total}")
    if t.clip_eps is None and t.clip_eps_high is not None:
        raise InputError("train.clip_eps_high is set but train.clip_eps is null (no clip): set both or neither")
    if c.cap_min is not None and c.cap_min > c.cap:
        raise InputError(f"correction.cap_min ({c.cap_min}) must be <= correction.cap ({c.cap})")
    if c.low > c.high:
        raise InputError(f"correction.low ({c.low}) must be <= correction.high ({c.high})")
    if c.target != "old" and "target" not in correction_params(c.name):
        raise InputError(f"correction.target={c.target!r}: correction {c.name!r} has no target (it always "
                         "weights toward p_old)")
    _check_rollout(cfg)
    _check_mixed_precision(cfg)
    if cfg.distill.target_kl is not None:
        _check_kl_control(cfg)
    needs = correction_needs(c.name, **c.kwargs())
    if needs.z == "exact" and cfg.sampling.top_p < 1:
        raise InputError("correction.z='exact' needs sampling.top_p = 1 (the rollout model's logits then "
                         "give p_inf exactly); use correction.z='topk' or 'batch' with nucleus sampling")
    if t.recompute_old == "never" and cfg.sampling.top_p < 1:
        raise InputError("train.recompute_old=never needs sampling.top_p = 1: with nucleus sampling the engine "
                         "records log-probs renormalised over the nucleus, not the sampling model's p_old")
    if needs.z == "exact" and needs.current_policy:
        raise InputError("correction.z='exact' with target='new' is not supported (it needs the pre-update "
                         "rollout model at every mini-batch); use correction.z='topk' or 'batch'")


def _check_rollout(cfg: Config) -> None:
    """The rollout.* options: each set away from its default must be one the engine takes (its spec's `options`);
    asynchronous generation; a model whose weights are pushed to an engine's own copy cannot be LoRA + FSDP2."""
    r = cfg.rollout
    spec, options = engine_spec(r.engine), {name for s in ENGINE_SPECS.values() for name in s.options}
    for f in dataclasses.fields(r):
        if f.name in options and f.name not in spec.options and getattr(r, f.name) != f.default:
            owners = "|".join(name for name, s in ENGINE_SPECS.items() if f.name in s.options)
            raise InputError(f"rollout.{f.name}={getattr(r, f.name)!r}: rollout.engine={r.engine} has no such option "
                             f"(an option of rollout.engine={owners})")
    if not isinstance(r.async_steps, int) or isinstance(r.async_steps, bool) or r.async_steps < 0:
        raise InputError(f"rollout.async_steps must be an integer >= 0, got {r.async_steps!r}")
    if r.threads is not None and r.async_steps == 0:
        raise InputError("rollout.threads sets the threads of the asynchronous generator: it needs "
                         "rollout.async_steps > 0")
    if r.gpu_memory_utilization is not None and r.gpu_memory_utilization > 1:
        raise InputError(f"rollout.gpu_memory_utilization must be in (0, 1], got {r.gpu_memory_utilization}")
    if r.sleep_level is not None:
        from jackpot.rollout.vllm import check_sleep_level  # no vLLM import: that module imports it on use only

        check_sleep_level(r.sleep_level, on_cpu=cfg.train.device == "cpu")
        if r.sleep_level and r.async_steps:
            raise InputError(f"rollout.sleep_level={r.sleep_level} with rollout.async_steps={r.async_steps}: the "
                             "engine generates while the trainer updates, so it cannot sleep; use sleep_level=0")
    # weights pushed as checkpoint tensors (jackpot.rollout.weights): an engine holding its own copy (sampling and
    # evaluation, both models) and the asynchronous generator's copy (the sampling model); LoRA is merged on a
    # deep copy, which an FSDP2 module does not allow
    pushed = ["policy", "rollout_model"] if spec.holds_weights else [cfg.actor_role] if r.async_steps else []
    for role in pushed:
        if getattr(cfg, role).lora_rank is not None and getattr(cfg.parallel, role) == "fsdp":
            raise InputError(f"{role}.lora_rank with parallel.{role}=fsdp cannot push its weights to "
                             f"{f'rollout.engine={r.engine}' if spec.holds_weights else 'the asynchronous generator'} "
                             "(LoRA adapters of an FSDP2 model are not merged); use parallel.*=ddp")


def engine_options(cfg: Config) -> dict[str, Any]:
    """The keyword arguments `make_engine` gets from a run's config: `jackpot.rollout.engine_options` of its
    rollout section and sampling.topk, and for an engine that sleeps rollout.sleep_level's run-dependent default
    (`default_sleep_level`) when it is null."""
    options = _engine_options(cfg.rollout, cfg.sampling.topk)
    if "sleep_level" in engine_spec(cfg.rollout.engine).options:
        options.setdefault("sleep_level", default_sleep_level(cfg))
    return options


def default_sleep_level(cfg: Config) -> int:
    """rollout.sleep_level when null: 0 on CPU or with asynchronous generation (the engine never idles during an
    update); on a GPU 2 when the sampling model is trained (its weights are replaced after every update anyway,
    as TRL does), 1 when it is frozen (its weights wait in CPU memory instead of being pushed again, verl's
    default level)."""
    if cfg.train.device == "cpu" or cfg.rollout.async_steps:
        return 0
    return 2 if not cfg.decoupled or cfg.trains_rollout_model else 1


def _check_mixed_precision(cfg: Config) -> None:
    """train.mixed_precision autocasts over float32 master weights: the trained models must be float32, and
    FSDP2's own mixed precision (parallel.mixed_precision) is the other way of doing it, not both."""
    if cfg.train.mixed_precision is None:
        return
    for role in ["policy"] + (["rollout_model"] if cfg.trains_rollout_model else []):
        if getattr(cfg, role).dtype != "float32":
            raise InputError(f"train.mixed_precision={cfg.train.mixed_precision} keeps float32 master weights: "
                             f"{role}.dtype must be float32, got {getattr(cfg, role).dtype}")
    if cfg.parallel.mixed_precision is not None:
        raise InputError(f"train.mixed_precision={cfg.train.mixed_precision} and parallel.mixed_precision="
                         f"{cfg.parallel.mixed_precision}: choose one (the latter is FSDP2's, under torchrun)")


def _check_kl_control(cfg: Config) -> None:
    """distill.target_kl adapts the coefficient (or the learning rate) of a rollout model that is trained, within
    its bounds."""
    d = cfg.distill
    if not cfg.trains_rollout_model:
        raise InputError(f"distill.target_kl={d.target_kl} needs a rollout model that is trained (train.mode="
                         f"decoupled, distill.rollout_model=joint), got train.mode={cfg.train.mode}, "
                         f"distill.rollout_model={d.rollout_model}")
    if d.control == "lr" and not d.lr_scale_min <= 1 <= d.lr_scale_max:
        raise InputError(f"distill.control='lr' starts the multiplier of rollout_model.lr at 1, which must lie in "
                         f"[distill.lr_scale_min, distill.lr_scale_max] = [{d.lr_scale_min}, {d.lr_scale_max}]")
    if d.control == "coef" and not d.coef_min <= d.coef <= d.coef_max:
        raise InputError(f"distill.coef ({d.coef}), the controller's starting value, must lie in [distill.coef_min, "
                         f"distill.coef_max] = [{d.coef_min}, {d.coef_max}] when distill.target_kl is set")


def check_training_models(cfg: Config) -> None:
    """What `jackpot train` will build, checked before any model is built or pre-trained: a tiny model's shape the
    engine cannot serve (e.g. a head dimension vLLM's CPU attention lacks; a checkpoint's is checked when the
    engine is built). Both models generate (training and evaluation). Then the engine's backend is imported:
    missing, it is one line now, not after minutes of pre-training."""
    spec = engine_spec(cfg.rollout.engine)
    if spec.check_head_dim is not None:
        for name in ["policy"] + (["rollout_model"] if cfg.decoupled else []):
            m = getattr(cfg, name)
            if m.path is None:
                spec.check_head_dim(m.hidden_size // m.num_heads, f"{name} ({name}.hidden_size={m.hidden_size}, "
                                    f"{name}.num_heads={m.num_heads})", cfg.train.device == "cpu")
    if spec.check_available is not None:
        spec.check_available()


def get(cfg: Any, dotted: str) -> Any:
    """The value of field 'section.field' of `cfg`."""
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


RENAMED = {"correction.target": {"ref": "old"}}  # renamed values an older run's config.yaml may hold


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        new = RENAMED.get(name, {}).get(value) if isinstance(value, str) else None
        hint = f" ({value!r} is now {new!r})" if new else ""
        raise InputError(f"{name} must be one of {list(choices)}, got {value!r}{hint}")


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
