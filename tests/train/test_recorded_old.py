"""train.recompute_old: the engine's recorded log-probs as the sampling model's old log-probs (verl's bypass mode).

What is pinned: with `auto`, on a step that is not a check step, prepare runs no forward of the sampling model
(p_omega_old decoupled, p_old on-policy: it takes `batch.rollout_logp`), and what it prepares equals what the
recomputing path prepares to float32 numerics (the `hf` engine in float32 records exactly the trainer's
distribution); check steps (step 1 and every recompute_check_every after) recompute and log
`mismatch/rollout_model_kl_k3`; every condition under which the recorded log-probs are not the trainer's own
(bf16, asynchronous, several mini-batches, nucleus, mixed precision, another dtype in the engine, a stale
version, an engine that declares no exact log-probs) recomputes; `never` is refused where it cannot be served.
The default run (exact Z reads the rollout model's logits anyway) is unchanged bit for bit: see the closing
check in docs/PERFORMANCE.md.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from cli_helpers import TINY

from jackpot import metric_names as names
from jackpot.errors import InputError
from jackpot.train import loop
from jackpot.train import prepare as prepare_module
from jackpot.train.config import build_config
from jackpot.train.prepare import recorded_logprobs_serve


def _cfg(cache, *extra):
    return build_config(None, [*TINY, f"cache_dir={cache}", "policy.lr=1e-2", "rollout_model.lr=1e-2",
                               "train.recompute_check_every=2", *extra])


@pytest.mark.parametrize("mode", ["decoupled", "on-policy"])
def test_auto_takes_the_recorded_logprobs_and_they_equal_the_recomputed_ones(tmp_path, cache, monkeypatch, mode):
    correction = "correction.z=topk" if mode == "decoupled" else "correction.name=none"
    run = loop.setup(_cfg(cache, f"train.mode={mode}", correction), tmp_path)
    sampler = loop.language_model(run.actor)
    forwards, seen = [], {}
    real_head, real_prepare = prepare_module.model_head, loop.prepare

    def counting_head(model, batch, temperature):
        forwards.append(loop.language_model(model))
        return real_head(model, batch, temperature)

    def spy(cfg, batch, rewards, **kw):
        forwards.clear()
        prep = real_prepare(cfg, batch, rewards, **kw)
        seen.update(prep=prep, sampler_forwards=sum(m is sampler for m in forwards), recorded=kw["recorded_old"])
        seen["recomputed"] = real_prepare(cfg, batch, rewards, **{**kw, "recorded_old": False})
        return prep

    monkeypatch.setattr(prepare_module, "model_head", counting_head)
    monkeypatch.setattr(loop, "prepare", spy)
    for step in (1, 2, 3):
        values = loop.train_step(run, step)
        prep, recomputed = seen["prep"], seen["recomputed"]
        check = step in (1, 3)  # step 1 and every 2 steps after: recomputed, the engine-numerics check logged
        assert seen["recorded"] is (not check) and values[names.PERF_RECORDED_OLD] == float(not check)
        assert (names.MISMATCH_ROLLOUT_MODEL_KL_K3 in values) is check
        if check:
            assert seen["sampler_forwards"] >= 1
            continue
        sampled = prep.rollout_model_old_logp if mode == "decoupled" else prep.old_logp
        assert seen["sampler_forwards"] == 0  # no forward of the sampling model
        assert torch.equal(sampled, prep.batch.rollout_logp)
        m = prep.batch.response_mask.bool()
        for name in ("old_logp", "rollout_model_old_logp"):
            torch.testing.assert_close(getattr(prep, name)[m], getattr(recomputed, name)[m], rtol=0, atol=2e-5)
        torch.testing.assert_close(prep.correction.weights, recomputed.correction.weights, rtol=1e-4, atol=1e-4)
        assert torch.equal(prep.correction.mask, recomputed.correction.mask)


def _facts(*extra, engine=None, trainer=torch.float32, version=2):
    cfg = build_config(None, ["train.recompute_check_every=50", "correction.z=topk", *extra])
    engine = engine or SimpleNamespace(exact_logprobs=True, holds_weights=False, dtype=None)
    model = torch.nn.Linear(2, 2).to(trainer)
    return cfg, engine, model, SimpleNamespace(model_version=version)


def test_auto_takes_them_exactly_when_they_are_the_trainers_own():
    assert recorded_logprobs_serve(*_facts(), step=2)
    held = SimpleNamespace(exact_logprobs=True, holds_weights=True, dtype=torch.float32)  # an own copy, same dtype
    assert recorded_logprobs_serve(*_facts(engine=held), step=2)
    assert recorded_logprobs_serve(*_facts("train.mode=on-policy"), step=2)


@pytest.mark.parametrize(("extra", "kw"), [
    (("train.recompute_old=always",), {}),
    (("rollout.async_steps=1",), {}),
    (("train.minibatches=2",), {}),
    (("sampling.top_p=0.9",), {}),
    (("parallel.mixed_precision=bfloat16",), {}),
    ((), {"trainer": torch.bfloat16}),  # a bf16 sampling model: the engine's kernels and the forward's differ
    ((), {"engine": SimpleNamespace(exact_logprobs=True, holds_weights=True, dtype=torch.bfloat16)}),  # merged copy
    ((), {"version": 1}),  # sampled by older weights
    ((), {"engine": SimpleNamespace(exact_logprobs=False, holds_weights=False, dtype=None)}),
], ids=["always", "async", "minibatches", "top-p", "mixed-precision", "bf16", "engine-dtype", "stale", "inexact"])
def test_auto_recomputes_where_the_recorded_logprobs_are_not_the_trainers_own(extra, kw):
    assert not recorded_logprobs_serve(*_facts(*extra, **kw), step=2)


@pytest.mark.parametrize("setting", ["auto", "never"])
def test_check_steps_recompute_whatever_the_setting(setting):
    cfg, engine, model, _ = _facts(f"train.recompute_old={setting}")
    served = [recorded_logprobs_serve(cfg, engine, model, SimpleNamespace(model_version=s), s) for s in range(1, 160)]
    assert [s for s, ok in enumerate(served, start=1) if not ok] == [1, 51, 101, 151]


def test_never_takes_them_even_when_stale_and_is_refused_where_they_cannot_serve():
    assert recorded_logprobs_serve(*_facts("train.recompute_old=never", "rollout.async_steps=1", version=1), step=2)
    inexact = SimpleNamespace(exact_logprobs=False, holds_weights=False, dtype=None)
    with pytest.raises(InputError, match=r"train.recompute_old=never: the SimpleNamespace records no exact"):
        recorded_logprobs_serve(*_facts("train.recompute_old=never", engine=inexact), step=2)
    with pytest.raises(InputError, match="train.recompute_old=never needs sampling.top_p = 1"):
        build_config(None, ["train.recompute_old=never", "sampling.top_p=0.9", "correction.z=topk"])
    with pytest.raises(InputError, match="train.recompute_old"):
        build_config(None, ["train.recompute_old=sometimes"])
    with pytest.raises(InputError, match="train.recompute_check_every"):
        build_config(None, ["train.recompute_check_every=0"])
