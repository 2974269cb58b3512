"""Mixed precision and the optimizer on one device, as the field trains: bfloat16 compute over float32 master weights.

`train.mixed_precision=bf16` runs the trainer's forwards and backwards under `torch.autocast(dtype=bfloat16)`:
matrix products take bfloat16 inputs (the GPU's tensor cores), while the parameters, their gradients and AdamW's
two moments stay float32 — the master weights that accumulate small updates bfloat16 would round away (Micikevicius
et al. 2018; the default of Hugging Face's Trainer `bf16=True`, TRL, and verl's FSDP workers, whose
`param_dtype=bf16` with `reduce_dtype=fp32` keeps an fp32 master copy). bfloat16 has float32's exponent range, so
no loss scaling is needed (unlike float16). Ops that autocast keeps in float32 (softmax, log-softmax, reductions)
stay there, and `jackpot.core` upcasts every log-probability and loss to float32 itself. Per parameter it costs
4 (weights) + 4 (gradient) + 8 (two moments) = 16 bytes plus bfloat16 activations: docs/SCALING.md.
A model loaded in bfloat16 (`policy.dtype=bfloat16`) instead trains pure bfloat16 (weights, gradients and moments:
8 bytes a parameter), which is why the option needs float32 models.

The rollout engine samples under the same autocast when it is the `hf` engine in the trainer's thread, so
`mismatch/*` compares two bfloat16 computations (a KV-cached generation and a teacher-forced forward), which is
the honest engine-versus-trainer gap; the vLLM engine has its own dtype (`rollout.dtype`).

`adamw(params, lr)`: torch's AdamW, fused (one kernel over all parameters) when every parameter is on CUDA,
else the default multi-tensor implementation; the same update either way (torch tests them against each other).

`gpu_head_chunk(vocab, device_bytes)`: a `train.head_chunk` for a GPU: the largest power of two whose float32
logits, with the softmax and gradient of the same shape (3 x chunk x V x 4 bytes), take at most HEAD_FRACTION of
the device, within [1024, 16384] (1024 is the CPU default; a longer chunk means fewer, larger kernels).
"""

from __future__ import annotations

import contextlib

import torch

MIXED_PRECISIONS = {"bf16": torch.bfloat16}  # train.mixed_precision -> the autocast dtype
HEAD_FRACTION = 0.02  # of device memory, for the chunked head's transient logits (gpu_head_chunk)
HEAD_CHUNK_BOUNDS = (1024, 16384)


def autocast(name: str | None, model: torch.nn.Module):
    """The context a training step runs in: autocast to `MIXED_PRECISIONS[name]` on `model`'s device, or nothing
    when `name` is None."""
    if name is None:
        return contextlib.nullcontext()
    device = next(model.parameters()).device
    return torch.autocast(device_type=device.type, dtype=MIXED_PRECISIONS[name])


def adamw(params: list[torch.nn.Parameter], lr: float) -> torch.optim.AdamW:
    """AdamW over `params`, fused when they are all on CUDA (module docstring)."""
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, **({"fused": True} if fused else {}))


def gpu_head_chunk(vocab: int, device_bytes: int) -> int:
    """A head chunk (positions) for a device of `device_bytes` and a vocabulary of `vocab` (module docstring)."""
    low, high = HEAD_CHUNK_BOUNDS
    budget = HEAD_FRACTION * device_bytes / (3 * vocab * 4)
    chunk = low
    while chunk * 2 <= min(budget, high):
        chunk *= 2
    return chunk
