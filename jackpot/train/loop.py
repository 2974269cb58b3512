"""The training loop: rollout -> score -> prepare -> update -> evaluate -> log -> checkpoint.

Decoupled mode (the paper's setting): the rollout model samples every trajectory, the policy learns
from them through a correction (Jackpot by default), and the rollout model is trained on the same
trajectories (PPO + distillation toward the policy, eq. 8) unless frozen. On-policy mode: the policy
samples its own rollouts (the ideal the decoupled run is compared with). Every random draw of a step
is seeded from (seed, step), so a resumed run continues exactly as an uninterrupted one would.

Under a launcher (`torchrun --nproc_per_node N -m jackpot train ...`, `accelerate launch -m jackpot
train ...`) every process runs this loop on its block of the global batch: prompts are drawn by global
index from (seed, step) and split by rank in whole groups, each row's sampling and rejection uniforms
come from its global index, and every batch statistic is reduced through jackpot.train.distributed —
so the run is the one a single process would make. Rank 0 alone writes metrics, config and summaries;
checkpoints are sharded (torch.distributed.checkpoint) and renamed into place by rank 0.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from jackpot.errors import InputError
from jackpot.eval import sample_and_score
from jackpot.metric_names import (
    ACCURACY,
    ACCURACY_SE,
    EVAL,
    EVAL_ACCURACY,
    EVAL_ROLLOUT_MODEL,
    MISMATCH_KL_K3,
    OBRS_ACCEPT_RATE,
    PERF_EVAL_S,
    PERF_GENERATOR_IDLE_S,
    PERF_PREPARE_S,
    PERF_ROLLOUT_S,
    PERF_ROLLOUT_TOKENS_PER_S,
    PERF_ROLLOUT_WAIT_S,
    PERF_STEP_S,
    PERF_UPDATE_S,
    RESPONSE_LENGTH,
    REWARD_MEAN,
    ROLLOUT_MODEL_VERSION,
    ROLLOUT_STALENESS,
    pass_at,
)
from jackpot.metrics import MetricLogger, scalars, standard_error
from jackpot.models.loading import load_model, load_tokenizer
from jackpot.models.tokenizer import check_same_tokenizer
from jackpot.rollout import RolloutEngine, make_engine
from jackpot.rollout.base import RolloutBatch
from jackpot.rollout.text import decode_responses, encode_prompts
from jackpot.rollout.weights import checkpoint_weights, push_weights
from jackpot.seeding import EVAL_STREAM, PROMPT_STREAM, SAMPLING_STREAM, row_uniforms, step_seed
from jackpot.tasks import Task, make_task, mean_at_k, pass_at_k
from jackpot.train import checkpoint as ckpt
from jackpot.train.config import Config, ModelConfig, to_dict
from jackpot.train.config_checks import check_training_models, engine_options
from jackpot.train.costs import CostMeter
from jackpot.train.distributed import Collective, Shard, gathered_for_generation, language_model, wrap
from jackpot.train.gap_control import GapControl, control_step, restored, saved
from jackpot.train.pipeline import Generator
from jackpot.train.prepare import prepare
from jackpot.train.pretrain import TinyModelSpec, pretrained_model
from jackpot.train.threads import choose_threads
from jackpot.train.update import update


@dataclass
class Run:
    """Everything a run holds between steps."""

    cfg: Config
    out: Path
    task: Task
    tokenizer: object
    policy: torch.nn.Module
    rollout_model: torch.nn.Module | None      # None in on-policy mode
    init_policy: torch.nn.Module | None         # frozen copy for the KL penalty (kl_coef > 0)
    policy_opt: torch.optim.Optimizer
    rollout_opt: torch.optim.Optimizer | None
    logger: MetricLogger | None = None
    start_step: int = 1
    coll: Collective = dataclasses.field(default_factory=Collective)
    policy_wrapper: torch.nn.Module | None = None   # the policy wrapped by DDP / FSDP2 (several processes)
    rollout_wrapper: torch.nn.Module | None = None  # the same for the rollout model
    engines: dict[int, RolloutEngine] = dataclasses.field(default_factory=dict)  # by id of the model they sample
    generator: Generator | None = None  # rollout.async_steps > 0: generates the next batches in the background
    gap: GapControl = dataclasses.field(default_factory=GapControl)  # distill.target_kl's state (gap_control)
    costs: CostMeter | None = None  # FLOPs and modelled GPU seconds of a step (jackpot.train.costs)

    @property
    def policy_train(self) -> torch.nn.Module:
        """The policy as the update runs it: its DDP / FSDP2 wrapper, or itself in one process."""
        return self.policy_wrapper if self.policy_wrapper is not None else self.policy

    @property
    def rollout_train(self) -> torch.nn.Module | None:
        return self.rollout_wrapper if self.rollout_wrapper is not None else self.rollout_model

    @property
    def actor(self) -> torch.nn.Module:
        """The model that samples the rollouts (as the update runs it): the rollout model, or the policy on-policy."""
        return self.rollout_train if self.rollout_model is not None else self.policy_train

    @property
    def models(self) -> dict[str, torch.nn.Module]:
        return {"policy": self.policy, **({"rollout_model": self.rollout_model} if self.rollout_model else {})}

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"policy": self.policy_opt, **({"rollout_model": self.rollout_opt} if self.rollout_opt else {})}


# ----------------------------------------------------------------------------- set-up
def _quiet_transformers() -> None:
    """Hide transformers' per-load progress bars and info logs; our own bars say what is happening."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def model_dir(role: str, mc: ModelConfig, cfg: Config, progress: bool) -> str:
    """The directory of the model `mc` names: its `path`, else the tiny model pre-trained for the task (cached)."""
    if mc.path is not None:
        return mc.path
    spec = TinyModelSpec(name=role, task=cfg.task.name, task_kwargs=dict(cfg.task.options),
                         hidden=mc.hidden_size, layers=mc.num_layers, heads=mc.num_heads,
                         steps=mc.sft_steps, lr=mc.sft_lr, seed=mc.seed)
    return str(pretrained_model(spec, Path(cfg.cache_dir).expanduser(), progress=progress))


