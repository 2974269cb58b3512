"""The trained weights as an engine that holds its own copy receives them, and the push after each update.

`checkpoint_weights(model, dtype)` is the Hugging Face checkpoint of the model as it is now: named full
tensors under the names `save_pretrained` writes, LoRA adapters merged into their base weights (on a copy:
the trained module keeps its adapters), FSDP2 shards gathered (every process gets every tensor: a
collective, so every process calls it), floating tensors cast to the engine's dtype.

`push_weights(engine, model, version)` is the one call the trainer makes before an engine samples: an engine
that holds its own weights (`engine.holds_weights`, e.g. vLLM) receives them, one that samples from the
trainer's module (`hf`) only the version. An engine already at `version` is left alone, so evaluating the
sampling model right after its update and sampling the next batch push the weights once.
"""

from __future__ import annotations

import copy

import torch

from jackpot.errors import InputError
from jackpot.models.forward import is_sharded, unwrap_peft

Weights = list[tuple[str, torch.Tensor]]


def has_adapters(model: torch.nn.Module) -> bool:
    """True for a peft (LoRA) model, whose adapters are merged before its weights leave it."""
    return callable(getattr(model, "merge_and_unload", None))


def merged_model(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with its LoRA adapters merged into full weights, on a copy; a model without adapters as is."""
    return copy.deepcopy(model).merge_and_unload() if has_adapters(model) else model


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def checkpoint_weights(model: torch.nn.Module, dtype: torch.dtype | None = None) -> Weights:
    """The named full tensors of `model`'s Hugging Face checkpoint, detached (module docstring)."""
    if is_sharded(model) and has_adapters(model):
        raise InputError("LoRA with parallel=fsdp cannot push weights to an engine holding its own copy "
                         "(rollout.engine=vllm): use parallel=ddp for a LoRA sampling model, or rollout.engine=hf")
    weights = []
    for name, tensor in merged_model(model).state_dict().items():
        tensor = _full(tensor).detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        weights.append((name, tensor))
    return weights


def push_weights(engine, model: torch.nn.Module, version: int) -> None:
    """Make `engine` sample from `model`'s current weights, stamped `version` (module docstring)."""
    if engine.model_version == version:  # versions start at 1: an engine at 0 was never pushed to
        return
    engine.sync_weights(checkpoint_weights(model, engine.dtype) if engine.holds_weights else None, version)


def model_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain Hugging Face model holding `model`'s checkpoint weights (LoRA merged, FSDP2 gathered: a collective),
    built from its config on the device and in the dtype of those weights, requiring no gradients."""
    from transformers import AutoModelForCausalLM

    weights = dict(checkpoint_weights(model))
    first = next(iter(weights.values()))
    lm = AutoModelForCausalLM.from_config(unwrap_peft(model).config, dtype=first.dtype).to(first.device)
    lm.load_state_dict(weights, strict=True)
    lm.generation_config = unwrap_peft(model).generation_config
    return lm.requires_grad_(False).eval()
