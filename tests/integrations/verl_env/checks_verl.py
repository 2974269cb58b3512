"""Jackpot inside verl, tested against the real verl package (run in the verl environment).

verl pins transformers < 5.11, so these checks run in their own virtual environment (`.venv-verl`,
made by .ci/run); tests/integrations/test_verl.py runs this file there. The file name does not match
`test_*.py`, so the main suite never collects it directly.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from verl import DataProto
from verl.trainer.config.algorithm import RolloutCorrectionConfig
from verl.trainer.ppo import core_algos, rollout_corr_helper
from verl.workers.config import ActorConfig

from jackpot.core.corrections import CorrectionInputs, jackpot
from jackpot.core.losses import aggregate, ppo_token_loss
from jackpot.integrations import verl as jv

torch.set_num_threads(1)


def _fresh(code: str, **env_overrides: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter of this environment, outside the repository, with no PYTHONPATH:
    only what is installed is importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VERL_USE_EXTERNAL_MODULES")}
    env.update(env_overrides)
    return subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True,
                          timeout=300)


def test_fresh_process_finds_the_loss_through_the_entry_point():
    code = ("from verl.trainer.ppo.core_algos import get_policy_loss_fn\n"
            "from verl.trainer.ppo import rollout_corr_helper as h\n"
            "fn = get_policy_loss_fn('jackpot')\n"
            "print(fn.__module__, fn.__name__, getattr(h.compute_rollout_correction_and_add_to_batch,"
            " '_jackpot_dispatch', False))\n")
    out = _fresh(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["jackpot.integrations.verl", "jackpot_policy_loss", "True"]
    # with verl's plugin discovery switched off, nothing registers it: the entry point is what does
    off = _fresh(code, VERL_USE_EXTERNAL_PLUGINS="none")
    assert off.returncode != 0 and "Unsupported loss mode: jackpot" in off.stderr


def _batch(seed: int = 0, B: int = 6, T: int = 9, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    rollout = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = rollout + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.7
    old = old.clamp_max(0.0)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    return old.to(dtype), rollout.to(dtype), mask


def _actor_config(**kw) -> ActorConfig:
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, ppo_mini_batch_size=4, **kw)


@pytest.mark.parametrize("section", [
    {"rollout_is": "jackpot", "rollout_is_threshold": 2.0, "jackpot": {"budget": 0.8}},
    {"rollout_is": "jackpot", "rollout_is_threshold": 3.0, "jackpot": {"lam": 1.5}},
    {"rollout_is": "jackpot", "rollout_is_threshold": None},
])
def test_batch_part_gives_jackpot_core_mask_and_weights_on_a_dataproto(section):
    old, rollout, mask = _batch()
    batch = DataProto.from_dict(tensors={"old_log_probs": old, "rollout_log_probs": rollout, "response_mask": mask,
                                         "advantages": torch.randn(old.shape)})
    torch.manual_seed(123)
    # the trainer calls this module attribute; the plugin made it dispatch rollout_is=jackpot to us
    out, metrics = rollout_corr_helper.compute_rollout_correction_and_add_to_batch(batch, OmegaConf.create(section))
    torch.manual_seed(123)
    u = torch.rand(old.shape, dtype=torch.float32)
    extra = section.get("jackpot", {})
    ref = jackpot(CorrectionInputs(rollout_logp=rollout, old_logp=old, mask=mask.float(), uniforms=u),
                  lam=extra.get("lam", 1.0), budget=extra.get("budget"), z="batch",
                  c1=section["rollout_is_threshold"])
    assert torch.equal(out.batch["response_mask"], (mask * ref.mask).long())
    assert 0 < ref.mask.sum() < mask.sum()  # the case rejects some tokens and keeps some
    torch.testing.assert_close(out.batch["rollout_is_weights"], ref.weights * ref.mask, rtol=0, atol=0)
    assert metrics["obrs/lambda"] == pytest.approx(float(ref.stats["obrs/lambda"]))
    assert metrics["rollout_corr/rollout_rs_masked_fraction"] == pytest.approx(1 - float(ref.stats["obrs/accept_rate"]))
    if "budget" in extra:
        assert metrics["obrs/accept_prob_mean"] == pytest.approx(extra["budget"], abs=1e-5)
    kept = ref.weights[ref.mask > 0].double()
    assert metrics["rollout_corr/rollout_is_mean"] == pytest.approx(kept.mean().item(), rel=1e-5)
    assert metrics["rollout_corr/rollout_is_max"] == pytest.approx(kept.max().item(), rel=1e-6)
    assert metrics["rollout_corr/rollout_is_eff_sample_size"] == pytest.approx(
        (kept.sum() ** 2 / (len(kept) * kept.square().sum())).item(), rel=1e-5)


def test_offpolicy_metrics_are_verls_own():
    old, rollout, mask = _batch(seed=3)
    tensors = {"old_log_probs": old, "rollout_log_probs": rollout, "response_mask": mask}
    _, ours = rollout_corr_helper.compute_rollout_correction_and_add_to_batch(
        DataProto.from_dict(tensors=dict(tensors)), OmegaConf.create({"rollout_is": "jackpot"}))
    _, verls = rollout_corr_helper.compute_rollout_correction_and_add_to_batch(
        DataProto.from_dict(tensors=dict(tensors)), OmegaConf.create({"rollout_is": None, "rollout_rs": None}))
    for key in ("kl", "k3_kl", "chi2_token", "chi2_seq", "log_ppl_diff", "ppl_ratio", "training_ppl", "rollout_ppl"):
        assert ours[f"rollout_corr/{key}"] == pytest.approx(verls[f"rollout_corr/{key}"], rel=1e-6), key


def test_other_rollout_is_modes_stay_verls():
    old, rollout, mask = _batch(seed=4)
    original = rollout_corr_helper.compute_rollout_correction_and_add_to_batch.__wrapped__
    for section in ({"rollout_is": "token", "rollout_is_threshold": 2.0},
                    {"rollout_is": "sequence", "rollout_is_threshold": 2.0, "rollout_rs": "token_k1",
                     "rollout_rs_threshold": "0.5_2.0"}):
        cfg = OmegaConf.create(section)
        a, ma = rollout_corr_helper.compute_rollout_correction_and_add_to_batch(
            DataProto.from_dict(tensors={"old_log_probs": old, "rollout_log_probs": rollout, "response_mask": mask}),
            cfg)
        b, mb = original(DataProto.from_dict(tensors={"old_log_probs": old, "rollout_log_probs": rollout,
                                                      "response_mask": mask}), cfg)
        assert ma == mb and not any(k.startswith("obrs/") for k in ma)
        assert torch.equal(a.batch["rollout_is_weights"], b.batch["rollout_is_weights"])
        assert torch.equal(a.batch["response_mask"], b.batch["response_mask"])


def test_typed_rollout_correction_config_uses_the_documented_defaults():
    old, rollout, mask = _batch(seed=5)
    cfg = RolloutCorrectionConfig(rollout_is="jackpot", rollout_is_threshold=2.0)
    torch.manual_seed(9)
    out, metrics = rollout_corr_helper.compute_rollout_correction_and_add_to_batch(
        DataProto.from_dict(tensors={"old_log_probs": old, "rollout_log_probs": rollout, "response_mask": mask}), cfg)
    assert metrics["obrs/lambda"] == 1.0
    assert out.batch["rollout_is_weights"].max() <= 2.0


@pytest.mark.parametrize("bad, match", [
    ({"rollout_is": "jackpot", "rollout_is_threshold": "0.5_2.0"}, "single rollout_is_threshold"),
    ({"rollout_is": "jackpot", "jackpot": {"budgett": 0.9}}, "unknown keys"),
    ({"rollout_is": "jackpot", "jackpot": {"budget": 1.5}}, "budget"),
])
def test_bad_settings_fail_with_one_clear_error(bad, match):
    old, rollout, mask = _batch()
    with pytest.raises(ValueError, match=match):
        rollout_corr_helper.compute_rollout_correction_and_add_to_batch(
            DataProto.from_dict(tensors={"old_log_probs": old, "rollout_log_probs": rollout, "response_mask": mask}),
            OmegaConf.create(bad))


def test_missing_rollout_log_probs_names_the_setting():
    old, _, mask = _batch()
    with pytest.raises(ValueError, match="calculate_log_probs"):
        jv.compute_jackpot_correction_and_add_to_batch(
            DataProto.from_dict(tensors={"old_log_probs": old, "response_mask": mask}),
            OmegaConf.create({"rollout_is": "jackpot"}))


def _loss_inputs(seed=0):
    old, rollout, mask = _batch(seed=seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 100)
    new = (old + 0.3 * torch.randn(old.shape, generator=g, dtype=torch.float64)).clamp_max(0.0)
    new[:, ::3] = (old[:, ::3] + 2.5).clamp_max(0.0)  # ratios up to e^2.5: both clips and the dual clip bind
    adv = torch.randn(old.shape[0], 1, generator=g, dtype=torch.float64).expand_as(old).contiguous()
    adv[::2] = -adv[::2].abs()
    u = torch.rand(old.shape, generator=g, dtype=torch.float64)
    res = jackpot(CorrectionInputs(rollout_logp=rollout, old_logp=old, mask=mask.double(), uniforms=u),
                  budget=0.8, z="batch", c1=2.0)
    return old, new, adv, mask * res.mask.long(), res.weights * res.mask


@pytest.mark.parametrize("clip, dual", [({}, 3.0), ({"clip_ratio_low": 0.2, "clip_ratio_high": 0.28}, 1.5)])
def test_loss_and_gradient_equal_jackpot_core(clip, dual):
    old, new, adv, keep, w = _loss_inputs()
    config = _actor_config(clip_ratio_c=dual, **clip)
    new_a = new.clone().requires_grad_(True)
    fn = core_algos.get_policy_loss_fn("jackpot")
    loss, metrics = fn(old_log_prob=old, log_prob=new_a, advantages=adv, response_mask=keep.bool(),
                       loss_agg_mode="token-mean", config=config, rollout_is_weights=w)
    loss.backward()
    new_b = new.clone().requires_grad_(True)
    per_token, diag = ppo_token_loss(new_b, old, adv, clip_eps=config.clip_ratio_low,
                                     clip_eps_high=config.clip_ratio_high, dual_clip=dual)
    ref = aggregate(per_token * w, keep.double(), "token-mean")
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_a.grad, new_b.grad, rtol=1e-12, atol=1e-12)
    assert new_a.grad[keep == 0].abs().max() == 0  # rejected and padding tokens get no gradient
    assert diag["clipped_lower"][keep > 0].any() and diag["clipped"][keep > 0].any()
    assert metrics["actor/pg_clipfrac"] == pytest.approx(float((diag["clipped"] * keep).sum() / keep.sum()))
    # and equal to verl's own vanilla PPO loss given the same weights and mask
    vanilla, _ = core_algos.get_policy_loss_fn("vanilla")(
        old_log_prob=old, log_prob=new, advantages=adv, response_mask=keep.bool(), loss_agg_mode="token-mean",
        config=config, rollout_is_weights=w)
    torch.testing.assert_close(loss.detach(), vanilla, rtol=1e-12, atol=1e-12)


def test_loss_uses_verls_global_batch_aggregation():
    old, new, adv, keep, w = _loss_inputs(seed=1)
    config = _actor_config()
    config.global_batch_info.update(dp_size=2, batch_num_tokens=int(keep.sum()) * 3, global_batch_size=None)
    loss, _ = jv.jackpot_policy_loss(old, new, adv, keep.bool(), "token-mean", config, w)
    per_token, _ = ppo_token_loss(new, old, adv, clip_eps=0.2, dual_clip=3.0)
    # verl's rule: local sum / global accepted tokens * dp_size (here 2/3 of the local token mean)
    local = aggregate(per_token * w, keep.double(), "token-mean")
    torch.testing.assert_close(loss, local * 2 / 3, rtol=1e-12, atol=1e-12)


def test_loss_without_batch_weights_refuses_to_run_as_plain_ppo():
    old, new, adv, keep, _ = _loss_inputs()
    with pytest.raises(ValueError, match="rollout_is=jackpot"):
        jv.jackpot_policy_loss(old, new, adv, keep.bool(), "token-mean", _actor_config(), None)
