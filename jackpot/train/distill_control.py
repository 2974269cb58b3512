"""The distillation coefficient across steps, in one home: its value, its step and its place in a checkpoint.

distill.coef fixes it, unless distill.target_kl is set: then a controller adapts it each step to the gap just
measured (`jackpot.train.update.distill_coefficient`, the law in `jackpot.core.control`, METHOD.md §10), and
the value the last update used is part of the run's state (state.json `distill_coef`), so a resumed run goes
on from it. A fixed coefficient is in the config and nothing is saved.
"""

from __future__ import annotations

from jackpot.train.config import Config
from jackpot.train.update import distill_coefficient

DISTILL_COEF_STATE = "distill_coef"  # checkpoint state.json: the coefficient the last update used (target_kl)


class DistillCoefficient:
    """The rollout model's distillation coefficient: `value` is the last update's (None before the first:
    distill.coef)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.value: float | None = None

    def step(self, metrics: dict) -> tuple[float, dict[str, float]]:
        """This step's coefficient from prepare's `metrics`, and what it logs."""
        self.value, logged = distill_coefficient(self.cfg, self.value, metrics)
        return self.value, logged

    def state(self) -> dict:
        """What a checkpoint holds of it: the controller's value (a fixed coefficient is in the config)."""
        return {DISTILL_COEF_STATE: self.value} if self.cfg.distill.target_kl is not None else {}

    def restore(self, state: dict) -> None:
        self.value = state.get(DISTILL_COEF_STATE)
