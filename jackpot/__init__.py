"""jackpot: RL post-training where the rollout model is not the trained model, corrected with OBRS.

Subpackages:
    core          pure tensor math (OBRS, corrections, losses, advantages, divergences)
    rollout       generation engines returning token-level rollout records
    tasks         prompts + verifiable rewards
    models        loading checkpoints, tiny offline models and tokenizer, pre-training
    train         configuration and the decoupled training loop
    integrations  adapters for other frameworks (verl)
"""

__version__ = "0.1.0"
