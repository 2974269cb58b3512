"""rollout.async_steps = k > 0 (jackpot.train.pipeline): batches generated ahead by a background generator.

What is pinned: the batch trained on at step n was sampled by the weights its stamp names, version
max(1, n - k) (its recorded log-probs equal a teacher-forced forward of exactly those weights, and not of the
current ones), `rollout/staleness` is min(n - 1, k); a resumed run trains on exactly the batches the
uninterrupted one did (they are in the checkpoint); Ctrl-C saves a checkpoint holding them; a failing
generator stops the run with one error naming the step; bad values are refused. The synchronous default is
pinned by the rest of the suite. Two processes against one: tests/train/test_distributed.py.
"""

from __future__ import annotations

import copy
import json
import os
import signal

import pytest
import torch
from cli_helpers import TINY
from reference import response_logits

from jackpot.cli import main as cli_main
from jackpot.errors import InputError
from jackpot.metric_names import PERF_GENERATOR_IDLE_S, PERF_ROLLOUT_WAIT_S, ROLLOUT_MODEL_VERSION, ROLLOUT_STALENESS
from jackpot.metrics import read_metrics
from jackpot.models.forward import token_logprobs
from jackpot.train import checkpoint as ckpt
from jackpot.train import loop
from jackpot.train.config import build_config
from jackpot.train.pipeline import GeneratorError

LR = ["policy.lr=1e-2", "rollout_model.lr=1e-2"]  # updates large enough that a version's log-probs are its own


def _cfg(cache, *extra):
    return build_config(None, [*TINY, *LR, f"cache_dir={cache}", *extra])


def _no_perf(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("perf/")}


def _recorded_vs(model, batch) -> float:
    """Largest |recorded log p_inf - log-prob under `model`| over the batch's response tokens."""
    with torch.no_grad():
        logits = response_logits(model, batch.input_ids, batch.attention_mask, batch.response_len)
    logp = token_logprobs(torch.log_softmax(logits.float(), -1), batch.response_ids)
    m = batch.response_mask.bool()
    return (batch.rollout_logp[m] - logp[m]).abs().max().item()


@pytest.mark.parametrize(("mode", "k"), [("decoupled", 1), ("on-policy", 1), ("decoupled", 2)])
def test_each_batch_is_sampled_by_the_version_its_stamp_names(tmp_path, cache, mode, k):
    run = loop.setup(_cfg(cache, f"train.mode={mode}", f"rollout.async_steps={k}"), tmp_path)
    # a dense reward (the barely-trained tiny models rarely solve the task), so the on-policy policy moves too
    object.__setattr__(run.task, "reward", lambda example, completion: len(completion) % 3 + completion.count("1"))
    versions = {1: copy.deepcopy(run.actor)}  # the sampling model's weights by version (version v: v - 1 updates)
    seen = {}
    real_prepare = loop.prepare

    def spy(cfg, batch, rewards, **kw):
        seen["batch"] = batch
        return real_prepare(cfg, batch, rewards, **kw)

    loop.prepare = spy
    try:
        for step in range(1, 5):
            values = loop.train_step(run, step)
            batch = seen["batch"]
            version = max(1, step - k)
            assert batch.model_version == version == values[ROLLOUT_MODEL_VERSION]
            assert values[ROLLOUT_STALENESS] == min(step - 1, k)
            assert values[PERF_ROLLOUT_WAIT_S] >= 0 and values[PERF_GENERATOR_IDLE_S] >= 0
            assert _recorded_vs(versions[version], batch) < 1e-5  # sampled by exactly that version
            if version != step:  # and not by the current weights, which differ after real updates
                assert _recorded_vs(run.actor, batch) > 1e-3
            versions[step + 1] = copy.deepcopy(run.actor)
    finally:
        loop.prepare = real_prepare
        run.source.close()


