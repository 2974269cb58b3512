"""Every config field the trainer reads changes what a training step does when it is overridden.

A step's fingerprint is both models' parameters after one `train_step` plus the logged metrics and an
evaluation (perf/ timings aside). For each field, an override (in a context where it can act: the PPO
clip, for instance, binds only after the first optimizer step on a batch) must change the fingerprint.
Every field of `Config` is listed here, either with its override or with the reason it is tested
elsewhere — a new field without an entry fails `test_every_field_is_covered`.
"""

from __future__ import annotations

import dataclasses
import zlib

import pytest
from cli_helpers import TINY_MODELS

from jackpot.train.config import Config, build_config
from jackpot.train.loop import evaluate_all, setup, train_step

TINY = [
    *TINY_MODELS, "train.prompts_per_step=2", "train.group_size=4", "train.eval_prompts=4",
    "train.eval_samples=2", "tensorboard=false", "policy.lr=1e-2", "rollout_model.lr=1e-2",
]
EPOCHS = ("train.ppo_epochs=2",)  # a second pass over the batch: the policy has moved, ratios != 1

# field -> (override, context the baseline shares)
OVERRIDES: dict[str, tuple[str, tuple[str, ...]]] = {
    "task.name": ("task.name=multiply", ()),
    "task.options": ("task.options={digits: 1}", ()),
    "sampling.temperature": ("sampling.temperature=0.7", ()),
    "sampling.top_p": ("sampling.top_p=0.8", ("correction.z=topk",)),
    "sampling.max_new_tokens": ("sampling.max_new_tokens=2", ()),
    "sampling.topk": ("sampling.topk=2", ("correction.z=topk",)),
    "correction.name": ("correction.name=tis", ()),
    "correction.lam": ("correction.lam=0.5", ()),
    "correction.budget": ("correction.budget=0.8", ()),
    "correction.target": ("correction.target=new", ("correction.z=topk", *EPOCHS)),
    "correction.z": ("correction.z=topk", ()),
    "correction.c1": ("correction.c1=0.6", ()),
    "correction.c2": ("correction.c2=0.9", ("correction.target=new", "correction.z=topk", *EPOCHS)),
    "correction.sampled_mask": ("correction.sampled_mask=false", ()),
    "correction.cap": ("correction.cap=1.01", ("correction.name=tis",)),
    "correction.cap_min": ("correction.cap_min=0.99", ("correction.name=tis",)),
    "correction.low": ("correction.low=0.95", ("correction.name=icepop",)),
    "correction.high": ("correction.high=1.05", ("correction.name=icepop",)),
    "correction.level": ("correction.level=sequence", ("correction.name=tis",)),
    "distill.rollout_model": ("distill.rollout_model=frozen", ()),
    "distill.coef": ("distill.coef=0.3", ()),
    "distill.ppo": ("distill.ppo=false", ()),
    "distill.direction": ("distill.direction=reverse", ()),
    "distill.estimator": ("distill.estimator=topk", ()),
    "distill.is_cap": ("distill.is_cap=0.5", ("distill.estimator=sampled",)),
    "distill.target_kl": ("distill.target_kl=1e-4", ()),
    "distill.coef_min": ("distill.coef_min=0.99", ("distill.target_kl=100",)),
    "distill.coef_max": ("distill.coef_max=1.01", ("distill.target_kl=1e-4",)),
    "distill.coef_rate": ("distill.coef_rate=0.5", ("distill.target_kl=1e-4",)),
    "distill.control": ("distill.control=lr", ("distill.target_kl=1e-4",)),
    "distill.lr_scale_min": ("distill.lr_scale_min=0.99", ("distill.target_kl=100", "distill.control=lr")),
    "distill.lr_scale_max": ("distill.lr_scale_max=1.01", ("distill.target_kl=1e-4", "distill.control=lr")),
    "distill.signal": ("distill.signal=k3-clipped", ("distill.target_kl=0.01", "distill.signal_cap=0.001")),
    "distill.signal_cap": ("distill.signal_cap=0.001", ("distill.target_kl=0.01", "distill.signal=k3-clipped")),
    "train.mode": ("train.mode=on-policy", ()),
    "train.prompts_per_step": ("train.prompts_per_step=3", ()),
    "train.group_size": ("train.group_size=2", ()),
    "train.minibatches": ("train.minibatches=2", ()),
    "train.ppo_epochs": ("train.ppo_epochs=2", ()),
    "train.clip_eps": ("train.clip_eps=0.01", EPOCHS),
    "train.clip_eps_high": ("train.clip_eps_high=0.01", ("train.clip_eps=0.5", *EPOCHS)),
    "train.dual_clip": ("train.dual_clip=1.001", ("train.clip_eps=null", *EPOCHS)),
    "train.loss_agg": ("train.loss_agg=seq-mean-token-mean", ()),
    "train.advantages": ("train.advantages=rloo", ()),
    "train.kl_coef": ("train.kl_coef=0.5", EPOCHS),
    "train.grad_clip": ("train.grad_clip=1e-4", ()),
    "train.seed": ("train.seed=7", ()),
    "train.eval_prompts": ("train.eval_prompts=3", ()),
    "train.eval_samples": ("train.eval_samples=3", ()),
    "train.eval_temperature": ("train.eval_temperature=0.3", ()),
    "train.mixed_precision": ("train.mixed_precision=bf16", ()),
}
for role in ("policy", "rollout_model"):
    OVERRIDES.update({
        f"{role}.hidden_size": (f"{role}.hidden_size=24", ()),
        f"{role}.num_layers": (f"{role}.num_layers=3", ()),
        f"{role}.num_heads": (f"{role}.num_heads=4", ()),
        f"{role}.sft_steps": (f"{role}.sft_steps=4", ()),
        f"{role}.sft_lr": (f"{role}.sft_lr=1e-2", ()),
        f"{role}.seed": (f"{role}.seed=9", ()),
        f"{role}.lr": (f"{role}.lr=1e-3", ()),
        f"{role}.dtype": (f"{role}.dtype=bfloat16", ()),
        f"{role}.lora_rank": (f"{role}.lora_rank=4", ()),
        f"{role}.lora_alpha": (f"{role}.lora_alpha=64", (f"{role}.lora_rank=4",)),
        f"{role}.lora_target_modules": (f"{role}.lora_target_modules=q_proj", (f"{role}.lora_rank=4",)),
    })

