"""The actor-policy gap controller's place in a step: the gap measured on the batch just sampled moves, before
the update, the distillation coefficient or the rollout model's learning rate (jackpot.core.control; METHOD.md
§10).

Once per step, between prepare and update:
    signal = mismatch/kl_k3, or mismatch/kl_k3_clipped (distill.signal; the latter logged by every decoupled run)
    control='coef':  coef' = kl_controlled_coef(coef, signal)       within distill.coef_min..coef_max
    control='lr':    m'    = kl_controlled_coef(m, signal)          within distill.lr_scale_min..lr_scale_max,
                     every parameter group of the rollout model's optimizer set to rollout_model.lr x m'
Without distill.target_kl nothing moves: the coefficient is distill.coef and the learning rate rollout_model.lr.
The state (`GapControl`) is what a checkpoint keeps (`saved` / `restored`), so a resumed run continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from jackpot import metric_names as names
from jackpot.core.control import kl_controlled_coef, log_kl_error

if TYPE_CHECKING:
    from jackpot.train.config import Config
    from jackpot.train.prepare import Prepared

COEF_STATE, LR_SCALE_STATE = "distill_coef", "rollout_lr_scale"  # checkpoint state.json keys
SIGNAL_KEYS = {"k3": names.MISMATCH_KL_K3, "k3-clipped": names.MISMATCH_KL_K3_CLIPPED}  # distill.signal -> metric


@dataclass
class GapControl:
    """What the controller carries from step to step."""

    coef: float | None = None
    """The last update's distillation coefficient (None: distill.coef, the starting value)."""
    lr_scale: float = 1.0
    """The multiplier of rollout_model.lr the last update used (control='lr')."""


def control_step(cfg: Config, state: GapControl, prep: Prepared,
                 rollout_opt: torch.optim.Optimizer | None) -> dict[str, float]:
    """Move `state` (in place) by the gap of the batch `prep` holds and set the rollout model's optimizer's
    learning rate from it; returns the step's metrics (the coefficient, the multiplier and the log-error, as they
    apply). The signal is prepare's (mismatch/kl_k3 or mismatch/kl_k3_clipped). Call before the update."""
    d, metrics = cfg.distill, {}
    if not cfg.trains_rollout_model:
        state.coef = d.coef
        return metrics
    if d.target_kl is None or d.control != "coef":
        state.coef = d.coef
    if d.target_kl is None or d.control != "lr":
        state.lr_scale = 1.0
    if d.target_kl is not None:
        signal = float(prep.metrics[SIGNAL_KEYS[d.signal]])  # prepare's k3, or its clipped one
        if d.control == "coef":
            state.coef = kl_controlled_coef(d.coef if state.coef is None else state.coef, signal,
                                            target=d.target_kl, rate=d.coef_rate, low=d.coef_min, high=d.coef_max)
        else:
            state.lr_scale = kl_controlled_coef(state.lr_scale, signal, target=d.target_kl, rate=d.coef_rate,
                                                low=d.lr_scale_min, high=d.lr_scale_max)
            metrics[names.ROLLOUT_MODEL_LR_SCALE] = state.lr_scale
        metrics[names.ROLLOUT_MODEL_DISTILL_KL_ERROR] = log_kl_error(signal, d.target_kl)
    if rollout_opt is not None:
        for group in rollout_opt.param_groups:
            group["lr"] = cfg.rollout_model.lr * state.lr_scale
    metrics[names.ROLLOUT_MODEL_DISTILL_COEF] = state.coef
    return metrics


def saved(cfg: Config, state: GapControl) -> dict[str, float]:
    """The controller's state for state.json: only what distill.target_kl moves (a fixed value is in the config,
    so a default checkpoint's state is as before)."""
    d = cfg.distill
    if d.target_kl is None:
        return {}
    return {COEF_STATE: state.coef} if d.control == "coef" else {LR_SCALE_STATE: state.lr_scale}


def restored(state_json: dict) -> GapControl:
    """The controller's state from a checkpoint's state.json (`saved`'s keys; absent: the starting values)."""
    return GapControl(coef=state_json.get(COEF_STATE), lr_scale=state_json.get(LR_SCALE_STATE, 1.0))


__all__ = ["GapControl", "control_step", "restored", "saved"]
