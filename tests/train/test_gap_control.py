"""The actor-policy gap controller (jackpot.train.gap_control): each actuator changes exactly what it claims
(the distillation coefficient, or the rollout model's learning rate), the robust signal, exact resume with the
controller's state (tests/train/test_loop.py), and bad values refused in one line."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from test_loop import _cfg

from jackpot.core.divergences import clipped_kl_k3
from jackpot.errors import InputError
from jackpot.train.config import build_config
from jackpot.train.gap_control import GapControl, control_step, restored, saved
from jackpot.train.loop import setup, train_step

FAR_BELOW = "distill.target_kl=1e-4"  # far below any gap: the controlled value climbs by e^0.1 a step


def _after_one_step(tmp_path, cache, *extra):
    run = setup(_cfg(cache, *extra), tmp_path / str(len(list(tmp_path.iterdir()))))
    values = train_step(run, 1)
    return values, {name: [p.detach().clone() for p in m.parameters()] for name, m in run.models.items()}, run


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_the_lr_actuator_moves_the_rollout_models_learning_rate_and_nothing_else(tmp_path, cache):
    """control='lr': one step moves the multiplier from 1 to e^0.1 before the update, so the rollout model trains
    exactly as with rollout_model.lr = 1e-3 x e^0.1 fixed, not as with 1e-3; the coefficient stays distill.coef,
    and the policy's update is the uncontrolled one."""
    scaled = 1e-3 * math.exp(0.1)
    values, controlled, run = _after_one_step(tmp_path, cache, FAR_BELOW, "distill.control=lr")
    assert values["rollout_model/lr_scale"] == pytest.approx(math.exp(0.1), rel=1e-12)
    assert values["rollout_model/distill_coef"] == 1.0 and values["rollout_model/distill_kl_error"] == 1.0
    assert [g["lr"] for g in run.rollout_opt.param_groups] == pytest.approx([scaled], rel=1e-12)
    assert [g["lr"] for g in run.policy_opt.param_groups] == [1e-3]
    _, fixed, _ = _after_one_step(tmp_path, cache, f"rollout_model.lr={scaled!r}")
    _, start, _ = _after_one_step(tmp_path, cache)
    assert _same(controlled["rollout_model"], fixed["rollout_model"])
    assert not _same(controlled["rollout_model"], start["rollout_model"])
    assert _same(controlled["policy"], start["policy"])


def test_the_coef_actuator_leaves_the_learning_rate_alone(tmp_path, cache):
    values, _, run = _after_one_step(tmp_path, cache, FAR_BELOW)
    assert values["rollout_model/distill_coef"] == math.exp(0.1) and "rollout_model/lr_scale" not in values
    assert [g["lr"] for g in run.rollout_opt.param_groups] == [1e-3]


def test_every_decoupled_run_logs_the_robust_signal(tmp_path, cache, monkeypatch):
    """prepare computes it from p_old against p_inf at the response tokens (the same tensors as mismatch/kl_k3)."""
    from jackpot.train import loop

    seen, real = {}, loop.prepare

    def spy(*args, **kwargs):
        seen["prep"] = real(*args, **kwargs)
        return seen["prep"]

    monkeypatch.setattr(loop, "prepare", spy)
    values, _, _ = _after_one_step(tmp_path, cache)
    prep = seen["prep"]
    expected = clipped_kl_k3(prep.old_logp, prep.batch.rollout_logp, prep.batch.response_mask, cap=10.0)
    assert values["mismatch/kl_k3_clipped"] == pytest.approx(float(expected), rel=1e-6)
    assert 0 <= values["mismatch/kl_k3_clipped"] <= values["mismatch/kl_k3"] + 1e-7
    on_policy, _, _ = _after_one_step(tmp_path, cache, "train.mode=on-policy")
    assert "mismatch/kl_k3_clipped" not in on_policy and "rollout_model/distill_coef" not in on_policy