def prepared_model(model: torch.nn.Module, mc: ModelConfig) -> torch.nn.Module:
    """Dropout off for good (as TRL and verl): every dropout probability set to 0, so the train mode that
    Hugging Face's gradient checkpointing needs changes nothing; eval mode otherwise."""
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


def setup(cfg: Config, out: str | Path, *, resume: bool = False, progress: bool = False,
          coll: Collective | None = None) -> Run:
    """Load (or pre-train) both models, distribute them over the processes of `coll` (default: the
    launcher's, else one process), restore the latest checkpoint when resuming."""
    out = Path(out)
    coll = coll or Collective.from_env(cfg.train.device)
    _quiet_transformers()
    if resume and ckpt.latest_checkpoint(out) is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {out / 'checkpoints'}")
    if not resume:
        ckpt.refuse_used_run_dir(out)
    coll.share(cfg.train.prompts_per_step, "train.prompts_per_step")
    if cfg.train.eval_prompts < coll.world:
        raise InputError(f"train.eval_prompts ({cfg.train.eval_prompts}) must be >= the number of processes "
                         f"({coll.world})")
    coll.barrier()  # every rank has checked `out` before rank 0 writes to it
    torch.set_num_threads(choose_threads(cfg)[0])  # train.threads, or a default that fits the models and CPUs
    check_training_models(cfg)  # e.g. a shape the rollout engine cannot serve, before anything is pre-trained
    task = make_task(cfg.task.name, **cfg.task.options)
    device = coll.device(cfg.train.device)
    policy_dir = _main_first(coll, lambda: model_dir("policy", cfg.policy, cfg, progress and coll.is_main))
    tokenizer = load_tokenizer(policy_dir)
    policy = prepared_model(load_model(policy_dir, dtype=cfg.policy.dtype, device=device), cfg.policy)
    init_policy = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.train.kl_coef > 0 else None
    mp = cfg.parallel.mixed_precision
    if init_policy is not None:  # the KL reference is distributed like the policy (sharded with it)
        init_policy = wrap(init_policy, cfg.parallel.policy, coll, trainable=False, mixed_precision=mp)
    policy_train = wrap(policy, cfg.parallel.policy, coll, trainable=True, mixed_precision=mp)
    rollout_model = rollout_train = rollout_opt = None
    if cfg.train.mode == "decoupled":
        rollout_dir = _main_first(coll, lambda: model_dir("rollout", cfg.rollout_model, cfg,
                                                          progress and coll.is_main))
        check_same_tokenizer(load_tokenizer(rollout_dir), tokenizer, names=("rollout_model", "policy"))
        rollout_model = prepared_model(load_model(rollout_dir, dtype=cfg.rollout_model.dtype, device=device),
                                       cfg.rollout_model)
        rollout_train = wrap(rollout_model, cfg.parallel.rollout_model, coll,
                             trainable=cfg.distill.rollout_model == "joint", mixed_precision=mp)
        rollout_opt = torch.optim.AdamW(_trainable(rollout_model), lr=cfg.rollout_model.lr)
    policy_opt = torch.optim.AdamW(_trainable(policy), lr=cfg.policy.lr)  # after wrap: FSDP2 shards in place
    if coll.is_main:
        out.mkdir(parents=True, exist_ok=True)
    coll.barrier()
    run = Run(cfg, out, task, tokenizer, policy, rollout_model, init_policy, policy_opt, rollout_opt,
              coll=coll, policy_wrapper=policy_train if policy_train is not policy else None,
              rollout_wrapper=rollout_train if rollout_train is not rollout_model else None,
              costs=CostMeter.of(cfg, policy, rollout_model))
    local = None
    if resume:
        path = ckpt.latest_checkpoint(out)
        state = ckpt.load_checkpoint(path, run.models, run.optimizers, coll=coll)
        run.start_step = state["step"] + 1
        if state.get("async_steps", 0) != cfg.rollout.async_steps:  # its batches in flight follow that schedule
            raise InputError(f"--resume: the checkpoint was written with rollout.async_steps="
                             f"{state.get('async_steps', 0)}, the run asks for {cfg.rollout.async_steps}; resume "
                             f"with rollout.async_steps={state.get('async_steps', 0)}")
        local = ckpt.load_local(path, coll.rank)
        run.gap = restored(state)
    if cfg.rollout.async_steps:
        run.generator = _generator(run, local)
    if coll.is_main:
        _write_config(cfg, out)
        run.logger = MetricLogger(out, tensorboard=cfg.tensorboard, wandb_project=cfg.wandb_project,
                                  config=to_dict(cfg), resume_step=run.start_step - 1 if resume else None)
    else:
        run.logger = _NoLogger()
    return run


