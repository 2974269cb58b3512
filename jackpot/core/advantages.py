"""Group-relative advantages for GRPO-style training (one scalar per response, broadcast to tokens).

    grpo    (r - mean_g) / (std_g + eps)        Shao et al., DeepSeekMath (2024)
    drgrpo  r - mean_g                          Liu et al., "Understanding R1-Zero-like training" (2025)
    rloo    r - mean of the other G-1 responses  Ahmadian et al., "Back to basics" (2024)

std is the unbiased (G-1) standard deviation, as in TRL; a group whose rewards are all equal gets
advantage 0 under every mode.
"""

from __future__ import annotations

import torch

from jackpot.core.checks import check_finite

ADVANTAGE_MODES = ("grpo", "drgrpo", "rloo")


def group_advantages(rewards: torch.Tensor, *, mode: str = "grpo", eps: float = 1e-6) -> torch.Tensor:
    """rewards (N, G): N prompts with G responses each -> advantages (N, G)."""
    check_finite("rewards", rewards)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (num_prompts, group_size), got shape {tuple(rewards.shape)}")
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"mode must be one of {ADVANTAGE_MODES}, got {mode!r}")
    g = rewards.shape[1]
    if g < 2:
        raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {g}")
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if mode == "drgrpo":
        return centered
    if mode == "rloo":
        return centered * g / (g - 1)
    return centered / (rewards.std(dim=1, keepdim=True) + eps)
