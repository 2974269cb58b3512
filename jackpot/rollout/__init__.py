"""Rollout engines: sample responses and record token-level log-probs (see `base.RolloutBatch`)."""

from jackpot.rollout.base import RolloutBatch, RolloutEngine
from jackpot.rollout.hf import HFRolloutEngine, decode_responses, encode_prompts

__all__ = ["HFRolloutEngine", "RolloutBatch", "RolloutEngine", "decode_responses", "encode_prompts"]
