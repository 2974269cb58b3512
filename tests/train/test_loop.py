"""The trainer end to end on tiny models: CLI run, checkpoints, exact resume, micro-batching invariance,
Jackpot == on-policy when both roles are the same model, and clear errors for bad configuration."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from cli_helpers import TINY_MODELS

from jackpot.cli import main as cli_main
from jackpot.errors import InputError
from jackpot.metrics import read_metrics
from jackpot.models.loading import build_tiny_qwen, load_model, save_model_and_tokenizer
from jackpot.models.tokenizer import build_char_tokenizer
from jackpot.train import checkpoint as ckpt
from jackpot.train.config import build_config
from jackpot.train.loop import collect, setup, train_step
from jackpot.train.prepare import model_head, prepare, sampled_logp
from jackpot.train.update import policy_loss, update

TINY = [
    *TINY_MODELS, "train.prompts_per_step=4", "train.group_size=4", "train.eval_prompts=8",
    "train.eval_samples=2", "train.eval_every=100", "tensorboard=false", "policy.lr=1e-3", "rollout_model.lr=1e-3",
]


def _cfg(cache, *extra):
    return build_config(None, [*TINY, f"cache_dir={cache}", *extra])


def _no_perf(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("perf/")}


def test_cli_two_steps_trains_both_models_and_checkpoints(tmp_path, cache):
    out = tmp_path / "run"
    cfg = _cfg(cache)
    before = setup(cfg, tmp_path / "init")
    assert cli_main(["train", "--out", str(out), "--no-progress", *TINY, f"cache_dir={cache}", "train.steps=2"]) == 0
    records = read_metrics(out)
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        for key in ("reward/mean", "mismatch/kl_k3", "obrs/accept_rate", "perf/rollout_s", "perf/update_s"):
            assert key in r and r[key] is not None and math.isfinite(r[key]), key
    assert "eval/accuracy" in records[0] and "eval/accuracy" in records[-1]
    # the engine's version stamp is read back: step s sampled with the weights after update s - 1 (version s)
    assert [(r["rollout/model_version"], r["rollout/staleness"]) for r in records[1:]] == [(1.0, 0.0), (2.0, 0.0)]
    # both models moved, and the checkpoint reloads into fresh models exactly
    after = setup(cfg, tmp_path / "reload")
    ckpt.load_checkpoint(ckpt.latest_checkpoint(out), after.models, after.optimizers)
    for name in ("policy", "rollout_model"):
        p0 = torch.cat([p.flatten() for p in before.models[name].parameters()])
        p1 = torch.cat([p.flatten() for p in after.models[name].parameters()])
        assert not torch.equal(p0, p1), f"{name} parameters did not change"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["accept_rate_mean"] is not None
    assert summary["staleness_mean"] == 0 and summary["rollout_wait_s_mean"] is None  # synchronous
    assert summary["sampler_drift_kl_k3_mean"] < 1e-6  # the sampling weights are the updated ones
    assert (out / "config.yaml").is_file()
    # the trained models as Hugging Face directories: what `jackpot eval --model` and from_pretrained load
    from jackpot.models.loading import load_model, load_tokenizer

    for name in ("policy", "rollout_model"):
        exported = load_model(str(out / "final" / name), dtype="float32", device=torch.device("cpu"))
        for (k, p), q in zip(after.models[name].state_dict().items(), exported.state_dict().values(), strict=True):
            assert torch.equal(p, q), f"{name}.{k}"
        assert load_tokenizer(str(out / "final" / name)).get_vocab() == after.tokenizer.get_vocab()
    assert not (out / ".tmp_final").exists()


def test_jackpot_eval_takes_the_exported_policy(tmp_path, cache):
    out = tmp_path / "run"
    assert cli_main(["train", "--out", str(out), "--no-progress", *TINY, f"cache_dir={cache}", "train.steps=1"]) == 0
    result = tmp_path / "eval.json"
    assert cli_main(["eval", "--model", str(out / "final" / "policy"), "--k", "2", "--prompts", "4",
                     "--out", str(result)]) == 0
    scores = json.loads(result.read_text())
    assert 0 <= scores["mean@2"] <= scores["pass@2"] <= 1


def test_resume_continues_exactly(tmp_path, cache):
    args = ["train", "--no-progress", *TINY, f"cache_dir={cache}"]
    cli_main([*args, "--out", str(tmp_path / "full"), "train.steps=3"])
    cli_main([*args, "--out", str(tmp_path / "cut"), "train.steps=2"])
    cli_main([*args, "--out", str(tmp_path / "cut"), "train.steps=3", "--resume"])
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == [0, 1, 2, 3]
    a, b = _no_perf(full[3]), _no_perf(cut[3])
    assert a.keys() == b.keys()
    for k in a:  # same seed, same CPU: bitwise-identical arithmetic
        assert a[k] == b[k], k


def _parameters(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    latest = ckpt.latest_checkpoint(run_dir)
    return {f"{name}.{k}": v for name in ("policy", "rollout_model")
            for k, v in load_file(str(latest / f"{name}.safetensors")).items()}


@pytest.mark.parametrize("control, moved", [("coef", "rollout_model/distill_coef"),
                                             ("lr", "rollout_model/lr_scale")])
def test_resume_continues_the_distillation_controller_exactly(tmp_path, cache, control, moved):
    """distill.target_kl far below the gap: the coefficient (control='coef') or the multiplier of the rollout
    model's lr (control='lr') climbs by e^0.1 a step (the log-error clipped at 1), so a resume that started again
    from its starting value would use e^0.1 instead of e^0.3 at step 3. The checkpoint keeps it: metrics and both
    models' parameters equal the uninterrupted run's."""
    args = ["train", "--no-progress", *TINY, f"cache_dir={cache}", "distill.target_kl=1e-4",
            f"distill.control={control}"]
    cli_main([*args, "--out", str(tmp_path / "full"), "train.steps=3"])
    cli_main([*args, "--out", str(tmp_path / "cut"), "train.steps=2"])
    cli_main([*args, "--out", str(tmp_path / "cut"), "train.steps=3", "--resume"])
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r[moved] for r in full[1:]] == pytest.approx([math.exp(0.1 * s) for s in (1, 2, 3)], rel=1e-12)
    a, b = _no_perf(full[3]), _no_perf(cut[3])
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], k
    pa, pb = _parameters(tmp_path / "full"), _parameters(tmp_path / "cut")
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


def test_the_adapted_coefficient_is_the_one_the_rollout_model_trains_with(tmp_path, cache):
    """One step with distill.target_kl (the coefficient moves from 1 to e^0.1 before the update) trains the
    rollout model exactly as a fixed distill.coef = e^0.1 does, and not as the starting value 1 does."""
    adapted = math.exp(0.1)

    def rollout_model_after_one_step(*extra):
        run = setup(_cfg(cache, *extra), tmp_path / str(len(list(tmp_path.iterdir()))))
        values = train_step(run, 1)
        return values, [p.detach().clone() for p in run.rollout_model.parameters()]

    values, controlled = rollout_model_after_one_step("distill.target_kl=1e-4")
    assert values["rollout_model/distill_coef"] == adapted and values["rollout_model/distill_kl_error"] == 1.0
    fixed_values, fixed = rollout_model_after_one_step(f"distill.coef={adapted!r}")
    assert fixed_values["rollout_model/distill_coef"] == adapted
    assert "rollout_model/distill_kl_error" not in fixed_values
    _, start = rollout_model_after_one_step()
    assert all(torch.equal(a, b) for a, b in zip(controlled, fixed, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(controlled, start, strict=True))


@pytest.mark.parametrize("overrides, message", [
    (["distill.target_kl=0"], r"^distill.target_kl must be > 0 or null, got 0.0$"),
    (["distill.target_kl=-0.05"], r"^distill.target_kl must be > 0 or null, got -0.05$"),
    (["distill.target_kl=0.1", "distill.coef_max=0"], r"^distill.coef_max must be > 0, got 0.0$"),
    (["distill.target_kl=0.1", "distill.coef_rate=-1"], r"^distill.coef_rate must be > 0, got -1.0$"),
    (["distill.target_kl=0.1", "distill.coef=0"], r"distill.coef \(0.0\), the controller's starting value, must lie"),
    (["distill.target_kl=0.1", "distill.coef_min=2", "distill.coef_max=1"], r"must lie in \[distill.coef_min"),
    (["distill.target_kl=0.1", "train.mode=on-policy"], r"distill.target_kl=0.1 needs a rollout model that is trained"),
    (["distill.target_kl=0.1", "distill.rollout_model=frozen"], r"needs a rollout model that is trained"),
])
def test_bad_distillation_control_is_refused_in_one_line(overrides, message):
    with pytest.raises(InputError, match=message) as err:
        build_config(None, overrides)
    assert "\n" not in str(err.value)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, cache):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        setup(_cfg(cache), tmp_path / "empty", resume=True)


def test_a_directory_holding_a_run_is_refused_before_anything_loads(tmp_path, cache):
    """One check (checkpoint.refuse_used_run_dir) serves `setup` and `jackpot train`: a directory with a
    run's metrics or checkpoints holds a run; an empty or unrelated one does not."""
    for name in ckpt.RUN_RECORDS:
        out = tmp_path / name.split(".")[0]
        out.mkdir()
        assert not ckpt.holds_run(out)
        (out / "notes.txt").write_text("mine")
        assert not ckpt.holds_run(out)
        (out / name).mkdir() if name == "checkpoints" else (out / name).write_text("")
        assert ckpt.holds_run(out)
        with pytest.raises(FileExistsError, match="already holds a run.*--resume"):
            setup(_cfg(cache, "cache_dir=/nonexistent/never-read"), out)


