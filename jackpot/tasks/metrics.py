"""Accuracy metrics over several sampled completions per problem.

`rewards` is an (N, n) array: N problems, n completions each, reward 1.0 for correct.

    mean@k  = mean of all N * k rewards (expected accuracy of one sample).
    pass@k  = mean over problems of 1 - C(n - c, k) / C(n, k), with c = number of correct samples:
              the unbiased estimator of "at least one of k samples is correct" from n >= k samples
              (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1),
              computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i) to avoid huge binomials.
"""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor | list


def _as_2d(rewards: ArrayLike) -> np.ndarray:
    if isinstance(rewards, torch.Tensor):
        rewards = rewards.detach().cpu().double().numpy()
    arr = np.asarray(rewards, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"rewards must be (N, n) with n >= 1, got shape {arr.shape}")
    return arr


def mean_at_k(rewards: ArrayLike) -> float:
    """Mean reward over all problems and samples: (N, k) -> float (nan when N == 0)."""
    arr = _as_2d(rewards)
    return float(arr.mean()) if arr.size else float("nan")


def pass_at_k(rewards: ArrayLike, k: int, *, threshold: float = 0.5) -> float:
    """Unbiased pass@k from (N, n) rewards; a sample is correct when its reward > `threshold`."""
    arr = _as_2d(rewards)
    n = arr.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if arr.shape[0] == 0:
        return float("nan")
    correct = (arr > threshold).sum(axis=1)
    # P(all k drawn without replacement are wrong) = prod_{i=n-c+1}^{n} (1 - k/i); zero if n - c < k.
    i = np.arange(1, n + 1, dtype=np.float64)
    factors = np.where(i[None, :] > (n - correct)[:, None], 1.0 - k / i[None, :], 1.0)
    p_fail = np.prod(factors, axis=1)
    p_fail[n - correct < k] = 0.0
    return float(np.mean(1.0 - p_fail))
