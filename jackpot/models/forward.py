"""Teacher-forced scoring of sampled responses: the hidden states and head a model scores them with, and the
model as the trainer wraps it (`HiddenStates`, `language_model`, `is_sharded`: below the trainer and the
engines, which both use them).

One forward pass over `prompt + response` (prompts left-padded, responses right-padded) gives, at
position `P - 1 + t`, the hidden state (through the output head, the logits) that predicts response token
`t`. Left padding shifts the real tokens, so position ids are recomputed from the mask,
`position_ids = cumsum(mask) - 1` (clamped at 0 on pad positions) — the same positions `generate` uses,
so the teacher-forced logits match the ones seen during generation (to ~1e-6 in float32). The (B, T, V)
logits are never formed here: `response_head` hands the chunked functions of `jackpot.core.head` the
hidden states and the head (a plain-forward reference for tests is `tests/reference.py`'s `response_logits`).

Dividing by the sampling temperature reproduces the distribution rollouts were drawn from when no
other logits processing (top-p, top-k) was applied.
"""

from __future__ import annotations

import torch
from torch import nn

from jackpot.core.dtypes import upcast
from jackpot.core.head import Head
from jackpot.errors import InputError


def _check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                  temperature: float) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, P + T), got shape {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    if not 1 <= response_len < input_ids.shape[1]:
        raise ValueError(f"response_len must be in [1, {input_ids.shape[1] - 1}] (at least one prompt "
                         f"column), got {response_len}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[ids]: (B, T, V), (B, T) -> (B, T) float32 (float64 for float64 logits).

    Memory: the logsumexp materialises one more (B, T, V) float32 buffer. That is fine for small
    vocabularies; with a 150k vocabulary, call this on chunks of the batch (or of T).
    """
    if logits.dim() != 3 or ids.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (B, T, V) and ids (B, T); got {tuple(logits.shape)} and "
                         f"{tuple(ids.shape)}")
    logits = upcast(logits)
    picked = logits.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


# Config attributes with which a model's head does more than `hidden @ W^T + b` (Gemma 2/3 soft-capping,
# Cohere's logit scale, Granite's logits scaling): the chunked head would compute the wrong distribution.
_NONLINEAR_HEAD_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The causal LM inside an adapter wrapper (peft's PeftModel, whose LoRA layers it holds), else itself."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (V, H), bias (V,) or None) of a causal LM's output embedding, tied or not.

    A clear error for a model whose logits are not a plain linear map of its last hidden states.
    """
    model = unwrap_peft(model)
    config = getattr(model, "config", None)
    for attr in _NONLINEAR_HEAD_ATTRS:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            raise InputError(f"{type(model).__name__} has config.{attr} = {value}: its logits are not a linear map "
                             "of the hidden states, which the chunked head (jackpot.core.head) assumes")
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(lm_head, nn.Linear):
        raise InputError(f"{type(model).__name__} exposes no linear output embedding (get_output_embeddings() "
                         f"returned {type(lm_head).__name__})")
    return lm_head.weight, lm_head.bias


def response_hidden(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_len: int,
) -> torch.Tensor:
    """The last hidden states that predict each response token: (B, T, H), in the model's dtype.

    Row t is the base model's output at position P - 1 + t (the input of the output embedding there),
    with the position ids `generate` uses (module docstring); no (B, T, V) logits are formed.
    """
    _check_inputs(input_ids, attention_mask, response_len, 1.0)
    model = unwrap_peft(model)
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise InputError(f"{type(model).__name__} has no separate base model to take hidden states from")
    mask = attention_mask.long()
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    out = base(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state[:, -(response_len + 1):-1, :]


def response_head(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_len: int,
    temperature: float = 1.0,
) -> Head:
    """The model's `Head` over the B x T response positions (row-major): `response_hidden` flattened to
    (B * T, H) with the output embedding and `temperature`, for the chunked per-vocabulary functions of
    `jackpot.core.head` (no (B, T, V) logits are formed). Gradients flow unless called under no_grad."""
    hidden = response_hidden(model, input_ids, attention_mask, response_len)
    weight, bias = output_head(model)
    return Head(hidden.reshape(-1, hidden.shape[-1]), weight, bias, temperature)


# ----------------------------------------------------------------------------- the model as the trainer wraps it
class HiddenStates(nn.Module):
    """A causal LM's forward as the trainer uses it: the last hidden states at the response positions.
    What DDP and FSDP2 wrap (their hooks run on a module's forward; `jackpot.train.distributed.wrap`)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int) -> torch.Tensor:
        return response_hidden(self.lm, input_ids, attention_mask, response_len)


def language_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a DDP / HiddenStates wrapper (itself when unwrapped)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model.lm if isinstance(model, HiddenStates) else model


def is_sharded(model: nn.Module) -> bool:
    """True for a model sharded over processes by FSDP2 (its weights gathered by a collective)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
