"""Runs a few training steps in this process — alone, or as one rank under torchrun — and saves (rank 0)
what the distributed tests compare: per step the whole batch's rows (sampled ids, rewards, correction
weights and masks, gathered over ranks in global order) and the logged metrics, then an evaluation of
both models and their full parameters.

    python tests/train/dist_worker.py OUT.pt RUN_DIR STEPS override...
    torchrun --standalone --nproc_per_node 2 tests/train/dist_worker.py OUT.pt RUN_DIR STEPS override...
"""

from __future__ import annotations

import sys

import torch

from jackpot.train import loop
from jackpot.train.config import build_config
from jackpot.train.distributed import is_sharded


def main(out: str, run_dir: str, steps: int, overrides: list[str]) -> None:
    cfg = build_config(None, overrides)
    run = loop.setup(cfg, run_dir)
    # a dense reward (tiny barely-trained models rarely solve the task): every group has a spread, so the
    # policy-gradient term is not zero and the comparison covers it
    object.__setattr__(run.task, "reward", lambda example, completion: len(completion) % 3 + completion.count("1"))
    coll = run.coll
    captured = {}
    real_prepare = loop.prepare

    def prepare(cfg, batch, rewards, **kw):
        prep = real_prepare(cfg, batch, rewards, **kw)
        captured.update(prep=prep, rewards=rewards)
        return prep

    loop.prepare = prepare
    record = []
    for step in range(1, steps + 1):
        values = loop.train_step(run, step)
        prep = captured["prep"]
        rows = {"response_ids": prep.batch.response_ids, "response_mask": prep.batch.response_mask,
                "rewards": captured["rewards"].reshape(-1, 1), "old_logp": prep.old_logp}
        if prep.correction is not None:
            rows.update(weights=prep.correction.weights, keep=prep.correction.mask)
        gathered = {k: coll.gather_rows(v)[0] for k, v in rows.items()}
        record.append({"rows": gathered, "metrics": {k: v for k, v in values.items() if not k.startswith("perf/")}})
    evaluation = {k: v for k, v in loop.evaluate_all(run, steps).items() if not k.startswith("perf/")}
    params = {name: _full_state(run, name) for name in run.models}
    if coll.is_main:
        torch.save({"steps": record, "eval": evaluation, "params": params, "world": coll.world}, out)
    coll.barrier()


def _full_state(run, name):
    wrapped = run.policy_train if name == "policy" else run.rollout_train
    model = run.models[name]
    if is_sharded(wrapped):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:])