def _prepared(cfg, tmp_path, *, rollout_is_policy=False):
    run = setup(cfg, tmp_path)
    if rollout_is_policy:
        run.rollout_model = run.source.actor = copy.deepcopy(run.policy)  # the source samples from the actor it holds
    batch, rewards = collect(run, step=1)
    prep = prepare(cfg, batch, rewards, policy=run.policy, rollout_model=run.rollout_model, init_policy=None, step=1)
    return run, prep, rewards


@pytest.mark.parametrize("extra", [
    ["correction.name=jackpot"],
    ["correction.name=jackpot", "correction.z=topk"],
    ["correction.name=jackpot", "correction.budget=0.8", "train.loss_agg=token-mean-all"],
    ["correction.name=tis", "train.loss_agg=seq-mean-token-mean"],
    ["correction.name=icepop", "train.clip_eps=null", "distill.estimator=topk"],
])
def test_micro_batching_does_not_change_the_update(tmp_path, cache, extra):
    cfg_full = _cfg(cache, *extra)
    cfg_micro = _cfg(cache, *extra, "train.micro_batch_size=2")
    run, prep, rewards = _prepared(cfg_full, tmp_path)
    results = []
    for cfg in (cfg_full, cfg_micro):
        # each config prepares the batch itself (micro-batched forward passes, batch-wide kappa / lambda)
        prep = prepare(cfg, prep.batch, rewards, policy=run.policy, rollout_model=run.rollout_model,
                       init_policy=None, step=1)
        # tiny barely-trained models rarely earn a reward: non-zero advantages make the policy gradient real
        prep.advantages = torch.randn(prep.advantages.shape, generator=torch.Generator().manual_seed(0))
        policy, rollout = copy.deepcopy(run.policy), copy.deepcopy(run.rollout_model)
        # SGD with lr 1: the parameter change is exactly the accumulated gradient
        update(cfg, prep, policy=policy, rollout_model=rollout, step=1,
               policy_opt=torch.optim.SGD(policy.parameters(), lr=1.0),
               rollout_opt=torch.optim.SGD(rollout.parameters(), lr=1.0))
        results.append([p.detach().clone() for p in [*policy.parameters(), *rollout.parameters()]])
    initial = [p.detach() for p in [*run.policy.parameters(), *run.rollout_model.parameters()]]
    assert all(not torch.equal(a, p0) for a, p0 in zip(results[0], initial) if a.dim() > 1)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_jackpot_loss_equals_on_policy_loss_for_identical_models(tmp_path, cache):
    cfg_j = _cfg(cache, "correction.name=jackpot", "correction.lam=1.0")
    cfg_n = _cfg(cache, "correction.name=none")
    run, prep_j, rewards = _prepared(cfg_j, tmp_path, rollout_is_policy=True)
    prep_n = prepare(cfg_n, prep_j.batch, rewards, policy=run.policy, rollout_model=None, init_policy=None, step=1)
    mask = prep_j.batch.response_mask
    # identical models: r = 1 up to engine numerics (~1e-6), so every token is accepted with weight ~1
    assert torch.equal(prep_j.correction.mask, mask)
    torch.testing.assert_close(prep_j.correction.weights * mask, mask, rtol=0, atol=1e-4)
    head = model_head(run.policy, prep_j.batch, cfg_j.sampling.temperature)
    new_logp = sampled_logp(cfg_j, head, prep_j.batch.response_ids)
    loss_j, _ = policy_loss(cfg_j, prep_j, new_logp, mask.sum())
    loss_n, _ = policy_loss(cfg_n, prep_n, new_logp, mask.sum())
    torch.testing.assert_close(loss_j, loss_n, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("override, message", [
    ("train.steps=0", "train.steps"),
    ("correction.name=magic", "correction.name"),
    ("correction.budget=1.5", "correction.budget"),
    ("sampling.top_p=0", "sampling.top_p"),
    ("train.minibatches=3", "train.minibatches"),
    ("policy.lr=-1", "policy.lr"),
    ("nonsense.key=1", "nonsense"),
    ("distill.is_cap=0", "distill.is_cap"),
    ("train.group_size=1", "group_size"),
    ("correction.target=ref", r"correction.target must be one of \['old', 'new'\], got 'ref' \('ref' is now 'old'\)"),
    ("correction.name={a: 1}", "correction.name"),  # not a string: no rename hint looked up
])
def test_bad_config_values_name_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        build_config(None, [override])


def test_exact_z_with_nucleus_sampling_is_refused():
    with pytest.raises(ValueError, match="top_p"):
        build_config(None, ["sampling.top_p=0.9"])
    build_config(None, ["sampling.top_p=0.9", "correction.z=topk"])


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        build_config(str(tmp_path / "nope.yaml"))


def test_mismatched_tokenizers_are_refused(tmp_path, cache):
    tok = build_char_tokenizer()
    other = copy.deepcopy(tok)
    other.add_tokens(["<extra>"])
    model = build_tiny_qwen(len(other), hidden_size=16, num_layers=1, num_heads=2, seed=0,
                            pad_token_id=other.pad_token_id, eos_token_id=other.eos_token_id,
                            bos_token_id=other.bos_token_id)
    save_model_and_tokenizer(model, other, tmp_path / "other")
    load_model(tmp_path / "other")  # loads fine on its own
    with pytest.raises(ValueError, match="tokenizer"):
        setup(_cfg(cache, f"rollout_model.path={tmp_path / 'other'}"), tmp_path / "run")


def test_ctrl_c_finishes_the_step_and_saves_a_checkpoint(tmp_path, cache, monkeypatch):
    import os
    import signal

    from jackpot.train import loop

    real_step = loop.train_step

    def step_then_interrupt(run, step):
        values = real_step(run, step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step: the step still completes
        return values

    monkeypatch.setattr(loop, "train_step", step_then_interrupt)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt, match="after step 2"):
        loop.train(_cfg(cache, "train.steps=5"), out, progress=False)
    assert ckpt.latest_checkpoint(out).name == "step_000002"
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_resume_uses_the_runs_saved_config_and_a_used_directory_is_refused(tmp_path, cache):
    out = tmp_path / "run"
    args = ["train", "--no-progress", "--out", str(out), *TINY, f"cache_dir={cache}"]
    cli_main([*args, "train.steps=1", "correction.name=tis"])
    with pytest.raises(FileExistsError, match="--resume"):
        cli_main([*args, "train.steps=1"])
    # resumed with only the step count: the saved config (TIS) is kept, not the defaults (Jackpot)
    cli_main(["train", "--no-progress", "--out", str(out), "--resume", "train.steps=2"])
    last = read_metrics(out)[-1]
    assert last["step"] == 2 and "tis/weight_mean" in last and "obrs/accept_rate" not in last


def test_loss_metrics_do_not_depend_on_micro_batching(tmp_path, cache):
    logged = []
    for extra in ([], ["train.micro_batch_size=2"]):
        cfg = _cfg(cache, *extra)
        run, prep, _ = _prepared(cfg, tmp_path / str(len(extra)))
        prep.advantages = torch.randn(prep.advantages.shape, generator=torch.Generator().manual_seed(0))
        logged.append(update(cfg, prep, policy=run.policy, rollout_model=run.rollout_model, step=1,
                             policy_opt=torch.optim.SGD(run.policy.parameters(), lr=0.0),
                             rollout_opt=torch.optim.SGD(run.rollout_model.parameters(), lr=0.0)))
    for key in ("policy/loss", "rollout_model/ppo_loss", "rollout_model/distill_kl"):
        torch.testing.assert_close(logged[0][key], logged[1][key], rtol=1e-5, atol=1e-7)


def test_generation_in_chunks_equals_all_at_once(tmp_path, cache):
    """rollout.batch_size bounds the sequences generated at once; each row's draws are its own, so the
    batch is the same (ids, masks, log-probs) as generating all 16 rows together."""
    whole, _ = collect(setup(_cfg(cache), tmp_path / "whole"), step=1)
    chunked, _ = collect(setup(_cfg(cache, "rollout.batch_size=3"), tmp_path / "chunked"), step=1)
    assert len(whole) == len(chunked) == 16
    w = whole.response_len
    assert chunked.response_len == w and torch.equal(chunked.response_ids, whole.response_ids)
    assert torch.equal(chunked.response_mask, whole.response_mask)
    torch.testing.assert_close(chunked.rollout_logp, whole.rollout_logp, atol=1e-5, rtol=0)


def test_evaluation_samples_with_the_configured_nucleus(tmp_path, cache, monkeypatch):
    """The trainer's evaluation uses sampling.top_p (as `jackpot eval` does), with its own temperature."""
    from jackpot.rollout.hf import HFRolloutEngine

    seen = []
    real = HFRolloutEngine.generate

    def spy(self, *args, **kw):
        seen.append(kw)
        return real(self, *args, **kw)

    monkeypatch.setattr(HFRolloutEngine, "generate", spy)
    run = setup(_cfg(cache, "sampling.top_p=0.9", "correction.z=topk", "train.eval_temperature=0.5"), tmp_path)
    from jackpot.train.loop import evaluate

    evaluate(run, run.policy, 1)
    assert seen and seen[-1]["top_p"] == 0.9 and seen[-1]["temperature"] == 0.5


@pytest.mark.parametrize("mode", ["on-policy", "decoupled"])
def test_trainer_log_probs_are_those_of_the_sampling_temperature(tmp_path, cache, mode):
    """At sampling.temperature != 1 the trainer's p_old (and p_omega_old) are the distribution the engine
    sampled from: on-policy p_old equals the engine's recorded p_inf, decoupled p_omega_old does, and the
    first PPO ratio of the update (p_new / p_old before any step) is exactly 1."""
    cfg = _cfg(cache, f"train.mode={mode}", "sampling.temperature=0.6", "train.minibatches=1", "train.ppo_epochs=1")
    run = setup(cfg, tmp_path)
    batch, rewards = collect(run, step=1)
    prep = prepare(cfg, batch, rewards, policy=run.policy, rollout_model=run.rollout_model, init_policy=None, step=1)
    m = batch.response_mask.bool()
    sampler_logp = prep.old_logp if mode == "on-policy" else prep.rollout_model_old_logp
    torch.testing.assert_close(sampler_logp[m], batch.rollout_logp[m], atol=1e-5, rtol=0)
    assert float(prep.metrics["mismatch/rollout_model_kl_k3"]) < 1e-9
    if mode == "on-policy":
        assert float(prep.metrics["mismatch/kl_k3"]) < 1e-9
    record = update(cfg, prep, policy=run.policy, rollout_model=run.rollout_model, step=1,
                    policy_opt=torch.optim.SGD(run.policy.parameters(), lr=0.0), rollout_opt=None)
    assert float(record["policy/ratio_mean"]) == 1.0


def test_target_new_correction_is_that_of_the_sampling_temperature(tmp_path, cache):
    """target='new' recomputes the correction from the policy being optimised, at sampling.temperature: at
    the first mini-batch that policy is p_old, so its correction equals target='old''s, statistic for
    statistic (same uniforms, same kappa)."""
    base = ["sampling.temperature=0.6", "correction.z=topk", "train.minibatches=1", "train.ppo_epochs=1"]
    cfg_old, cfg_new = _cfg(cache, *base), _cfg(cache, *base, "correction.target=new")
    run = setup(cfg_old, tmp_path)
    batch, rewards = collect(run, step=1)
    kw = dict(policy=run.policy, rollout_model=run.rollout_model, init_policy=None, step=1)
    old = prepare(cfg_old, batch, rewards, **kw).metrics
    prep_new = prepare(cfg_new, batch, rewards, **kw)
    assert prep_new.correction is None
    record = update(cfg_new, prep_new, policy=run.policy, rollout_model=run.rollout_model, step=1,
                    policy_opt=torch.optim.SGD(run.policy.parameters(), lr=0.0), rollout_opt=None)
    keys = [k for k in old if k.startswith("obrs/")]
    assert "obrs/accept_rate" in keys and "obrs/kappa" in keys
    for k in keys:
        torch.testing.assert_close(record[k], old[k].float(), rtol=1e-6, atol=1e-7, msg=k)


def test_a_padding_micro_batch_adds_nothing_to_loss_gradient_or_metrics(tmp_path, cache):
    """Several processes give every rank as many micro-batches as the busiest; the extra ones are a row with
    its response mask and correction zeroed (`Prepared.padding`): the forward runs, nothing else counts."""
    cfg = _cfg(cache, "train.kl_coef=0.5")
    run, prep, _ = _prepared(cfg, tmp_path)
    prep.init_logp = prep.old_logp - 0.3  # the KL-to-init term is on, with non-zero values
    pad = prep.padding()
    assert pad.is_padding and len(pad.batch) == 1 and float(pad.batch.response_mask.sum()) == 0
    assert float(pad.correction.mask.sum()) == 0 and float(pad.correction.weights.abs().sum()) == 0
    new_logp = sampled_logp(cfg, model_head(run.policy, pad.batch, cfg.sampling.temperature), pad.batch.response_ids)
    loss, stats = policy_loss(cfg, pad, new_logp, torch.tensor(7.0))
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(p.grad is None or not p.grad.any() for p in run.policy.parameters())
    assert all(float(n) == 0 and (d is None or float(d) == 0) for n, d in stats.values())