def test_the_clipped_k3_bounds_each_tokens_share():
    """Four tokens: three identical (rho = 1, k3 = 0) and one with log rho = 10 (k3 = e^10 - 11 = 22,015.5),
    one masked token of any value: the mean k3 is 5,503.9, the clipped one (cap 10) is 10 / 4."""
    sample = torch.full((1, 5), -30.0)
    other = sample.clone()
    other[0, 3] = sample[0, 3] + 10.0
    other[0, 4] = sample[0, 4] + 25.0  # masked out
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    assert float(clipped_kl_k3(other, sample, mask, cap=10.0)) == pytest.approx(2.5, rel=1e-6)
    assert float(clipped_kl_k3(other, sample, mask, cap=1e9)) == pytest.approx((math.exp(10) - 11) / 4, rel=1e-5)
    with pytest.raises(ValueError, match="cap must be a finite number > 0"):
        clipped_kl_k3(other, sample, mask, cap=0.0)


def _prep(kl_k3: float, log_ratio_of_one_token: float):
    """A one-row batch: 4 tokens, log p_inf = -20 each, p_old equal but at one token; prepare's k3 given apart."""
    rollout = torch.full((1, 4), -20.0)
    old = rollout.clone()
    old[0, 0] += log_ratio_of_one_token
    mask = torch.ones(1, 4)
    return SimpleNamespace(metrics={"mismatch/kl_k3": torch.tensor(kl_k3),  # as prepare logs them
                                    "mismatch/kl_k3_clipped": clipped_kl_k3(old, rollout, mask, cap=10.0)})


@pytest.mark.parametrize("signal, error", [("k3", 1.0), ("k3-clipped", math.log(2.5 / 5.0))])
def test_the_controller_reads_the_signal_it_is_given(signal, error):
    """One token of log-ratio 10 in a batch of 4: prepare's k3 says 5,504 (far above a target of 5), the clipped
    signal (cap 10) says 2.5 (half the target): the controller moves the coefficient up or down accordingly."""
    cfg = build_config(None, ["distill.target_kl=5", f"distill.signal={signal}"])
    state = GapControl()
    metrics = control_step(cfg, state, _prep(5504.0, 10.0), None)
    assert metrics["rollout_model/distill_kl_error"] == pytest.approx(error, rel=1e-6)
    assert state.coef == pytest.approx(math.exp(0.1 * error), rel=1e-6)


def test_without_a_target_nothing_moves_whatever_came_before():
    """target_kl None: distill.coef and rollout_model.lr every step (a stale state is ignored); the coefficient is
    logged when the rollout model is trained, not otherwise. Nothing joins a checkpoint."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    cfg = build_config(None, ["distill.coef=0.3"])
    state = GapControl(coef=7.0, lr_scale=4.0)
    metrics = control_step(cfg, state, _prep(0.4, 0.1), opt)
    assert state == GapControl(coef=0.3, lr_scale=1.0) and metrics["rollout_model/distill_coef"] == 0.3
    assert opt.param_groups[0]["lr"] == 3e-5
    assert saved(cfg, state) == {}
    for frozen in (["train.mode=on-policy"], ["distill.rollout_model=frozen"]):
        metrics = control_step(build_config(None, frozen), GapControl(), _prep(0.4, 0.1), None)
        assert "rollout_model/distill_coef" not in metrics


def test_the_checkpoint_keeps_what_the_controller_moves():
    coef = build_config(None, ["distill.target_kl=0.2"])
    lr = build_config(None, ["distill.target_kl=0.2", "distill.control=lr"])
    state = GapControl(coef=2.0, lr_scale=0.5)
    assert saved(coef, state) == {"distill_coef": 2.0} and saved(lr, state) == {"rollout_lr_scale": 0.5}
    assert restored({"step": 3, **saved(lr, state)}) == GapControl(coef=None, lr_scale=0.5)
    assert restored({"step": 3}) == GapControl()


@pytest.mark.parametrize("overrides, message", [
    (["distill.control=steps"], r"^distill.control must be one of"),
    (["distill.signal=k2"], r"^distill.signal must be one of"),
    (["distill.signal_cap=0"], r"^distill.signal_cap must be > 0, got 0.0$"),
    (["distill.lr_scale_max=-1"], r"^distill.lr_scale_max must be > 0, got -1.0$"),
    (["distill.target_kl=0.1", "distill.control=lr", "distill.lr_scale_min=2"],
     r"^distill.control='lr' starts the multiplier of rollout_model.lr at 1, which must lie in "
     r"\[distill.lr_scale_min, distill.lr_scale_max\] = \[2.0, 10.0\]$"),
])
def test_bad_controller_values_are_refused_in_one_line(overrides, message):
    with pytest.raises(InputError, match=message) as err:
        build_config(None, overrides)
    assert "\n" not in str(err.value)
