"""Every random draw of a run is seeded from (run seed, step, stream), identically on every process, so a
resumed run continues exactly as an uninterrupted one would and a batch split over processes draws what one
process would.

    stream 0  the prompts of a step (`Task.examples`)
    stream 1  the rejection uniforms, one per token (`row_uniforms`)
    stream 2  the mini-batch permutation of the update
    stream 3  the rollout engine's sampling uniforms, one per token (`row_uniforms`)
    stream 4  evaluation: its sampling uniforms (step 0, every evaluation of a run draws the same), and the
              seed of each generate call of `jackpot.eval.sample_and_score` (step = the call's index)
"""

from __future__ import annotations

import torch

PROMPT_STREAM, REJECTION_STREAM, MINIBATCH_STREAM, SAMPLING_STREAM, EVAL_STREAM = range(5)  # the table above


def step_seed(seed: int, step: int, stream: int) -> int:
    """A deterministic seed per (run seed, step, purpose) — identical across processes, for exact resume."""
    return (seed * 1_000_003 + step) * 16 + stream


def row_uniforms(seed: int, step: int, stream: int, global_rows: int, width: int, rows: range) -> torch.Tensor:
    """U(0, 1) (len(rows), width) for the global rows `rows` of a batch of `global_rows`: one table per
    (seed, step, stream), so a row's draws do not depend on how the batch is split over processes."""
    gen = torch.Generator().manual_seed(step_seed(seed, step, stream))
    return torch.rand(global_rows, width, generator=gen)[rows.start:rows.stop]


__all__ = ["EVAL_STREAM", "MINIBATCH_STREAM", "PROMPT_STREAM", "REJECTION_STREAM", "SAMPLING_STREAM", "row_uniforms",
           "step_seed"]
