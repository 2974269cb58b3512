"""The training loop: rollout -> score -> prepare -> update -> evaluate -> log -> checkpoint.

Decoupled mode (the paper's setting): the rollout model samples every trajectory, the policy learns
from them through a correction (Jackpot by default), and the rollout model is trained on the same
trajectories (PPO + distillation toward the policy, eq. 8) unless frozen. On-policy mode: the policy
samples its own rollouts (the ideal the decoupled run is compared with). Every random draw of a step
is seeded from (seed, step), so a resumed run continues exactly as an uninterrupted one would.

Where a step's batch comes from — its prompts, the engines, the synchronous or asynchronous schedule
(`rollout.async_steps`), the batches in flight a checkpoint holds — is `rollout_source.RolloutSource`; the
models are built in `models.py`; a batch's no-gradient quantities in `prepare.py`, the update in `update.py`.

Under a launcher (`torchrun --nproc_per_node N -m jackpot train ...`, `accelerate launch -m jackpot
train ...`) every process runs this loop on its block of the global batch: prompts are drawn by global
index from (seed, step) and split by rank in whole groups, each row's sampling and rejection uniforms
come from its global index, and every batch statistic is reduced through jackpot.train.distributed —
so the run is the one a single process would make. Rank 0 alone writes metrics, config and summaries;
checkpoints are sharded (torch.distributed.checkpoint) and renamed into place by rank 0.
"""

from __future__ import annotations

import contextlib
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
from jackpot.fileio import write_text_atomic
from jackpot.metric_names import (
    ACCURACY,
    ACCURACY_SE,
    EVAL,
    EVAL_ACCURACY,
    EVAL_ROLLOUT_MODEL,
    MISMATCH_KL_K3,
    OBRS_ACCEPT_RATE,
    PERF_EVAL_S,
    PERF_PREPARE_S,
    PERF_ROLLOUT_S,
    PERF_ROLLOUT_TOKENS_PER_S,
    PERF_STEP_S,
    PERF_UPDATE_S,
    RESPONSE_LENGTH,
    REWARD_MEAN,
    ROLLOUT_MODEL_VERSION,
    ROLLOUT_STALENESS,
    pass_at,
)
from jackpot.metrics import MetricLogger, scalars, standard_error
from jackpot.models.forward import language_model
from jackpot.rollout.base import RolloutBatch, release_all
from jackpot.rollout.text import decode_responses
from jackpot.seeding import EVAL_STREAM, row_uniforms
from jackpot.tasks import Example, Task, make_task, mean_at_k, pass_at_k
from jackpot.train import checkpoint as ckpt
from jackpot.train.config import Config, to_dict
from jackpot.train.config_checks import check_training_models
from jackpot.train.costs import CostMeter
from jackpot.train.distributed import Collective, gathered_for_generation
from jackpot.train.gap_control import GapControl, control_step, restored, saved
from jackpot.train.models import Models, build_models
from jackpot.train.models import model_dir as model_dir  # moved to jackpot.train.models; kept for one release
from jackpot.train.models import prepared_model as prepared_model  # the same
from jackpot.train.precision import autocast
from jackpot.train.prepare import prepare, recorded_logprobs_serve
from jackpot.train.rollout_source import RolloutSource
from jackpot.train.threads import choose_threads
from jackpot.train.update import update


