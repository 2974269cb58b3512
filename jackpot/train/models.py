"""The models of a run, ready to train: loaded (or pre-trained and cached), prepared, distributed, optimized.

`prepared_model` makes a loaded model what the trainer needs: dropout off for good (as TRL and verl: every
dropout probability 0, so the train mode that Hugging Face's gradient checkpointing needs changes nothing),
LoRA adapters (peft, initialised from the model's seed) when `lora_rank` is set, gradient checkpointing when
asked, eval mode. `build_models` does it for the policy, the frozen KL reference (train.kl_coef > 0) and, in
decoupled mode, the rollout model, wraps each for the processes of the run (DDP / FSDP2, `distributed.wrap`)
and makes their AdamW optimizers (after wrapping: FSDP2 shards in place).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from jackpot.models.loading import load_model, load_tokenizer
from jackpot.models.tokenizer import check_same_tokenizer
from jackpot.train.config import Config, ModelConfig
from jackpot.train.distributed import Collective, wrap
from jackpot.train.precision import adamw
from jackpot.train.pretrain import TinyModelSpec, pretrained_model


@dataclass
class Models:
    """A run's models: each as loaded, its DDP / FSDP2 wrapper (None in one process) and its optimizer."""

    tokenizer: object
    policy: torch.nn.Module
    rollout_model: torch.nn.Module | None      # None in on-policy mode
    init_policy: torch.nn.Module | None         # frozen copy for the KL penalty (kl_coef > 0)
    policy_opt: torch.optim.Optimizer
    rollout_opt: torch.optim.Optimizer | None
    policy_wrapper: torch.nn.Module | None = None   # the policy wrapped by DDP / FSDP2 (several processes)
    rollout_wrapper: torch.nn.Module | None = None  # the same for the rollout model


def model_dir(role: str, mc: ModelConfig, cfg: Config, progress: bool) -> str:
    """The directory of the model `mc` names: its `path`, else the tiny model pre-trained for the task (cached)."""
    if mc.path is not None:
        return mc.path
    spec = TinyModelSpec(name=role, task=cfg.task.name, task_kwargs=dict(cfg.task.options),
                         hidden=mc.hidden_size, layers=mc.num_layers, heads=mc.num_heads,
                         steps=mc.sft_steps, lr=mc.sft_lr, seed=mc.seed)
    return str(pretrained_model(spec, Path(cfg.cache_dir).expanduser(), progress=progress))


def prepared_model(model: torch.nn.Module, mc: ModelConfig) -> torch.nn.Module:
    """`model` with dropout off, LoRA and gradient checkpointing as `mc` asks, in eval mode (module docstring)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    if mc.lora_rank is not None:
        model = _with_lora(model, mc)
    if mc.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.20's name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.eval()


def _with_lora(model: torch.nn.Module, mc: ModelConfig) -> torch.nn.Module:
    """Wrap `model` with LoRA adapters (peft), initialised from `mc.seed`; only the adapters are trained."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("lora_rank is set but peft is not installed: pip install 'jackpot[lora]'") from None
    targets = mc.lora_target_modules if mc.lora_target_modules == "all-linear" else \
        [t.strip() for t in mc.lora_target_modules.split(",") if t.strip()]
    config = LoraConfig(r=mc.lora_rank, lora_alpha=mc.lora_alpha, lora_dropout=0.0, target_modules=targets,
                        task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):  # the adapters' initialisation depends on the seed alone
        torch.manual_seed(mc.seed)
        return get_peft_model(model, config)


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def main_first(coll: Collective, make):
    """Run `make` on rank 0 first (it may pre-train and cache a model), then on the others (cache hit)."""
    if not coll.is_main:
        coll.barrier()
    value = make()
    if coll.is_main:
        coll.barrier()
    return value


def build_models(cfg: Config, coll: Collective, progress: bool) -> Models:
    """Load (or pre-train) the run's models on this rank's device, prepare, distribute and optimize them."""
    device = coll.device(cfg.train.device)
    policy_dir = main_first(coll, lambda: model_dir("policy", cfg.policy, cfg, progress and coll.is_main))
    tokenizer = load_tokenizer(policy_dir)
    policy = prepared_model(load_model(policy_dir, dtype=cfg.policy.dtype, device=device), cfg.policy)
    init_policy = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.train.kl_coef > 0 else None
    mp = cfg.parallel.mixed_precision
    if init_policy is not None:  # the KL reference is distributed like the policy (sharded with it)
        init_policy = wrap(init_policy, cfg.parallel.policy, coll, trainable=False, mixed_precision=mp)
    policy_train = wrap(policy, cfg.parallel.policy, coll, trainable=True, mixed_precision=mp)
    rollout_model = rollout_train = rollout_opt = None
    if cfg.decoupled:
        rollout_dir = main_first(coll, lambda: model_dir("rollout", cfg.rollout_model, cfg, progress and coll.is_main))
        check_same_tokenizer(load_tokenizer(rollout_dir), tokenizer, names=("rollout_model", "policy"))
        rollout_model = prepared_model(load_model(rollout_dir, dtype=cfg.rollout_model.dtype, device=device),
                                       cfg.rollout_model)
        rollout_train = wrap(rollout_model, cfg.parallel.rollout_model, coll, trainable=cfg.trains_rollout_model,
                             mixed_precision=mp)
        rollout_opt = adamw(_trainable(rollout_model), cfg.rollout_model.lr)
    policy_opt = adamw(_trainable(policy), cfg.policy.lr)  # after wrap: FSDP2 shards in place
    return Models(tokenizer, policy, rollout_model, init_policy, policy_opt, rollout_opt,
                  policy_wrapper=policy_train if policy_train is not policy else None,
                  rollout_wrapper=rollout_train if rollout_train is not rollout_model else None)