def _generator(run: Run, local: dict | None) -> Generator:
    """The background generator over a copy of the sampling model; resumed, with the checkpoint's batches."""
    engine = make_engine(run.cfg.rollout.engine, language_model(run.actor), run.tokenizer, own_copy=True,
                         **engine_options(run.cfg))
    generator = Generator(engine, run.cfg.rollout.threads or 1)
    if local is not None:
        generator.restore({int(step): RolloutBatch(**batch) for step, batch in local["inflight"].items()})
    return generator


def _main_first(coll: Collective, make):
    """Run `make` on rank 0 first (it may pre-train and cache a model), then on the others (cache hit)."""
    if not coll.is_main:
        coll.barrier()
    value = make()
    if coll.is_main:
        coll.barrier()
    return value


class _NoLogger:
    """The metric logger of ranks other than 0: every rank computes the same metrics, rank 0 writes them."""

    def log(self, step: int, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def _write_config(cfg: Config, out: Path) -> None:
    tmp = out / "config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(out / "config.yaml")


# ----------------------------------------------------------------------------- phases
@dataclass
class Prompts:
    """One step's prompts for this rank: the task examples (each repeated group_size times), their ids and mask
    (left-padded), the rows' sampling uniforms (from their global index) and the call's seed."""

    examples: list
    ids: torch.Tensor
    mask: torch.Tensor
    uniforms: torch.Tensor
    seed: int


def step_prompts(run: Run, step: int) -> Prompts:
    """This rank's share of the prompts_per_step prompts of `step` (drawn from (seed, step)), group_size times."""
    t, s = run.cfg.train, run.cfg.sampling
    examples = run.task.examples("train", t.prompts_per_step, step_seed(t.seed, step, PROMPT_STREAM))
    share = run.coll.share(t.prompts_per_step, "train.prompts_per_step")
    repeated = [ex for ex in examples[share.start:share.stop] for _ in range(t.group_size)]
    prompt_ids, prompt_mask = encode_prompts(run.tokenizer, [ex.prompt for ex in repeated],
                                             chat_template=run.cfg.task.chat_template)
    shard = _shard(run)
    uniforms = row_uniforms(t.seed, step, SAMPLING_STREAM, shard.total, s.max_new_tokens, shard.rows)
    return Prompts(repeated, prompt_ids, prompt_mask, uniforms, step_seed(t.seed, step, SAMPLING_STREAM))


def sample(engine: RolloutEngine, prompts: Prompts, cfg: Config, synced: bool = False) -> RolloutBatch:
    """`engine`'s responses to `prompts`, rollout.batch_size rows per generate call (equal shares: every rank
    runs as many calls)."""
    s, size = cfg.sampling, cfg.rollout.batch_size or len(prompts.examples)
    parts = [engine.generate(prompts.ids[i:i + size], prompts.mask[i:i + size], max_new_tokens=s.max_new_tokens,
                             temperature=s.temperature, top_p=s.top_p, topk=s.topk, seed=prompts.seed,
                             uniforms=prompts.uniforms[i:i + size], synced=synced)
             for i in range(0, len(prompts.examples), size)]
    return parts[0] if len(parts) == 1 else RolloutBatch.cat(parts)


def score(run: Run, prompts: Prompts, batch: RolloutBatch) -> torch.Tensor:
    """The task's reward of each response: (prompts of this rank, group_size)."""
    completions = decode_responses(run.tokenizer, batch.response_ids, batch.response_mask)
    rewards = torch.tensor([float(run.task.reward(ex, c)) for ex, c in zip(prompts.examples, completions)])
    return rewards.reshape(-1, run.cfg.train.group_size).to(batch.rollout_logp.device)


def collect(run: Run, step: int) -> tuple[RolloutBatch, torch.Tensor]:
    """Sample this rank's share of prompts_per_step prompts x group_size responses and score them:
    (batch, rewards (N / processes, G)). The batch's rows are the global rows `_shard(run).rows`."""
    prompts = step_prompts(run, step)
    engine = engine_for(run, run.actor, version=step)  # the actor's weights after the previous step's update
    with gathered_for_generation(run.actor, engine) as synced:
        batch = sample(engine, prompts, run.cfg, synced)
    return batch, score(run, prompts, batch)


def collect_ahead(run: Run, step: int) -> tuple[RolloutBatch, torch.Tensor, dict[str, float]]:
    """`collect` with rollout.async_steps = k > 0 (jackpot.train.pipeline): hand the generator the batches up to
    step + k, sampled by the weights now (version `step`), then take and score the batch of `step`, generated
    earlier. Also returns the pipeline's timings."""
    g, k = run.generator, run.cfg.rollout.async_steps
    weights = None
    for n in range(g.last_step + 1, step + k + 1):  # also past train.steps: a resume may extend the run
        if weights is None:  # a copy: the update that follows changes the trained module in place
            weights = [(name, t.clone()) for name, t in checkpoint_weights(language_model(run.actor), g.engine.dtype)]
            version = step
        prompts = step_prompts(run, n)
        g.submit(n, version, weights if n == g.last_step + 1 else None,
                 lambda engine, prompts=prompts: sample(engine, prompts, run.cfg))
    generated, waited = g.result(step)
    batch = generated.batch
    return batch, score(run, step_prompts(run, step), batch), {
        PERF_ROLLOUT_S: generated.seconds, PERF_ROLLOUT_WAIT_S: waited, PERF_GENERATOR_IDLE_S: generated.idle_s}


def _shard(run: Run) -> Shard:
    """The rows of the global rollout batch this rank holds (whole groups: its share of the prompts)."""
    t = run.cfg.train
    return run.coll.shard(t.prompts_per_step * t.group_size)


@torch.no_grad()
def evaluate(run: Run, model: torch.nn.Module, version: int) -> dict[str, float]:
    """Mean@k and Pass@k of `model` (its weights `version`: trained through step version - 1) on the task's
    held-out split (k = eval_samples); several processes each sample a block of the prompts, the scores are
    gathered (every rank returns the same numbers)."""
    t, s = run.cfg.train, run.cfg.sampling
    examples = run.task.examples("eval", t.eval_prompts, t.seed)
    share = run.coll.uneven_share(len(examples))
    rows = range(share.start * t.eval_samples, share.stop * t.eval_samples)
    uniforms = row_uniforms(t.seed, 0, EVAL_STREAM, len(examples) * t.eval_samples, s.max_new_tokens, rows)
    engine = engine_for(run, model, version)
    with gathered_for_generation(model, engine) as synced:
        scored = sample_and_score(engine, run.tokenizer, run.task,
                                  examples[share.start:share.stop], k=t.eval_samples,
                                  max_new_tokens=s.max_new_tokens, temperature=t.eval_temperature or s.temperature,
                                  top_p=s.top_p, seed=t.seed, chat_template=run.cfg.task.chat_template,
                                  uniforms=uniforms, synced=synced)
    rewards = run.coll.gather_rows(scored.rewards)[0]
    return {ACCURACY: mean_at_k(rewards), ACCURACY_SE: standard_error(rewards),
            pass_at(t.eval_samples): pass_at_k(rewards, t.eval_samples)}


def engine_for(run: Run, model: torch.nn.Module, version: int) -> RolloutEngine:
    """The engine that samples from `model` (as the update runs it), holding its weights `version`: one per model
    for the whole run, sampling and evaluation alike (an engine holding its own weights is built once and
    pushed to, never rebuilt; in-process vLLM engines must outlive each other)."""
    if id(model) not in run.engines:
        run.engines[id(model)] = make_engine(run.cfg.rollout.engine, language_model(model), run.tokenizer,
                                             **engine_options(run.cfg))
    engine = run.engines[id(model)]
    push_weights(engine, language_model(model), version)
    return engine


def train_step(run: Run, step: int) -> dict[str, float]:
    """One step: collect and score rollouts, prepare, update; returns the step's metrics."""
    cfg = run.cfg
    # ---- rollout + score (async: take the batch generated ahead, and queue the next)
    t0 = time.perf_counter()
    if run.generator is None:
        batch, rewards = collect(run, step)
        pipeline = {}
    else:
        batch, rewards, pipeline = collect_ahead(run, step)
    t1 = time.perf_counter()
    # ---- prepare: p_old, p_omega_old, Z, uniforms, diagnostics (no gradients)
    prep = prepare(cfg, batch, rewards, policy=run.policy_train, rollout_model=run.rollout_train,
                   init_policy=run.init_policy, step=step, coll=run.coll, shard=_shard(run))
    # ---- the gap controller: coefficient or rollout-model lr, adapted to the gap just measured (distill.target_kl)
    control = control_step(cfg, run.gap, prep, run.coll, run.rollout_opt)
    t2 = time.perf_counter()
    # ---- update: policy (and rollout model) optimizer steps (eval mode throughout: no dropout)
    upd = update(cfg, prep, policy=run.policy_train, rollout_model=run.rollout_train, policy_opt=run.policy_opt,
                 rollout_opt=run.rollout_opt if cfg.distill.rollout_model == "joint" else None, step=step,
                 coll=run.coll, distill_coef=run.gap.coef)
    t3 = time.perf_counter()
    coll = run.coll
    tokens = coll.sum(batch.response_mask.sum())
    values = scalars({REWARD_MEAN: coll.gather_rows(rewards)[0].mean(),
                      RESPONSE_LENGTH: tokens / (cfg.train.prompts_per_step * cfg.train.group_size),
                      **prep.metrics, **upd, **control})
    values.update({ROLLOUT_MODEL_VERSION: float(batch.model_version),
                   ROLLOUT_STALENESS: float(step - batch.model_version)})
    rollout_s = pipeline.pop(PERF_ROLLOUT_S, t1 - t0)  # async: the generator's time, not the trainer's wait
    values.update({PERF_ROLLOUT_S: rollout_s, PERF_PREPARE_S: t2 - t1, PERF_UPDATE_S: t3 - t2, PERF_STEP_S: t3 - t0,
                   PERF_ROLLOUT_TOKENS_PER_S: float(tokens) / max(rollout_s, 1e-9), **pipeline})
    lengths = (coll.gather_rows(m.sum(-1))[0] for m in (batch.prompt_mask, batch.response_mask))
    values.update(run.costs.metrics(*lengths))  # FLOPs and modelled GPU seconds by phase
    return values


def evaluate_all(run: Run, step: int) -> dict[str, float]:
    """`evaluate` the policy (eval/...) and the rollout model if any (eval_rollout_model/...) after `step`
    updates (their weights are version step + 1, those that sample step + 1), timed."""
    version = step + 1
    t0 = time.perf_counter()
    if run.generator is not None:  # the generator finishes its queue first: in-process vLLM engines share state
        run.generator.inflight()
    out = {EVAL + k: v for k, v in evaluate(run, run.policy_train, version).items()}
    if run.rollout_model is not None:
        out.update({EVAL_ROLLOUT_MODEL + k: v for k, v in evaluate(run, run.rollout_train, version).items()})
    out[PERF_EVAL_S] = time.perf_counter() - t0
    return out


def train(cfg: Config, out: str | Path, *, resume: bool = False, progress: bool = True) -> Path:
    """Run (or resume) training into `out`; returns the run directory.

    Ctrl-C finishes the step in progress, saves a checkpoint and raises KeyboardInterrupt (a second
    Ctrl-C stops at once, keeping the previous checkpoint): a checkpoint never holds a half-done step.
    """
    run = setup(cfg, out, resume=resume, progress=progress)
    t = cfg.train
    if run.start_step == 1:
        run.logger.log(0, evaluate_all(run, 0))
    bar = tqdm(range(run.start_step, t.steps + 1), desc="train", disable=not (progress and run.coll.is_main),
               dynamic_ncols=True)
    try:
        with _deferred_interrupt() as interrupted:
            for step in bar:
                values = train_step(run, step)
                if step % t.eval_every == 0 or step == t.steps:
                    values.update(evaluate_all(run, step))
                run.logger.log(step, values)
                bar.set_postfix(_postfix(values))
                stop = run.coll.any(interrupted())  # Ctrl-C on any rank: all save after this step and stop
                if step % t.checkpoint_every == 0 or step == t.steps or stop:
                    save_checkpoint(run, step)
                if stop:
                    raise KeyboardInterrupt(f"interrupted after step {step}; checkpoint saved in {run.out}")
        # the trained models as Hugging Face directories: RUN/final/policy (and rollout_model)
        ckpt.export_models(run.out, run.models, {"policy": run.policy_train, "rollout_model": run.rollout_train},
                           run.tokenizer, coll=run.coll)
    finally:
        if run.generator is not None:
            run.generator.close()
        run.logger.close()
    return run.out


def save_checkpoint(run: Run, step: int) -> None:
    """The checkpoint after `step`: models, optimizers, and with async_steps the batches generated ahead."""
    g, extra = run.generator, saved(run.cfg, run.gap)  # the controller's state (a fixed value is in the config)
    if g is not None:
        extra["async_steps"] = run.cfg.rollout.async_steps
    local = None if g is None else {"inflight": {n: dataclasses.asdict(batch) for n, batch in g.inflight().items()}}
    ckpt.save_checkpoint(run.out, step, run.models, run.optimizers, extra=extra, coll=run.coll, local=local)


@contextlib.contextmanager
def _deferred_interrupt():
    """Turn the first SIGINT into a flag checked between steps; the second one interrupts at once."""
    state = {"hit": False}
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if state["hit"]:
            raise KeyboardInterrupt
        state["hit"] = True
        print("\nCtrl-C: finishing this step and saving a checkpoint (press again to stop now)", flush=True)

    installed = threading.current_thread() is threading.main_thread()
    if installed:
        signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: state["hit"]
    finally:
        if installed:
            signal.signal(signal.SIGINT, previous)


def _postfix(values: dict[str, float]) -> dict[str, str]:
    keys = {"reward": REWARD_MEAN, "accept": OBRS_ACCEPT_RATE, "kl": MISMATCH_KL_K3, "acc": EVAL_ACCURACY}
    return {short: f"{values[k]:.3g}" for short, k in keys.items() if k in values}