@dataclass(kw_only=True)
class Run(Models):
    """Everything a run holds between steps: its models (`models.Models`) and what else it needs."""

    cfg: Config
    out: Path
    task: Task
    source: RolloutSource | None = None  # where each step's batch comes from (and the engines that evaluate)
    logger: MetricLogger | None = None
    start_step: int = 1
    coll: Collective = dataclasses.field(default_factory=Collective)
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
    models = build_models(cfg, coll, progress)
    if coll.is_main:
        out.mkdir(parents=True, exist_ok=True)
    coll.barrier()
    run = Run(**{f.name: getattr(models, f.name) for f in dataclasses.fields(models)}, cfg=cfg, out=out, task=task,
              coll=coll, costs=CostMeter.of(cfg, models.policy, models.rollout_model))
    run.source = RolloutSource(cfg, task, run.tokenizer, coll, run.actor)
    if resume:
        path = ckpt.latest_checkpoint(out)
        state = ckpt.load_checkpoint(path, run.models, run.optimizers, coll=coll)
        run.start_step = state["step"] + 1
        run.source.restore(state, ckpt.load_local(path, coll.rank))
        run.gap = restored(state)
    if coll.is_main:
        write_text_atomic(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        run.logger = MetricLogger(out, tensorboard=cfg.tensorboard, wandb_project=cfg.wandb_project,
                                  config=to_dict(cfg), resume_step=run.start_step - 1 if resume else None)
    else:
        run.logger = _NoLogger()
    return run


class _NoLogger:
    """The metric logger of ranks other than 0: every rank computes the same metrics, rank 0 writes them."""

    def log(self, step: int, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- phases
def score(run: Run, examples: list[Example], batch: RolloutBatch) -> torch.Tensor:
    """The task's reward of each response: (prompts of this rank, group_size)."""
    completions = decode_responses(run.tokenizer, batch.response_ids, batch.response_mask)
    rewards = torch.tensor([float(run.task.reward(ex, c)) for ex, c in zip(examples, completions)])
    return rewards.reshape(-1, run.cfg.train.group_size).to(batch.rollout_logp.device)


def collect(run: Run, step: int) -> tuple[RolloutBatch, torch.Tensor]:
    """This rank's share of the step's batch (the global rows `run.source.shard.rows`) and its rewards
    (N / processes, G)."""
    batch, examples, _ = run.source.take(step)
    return batch, score(run, examples, batch)


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
    engine = run.source.engine(model, version)
    with gathered_for_generation(model, engine) as synced:
        scored = sample_and_score(engine, run.tokenizer, run.task,
                                  examples[share.start:share.stop], k=t.eval_samples,
                                  max_new_tokens=s.max_new_tokens, temperature=t.eval_temperature or s.temperature,
                                  top_p=s.top_p, seed=t.seed, chat_template=run.cfg.task.chat_template,
                                  uniforms=uniforms, synced=synced)
    rewards = run.coll.gather_rows(scored.rewards)[0]
    return {ACCURACY: mean_at_k(rewards), ACCURACY_SE: standard_error(rewards),
            pass_at(t.eval_samples): pass_at_k(rewards, t.eval_samples)}


def train_step(run: Run, step: int) -> dict[str, float]:
    """One step under train.mixed_precision's autocast (jackpot.train.precision; none by default): `step_body`."""
    with autocast(run.cfg.train.mixed_precision, run.policy):
        return step_body(run, step)


def step_body(run: Run, step: int) -> dict[str, float]:
    """One step: take the step's batch and score it, prepare, update; returns the step's metrics."""
    cfg, coll = run.cfg, run.coll
    # ---- rollout + score: the batch of this step from the rollout source (sampled now or generated ahead)
    t0 = time.perf_counter()
    batch, examples, timings = run.source.take(step)
    rewards = score(run, examples, batch)
    t1 = time.perf_counter()
    release_all(run.source.engines.values())  # colocated vLLM sleeps through prepare and update (rollout.sleep_level)
    # ---- prepare: p_old, p_omega_old, Z, uniforms, diagnostics (no gradients)
    recorded = recorded_logprobs_serve(cfg, run.source.sampling_engine, language_model(run.actor), batch, step)
    prep = prepare(cfg, batch, rewards, policy=run.policy_train, rollout_model=run.rollout_train,
                   init_policy=run.init_policy, step=step, coll=coll, shard=run.source.shard,
                   recorded_old=recorded)
    # ---- the gap controller: coefficient or rollout-model lr, adapted to the gap just measured (distill.target_kl)
    control = control_step(cfg, run.gap, prep, run.rollout_opt)
    t2 = time.perf_counter()
    # ---- update: policy (and rollout model) optimizer steps (eval mode throughout: no dropout)
    upd = update(cfg, prep, policy=run.policy_train, rollout_model=run.rollout_train, policy_opt=run.policy_opt,
                 rollout_opt=run.rollout_opt if cfg.trains_rollout_model else None, step=step, coll=coll,
                 distill_coef=run.gap.coef)
    t3 = time.perf_counter()
    tokens = coll.sum(batch.response_mask.sum())
    values = scalars({REWARD_MEAN: coll.gather_rows(rewards)[0].mean(),
                      RESPONSE_LENGTH: tokens / (cfg.train.prompts_per_step * cfg.train.group_size),
                      **prep.metrics, **upd, **control})
    values.update({ROLLOUT_MODEL_VERSION: float(batch.model_version),
                   ROLLOUT_STALENESS: float(step - batch.model_version)})
    rollout_s = timings.pop(PERF_ROLLOUT_S)  # the sampling's own time (asynchronous: the generator's)
    values.update({PERF_ROLLOUT_S: rollout_s, PERF_PREPARE_S: t2 - t1, PERF_UPDATE_S: t3 - t2, PERF_STEP_S: t3 - t0,
                   PERF_ROLLOUT_TOKENS_PER_S: float(tokens) / max(rollout_s, 1e-9), **timings})
    lengths = (coll.gather_rows(m.sum(-1))[0] for m in (batch.prompt_mask, batch.response_mask))
    values.update(run.costs.metrics(*lengths))  # FLOPs and modelled GPU seconds by phase
    return values


def evaluate_all(run: Run, step: int) -> dict[str, float]:
    """`evaluate` the policy (eval/...) and the rollout model if any (eval_rollout_model/...) after `step`
    updates (their weights are version step + 1, those that sample step + 1), timed."""
    version = step + 1
    t0 = time.perf_counter()
    run.source.drain()  # the batches in flight first: in-process vLLM engines share state
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
        run.source.close()
        run.logger.close()
    return run.out


def save_checkpoint(run: Run, step: int) -> None:
    """The checkpoint after `step`: models, optimizers, the rollout source's state (with async_steps the batches
    generated ahead) and the gap controller's (a fixed value is in the config)."""
    extra, local = run.source.state()
    ckpt.save_checkpoint(run.out, step, run.models, run.optimizers, extra={**saved(run.cfg, run.gap), **extra},
                         coll=run.coll, local=local)


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