def test_a_resumed_async_run_continues_as_the_uninterrupted_one(tmp_path, cache):
    """3 steps straight equal 2 steps then --resume to 3: the batch of step 3 was generated before the cut
    (by version 2) and comes back from the checkpoint; every metric (timings aside) and the exported weights
    are bitwise equal."""
    args = ["train", "--no-progress", *TINY, *LR, f"cache_dir={cache}", "rollout.async_steps=1",
            "train.checkpoint_every=1"]
    cli_main([*args, "--out", str(tmp_path / "full"), "train.steps=3"])
    cli_main([*args, "--out", str(tmp_path / "cut"), "train.steps=2"])
    saved = ckpt.load_local(ckpt.latest_checkpoint(tmp_path / "cut"))
    assert list(saved["inflight"]) == [3] and saved["inflight"][3]["model_version"] == 2
    cli_main([*args, "--out", str(tmp_path / "cut"), "train.steps=3", "--resume"])
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == [0, 1, 2, 3]
    for a, b in zip(full, cut, strict=True):  # the cut run also evaluated after its last step, 2
        a, b = _no_perf(a), _no_perf(b)
        assert a == {k: v for k, v in b.items() if k in a}
    assert full[3][ROLLOUT_STALENESS] == 1
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["staleness_mean"] == pytest.approx(2 / 3) and summary["rollout_wait_s_mean"] >= 0
    assert summary["sampler_drift_kl_k3_mean"] > 1e-6  # steps 2 and 3 were sampled by the weights before an update
    from safetensors.torch import load_file

    for role in ("policy", "rollout_model"):
        a, b = (load_file(tmp_path / r / "final" / role / "model.safetensors") for r in ("full", "cut"))
        assert all(torch.equal(a[key], b[key]) for key in a), role


def test_resuming_with_another_async_steps_is_refused(tmp_path, cache):
    args = ["train", "--no-progress", *TINY, f"cache_dir={cache}", "--out", str(tmp_path / "run")]
    cli_main([*args, "train.steps=1", "rollout.async_steps=1"])
    for k in (2, 0):
        with pytest.raises(InputError, match=f"written with rollout.async_steps=1, the run asks for {k}"):
            loop.setup(_cfg(cache, f"rollout.async_steps={k}"), tmp_path / "run", resume=True)


def test_ctrl_c_saves_the_batches_generated_ahead(tmp_path, cache, monkeypatch):
    real_step = loop.train_step

    def step_then_interrupt(run, step):
        values = real_step(run, step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives while the generator works on step 4's batch
        return values

    monkeypatch.setattr(loop, "train_step", step_then_interrupt)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt, match="after step 2"):
        loop.train(_cfg(cache, "train.steps=6", "rollout.async_steps=2"), out, progress=False)
    latest = ckpt.latest_checkpoint(out)
    assert latest.name == "step_000002"
    assert sorted(ckpt.load_local(latest)["inflight"]) == [3, 4]
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2]


def test_a_failing_generator_stops_the_run_with_one_error_naming_the_step(tmp_path, cache, monkeypatch):
    from jackpot.rollout.hf import HFRolloutEngine

    real = HFRolloutEngine.generate

    def fails_at_the_third_batch(self, *args, **kw):
        if self.holds_weights and kw["seed"] == fails_at_the_third_batch.seed:
            raise RuntimeError("out of memory (simulated)")
        return real(self, *args, **kw)

    from jackpot.seeding import SAMPLING_STREAM, step_seed

    cfg = _cfg(cache, "train.steps=5", "rollout.async_steps=1", "train.checkpoint_every=1")
    fails_at_the_third_batch.seed = step_seed(cfg.train.seed, 3, SAMPLING_STREAM)
    monkeypatch.setattr(HFRolloutEngine, "generate", fails_at_the_third_batch)
    out = tmp_path / "run"
    with pytest.raises(GeneratorError, match=r"failed on the batch of step 3: RuntimeError: out of memory") as info:
        loop.train(cfg, out, progress=False)
    assert "\n" not in str(info.value)
    # the checkpoint after step 2 would hold step 3's batch: it could not be written, the one after step 1 stands
    assert ckpt.latest_checkpoint(out).name == "step_000001"
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2]


@pytest.mark.parametrize(("override", "message"), [
    ("rollout.async_steps=-1", "rollout.async_steps must be an integer >= 0"),
    ("rollout.threads=2", "rollout.threads .* needs rollout.async_steps > 0"),
    ("rollout.threads=0", "rollout.threads must be a positive integer"),
    ("rollout.async_steps=1 rollout_model.lora_rank=4 parallel.rollout_model=fsdp",
     "rollout_model.lora_rank with parallel.rollout_model=fsdp cannot push its weights to the asynchronous"),
])
def test_bad_async_values_are_refused(override, message):
    with pytest.raises(InputError, match=message):
        build_config(None, override.split())