ELSEWHERE = {
    "policy.path": "loading a checkpoint: test_train (mismatched tokenizers), test_models",
    "rollout_model.path": "loading a checkpoint: test_train (mismatched tokenizers), test_models",
    "train.steps": "the loop's length: test_train (CLI run, resume)",
    "train.eval_every": "when the loop evaluates: test_train (CLI run)",
    "train.checkpoint_every": "when the loop saves: test_train (Ctrl-C, resume)",
    "train.micro_batch_size": "designed to change nothing: test_train_wiring (micro-batched step == hand formula)",
    "train.micro_batch_tokens": "designed to change nothing: test_train_wiring (micro-batched step == hand formula)",
    "train.recompute_old": "designed to change numerics only: tests/train/test_recorded_old.py (recorded == "
                           "recomputed where claimed, recomputed where it must)",
    "train.recompute_check_every": "tests/train/test_recorded_old.py (the check steps recompute and log the metric)",
    "train.head_chunk": "designed to change nothing: test_core_head (every chunk size equals the full computation)",
    "policy.gradient_checkpointing": "designed to change nothing: test_train_wiring (same step, layers recomputed)",
    "rollout_model.gradient_checkpointing": "designed to change nothing: test_train_wiring (same step, recomputed)",
    "train.device": "one device on CI; the same code path with another torch device",
    "train.threads": "torch's CPU thread count: by design changes no result",
    "cache_dir": "where pre-trained tiny models are cached: test_models",
    "tensorboard": "logging only: test_config_and_plot (metric logger)",
    "wandb_project": "logging only: test_config_and_plot (W&B logger)",
    "rollout.batch_size": "designed to change nothing: test_train (generation in chunks equals all at once)",
    "parallel.policy": "several processes only: test_distributed (DDP and FSDP2 against one process)",
    "parallel.rollout_model": "several processes only: test_distributed (DDP and FSDP2 against one process)",
    "parallel.mixed_precision": "several processes only (FSDP2): test_distributed",
    "task.chat_template": "the tiny tokenizers have no chat template: test_rollout (encode_prompts with one)",
    "rollout.engine": "engines sample the same distribution: test_rollout (each engine's log-probs, sync_weights)",
    "rollout.async_steps": "the first step samples with the initial weights either way: tests/train/test_async.py",
    "rollout.threads": "the generator's torch threads: by design changes no result",
    "rollout.sleep_level": "vLLM's sleep mode, CUDA only: tests/rollout/test_vllm_colocate.py (the order of calls)",
    **{f"rollout.{name}": "a vLLM engine option: tests/rollout/test_vllm_engine.py (options reach vllm.LLM)"
       for name in ("dtype", "max_model_len", "kv_cache_gib", "gpu_memory_utilization", "enforce_eager")},
}


def _fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            yield from _fields(type(sub), f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_every_field_is_covered():
    names = set(_fields(Config))
    assert names - set(OVERRIDES) - set(ELSEWHERE) == set(), "add the new field to OVERRIDES or ELSEWHERE"
    assert set(OVERRIDES) & set(ELSEWHERE) == set()
    assert set(OVERRIDES) | set(ELSEWHERE) <= names, "entries for fields that no longer exist"


@pytest.fixture(scope="module")
def fingerprint(tmp_path_factory, cache):
    runs = tmp_path_factory.mktemp("runs")
    memo: dict[tuple, int] = {}

    def reward(example, completion: str) -> float:  # deterministic and varied, so advantages are not 0
        return float(zlib.crc32(completion.encode()) % 3) / 2

    def compute(overrides: tuple[str, ...]) -> int:
        if overrides not in memo:
            cfg = build_config(None, [*TINY, f"cache_dir={cache}", *overrides])
            run = setup(cfg, runs / str(len(memo)))
            object.__setattr__(run.task, "reward", reward)  # tasks are frozen dataclasses
            values = {**train_step(run, 1), **evaluate_all(run, 1)}
            run.logger.close()
            logged = sorted((k, round(v, 12)) for k, v in values.items() if not k.startswith("perf/"))
            params = [p.detach().double().sum().item() for m in run.models.values() for p in m.parameters()]
            memo[overrides] = hash((tuple(logged), tuple(round(p, 12) for p in params)))
        return memo[overrides]

    return compute


def test_a_step_is_deterministic(fingerprint):
    """Guards the test below: the same config, set up afresh (train.threads=1 is what the tests run with
    anyway, and makes the memo key distinct), gives the same fingerprint."""
    assert fingerprint(("train.seed=3", "train.threads=1")) == fingerprint(("train.seed=3",))


@pytest.mark.parametrize("field", sorted(OVERRIDES))
def test_overriding_the_field_changes_the_step(fingerprint, field):
    override, context = OVERRIDES[field]
    assert fingerprint((*context, override)) != fingerprint(context), f"{override} changed nothing"
