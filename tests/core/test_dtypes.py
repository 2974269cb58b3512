"""The dtype table and the float32-or-wider upcast every numeric module uses (jackpot.core.dtypes)."""

from __future__ import annotations

import torch

from jackpot.core.dtypes import DTYPES, compute_dtype, upcast


def test_upcast_lifts_half_precision_and_keeps_float32_and_float64_as_they_are():
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.tensor([1.5, -2.25], dtype=dtype)
        assert upcast(x).dtype == compute_dtype(x) == torch.float32 and torch.equal(upcast(x), x.float())
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor([1.5, -2.25], dtype=dtype)
        assert upcast(x) is x and compute_dtype(x) == dtype  # no copy
    assert upcast(torch.tensor([1, 2])).dtype == torch.float32


def test_the_dtype_names_are_the_ones_configuration_accepts():
    from jackpot.train.config_checks import CHOICES

    assert tuple(DTYPES) == CHOICES["policy.dtype"] == CHOICES["rollout_model.dtype"] == \
        ("float32", "bfloat16", "float16")
