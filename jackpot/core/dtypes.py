"""Floating-point types: the parameter dtypes a user may name, and the precision the math runs in.

    DTYPES           the parameter dtypes by name ('float32', 'bfloat16', 'float16'): the one list that
                     configuration, command-line choices and model loading read
    compute_dtype(x) float32 for half-precision (and integer) tensors, float32 / float64 as they are:
                     log-softmax, ratios, weights and losses never run in half precision (e^SAFETY_BOUND =
                     4.9e8 overflows float16; bfloat16 rounds log-probs at 0.125 near |x| = 20)
    upcast(x)        x in its compute dtype (no copy when it already is)
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half-precision inputs; float32 / float64 as they are."""
    return torch.promote_types(x.dtype, torch.float32)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 when it is half precision (or integer); float32 / float64 tensors unchanged (no copy)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


__all__ = ["DTYPES", "compute_dtype", "upcast"]
