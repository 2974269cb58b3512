"""The rollout record every engine returns, and the engine Protocol.

A `RolloutBatch` holds B sampled responses to B prompts, token by token:

    prompt_ids     (B, P) long     left-padded with the pad id
    prompt_mask    (B, P) long     1 on prompt tokens, 0 on padding
    response_ids   (B, T) long     right-padded with the pad id after the first EOS
    response_mask  (B, T) float32  1.0 on generated tokens up to and including the first EOS, then 0.0
    rollout_logp   (B, T) float32  log q(sampled token), q = the distribution actually sampled from
                                   (after temperature / top-p), not the raw model softmax
    topk_ids       (B, T, K) long  the K most likely tokens under q, most likely first
    topk_logp  (B, T, K) float32  their log q, descending; -inf where top-p removed a token
    model_version  int             the version of the rollout model's weights that sampled this

Values at masked positions (`response_mask == 0`) are filler (0 log-probs, pad ids): always mask.
Engines know nothing of rewards; the trainer scores decoded responses separately.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

# Filler values for masked positions, used by engines and by `cat` when padding.
FILL_LOGPROB = 0.0


@dataclass
class RolloutBatch:
    """Token-level record of B sampled responses; shapes in the module docstring."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    rollout_logp: torch.Tensor
    topk_ids: torch.Tensor
    topk_logp: torch.Tensor
    model_version: int = 0
    pad_token_id: int = 0
    """Id used to pad prompts (left) and responses (right), also by `cat`."""

    def __post_init__(self) -> None:
        if self.prompt_ids.dim() != 2:
            raise ValueError(f"prompt_ids must be (B, P), got shape {tuple(self.prompt_ids.shape)}")
        B, P = self.prompt_ids.shape
        if self.response_ids.dim() != 2 or self.response_ids.shape[0] != B:
            raise ValueError(f"response_ids must be (B={B}, T), got shape {tuple(self.response_ids.shape)}")
        T = self.response_ids.shape[1]
        K = self.topk_ids.shape[-1] if self.topk_ids.dim() == 3 else None
        expected = {
            "prompt_mask": (B, P), "response_mask": (B, T), "rollout_logp": (B, T),
            "topk_ids": (B, T, K), "topk_logp": (B, T, K),
        }
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"{name} must have shape {shape} (B, P, T, K = {B}, {P}, {T}, {K}), "
                                 f"got {got}")

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, P + T) prompt followed by response."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P + T) long: 1 on prompt tokens and on response tokens up to the first EOS."""
        return torch.cat([self.prompt_mask.long(), self.response_mask.long()], dim=1)

    @property
    def prompt_len(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def response_len(self) -> int:
        return self.response_ids.shape[1]

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def _tensors(self) -> dict[str, torch.Tensor]:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}

    def to(self, device: torch.device | str) -> RolloutBatch:
        """A copy with every tensor on `device`."""
        return replace(self, **{k: v.to(device) for k, v in self._tensors().items()})

    def select(self, index: torch.Tensor) -> RolloutBatch:
        """The sub-batch of rows `index` (a (n,) long tensor, or a (B,) bool mask)."""
        if index.dim() != 1:
            raise ValueError(f"index must be 1-D, got shape {tuple(index.shape)}")
        index = index.to(self.prompt_ids.device)
        return replace(self, **{k: v[index] for k, v in self._tensors().items()})

    @classmethod
    def cat(cls, batches: list[RolloutBatch]) -> RolloutBatch:
        """Concatenate along B, left-padding prompts and right-padding responses to the longest.

        All batches must share K, `model_version` and `pad_token_id`.
        """
        if not batches:
            raise ValueError("batches must be a non-empty list of RolloutBatch")
        first = batches[0]
        for b in batches[1:]:
            for attr in ("model_version", "pad_token_id"):
                if getattr(b, attr) != getattr(first, attr):
                    raise ValueError(f"cannot cat batches with different {attr}: "
                                     f"{getattr(first, attr)} vs {getattr(b, attr)}")
            if b.topk_ids.shape[-1] != first.topk_ids.shape[-1]:
                raise ValueError(f"cannot cat batches with different K: {first.topk_ids.shape[-1]} "
                                 f"vs {b.topk_ids.shape[-1]}")
        P = max(b.prompt_len for b in batches)
        T = max(b.response_len for b in batches)
        pad = first.pad_token_id

        def stack(name: str, width: int, value: float, left: bool) -> torch.Tensor:
            parts = []
            for b in batches:
                x = getattr(b, name)
                extra = width - x.shape[1]
                spec = [0, 0] * (x.dim() - 2) + ([extra, 0] if left else [0, extra])
                parts.append(F.pad(x, spec, value=value))
            return torch.cat(parts, dim=0)

        return cls(
            prompt_ids=stack("prompt_ids", P, pad, left=True),
            prompt_mask=stack("prompt_mask", P, 0, left=True),
            response_ids=stack("response_ids", T, pad, left=False),
            response_mask=stack("response_mask", T, 0.0, left=False),
            rollout_logp=stack("rollout_logp", T, FILL_LOGPROB, left=False),
            topk_ids=stack("topk_ids", T, pad, left=False),
            topk_logp=stack("topk_logp", T, FILL_LOGPROB, left=False),
            model_version=first.model_version,
            pad_token_id=pad,
        )


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples responses from a model; declares what it can do, and stamps its rollouts with `model_version`.

    What an engine declares, so the trainer never asks which engine it holds:
    `per_row_uniforms`  True: `generate` samples each row from its `uniforms` (the `hf` engines); False: from a
                        per-request seed derived from `seed` and the row's identity (`vllm`). Either way a row's
                        sample does not depend on its batch companions.
    `max_topk`          the largest `topk` `generate` serves (None: any).
    `holds_weights`     True: the engine samples from a copy of the weights of its own (another dtype, another
                        process, an inference engine), which `sync_weights` must receive after every update;
                        False: it samples from the trainer's module itself and `sync_weights` gets None.
    `dtype`             the dtype of the weights it holds (None when it holds none).
    `exact_logprobs`    True: the recorded log-probs are the processed distribution sampled from, equal to a
                        teacher-forced forward of the same weights in the same dtype up to kernel numerics — so
                        the trainer may take them as the sampling model's old log-probs (train.recompute_old).
    `release()`         before an update: free what the engine holds on the device (a colocated vLLM sleeps;
                        the `hf` engines hold nothing of their own: a no-op). The engine wakes by itself, weights
                        before a push and KV cache before sampling; `resume()` wakes it without a push.
    The facts that hold for every engine of a kind are also in its `engines.EngineSpec`, readable before one is made.
    `close()` frees what the engine holds (its copy of the weights, an inference engine); its maker calls it.
    """

    model_version: int
    per_row_uniforms: bool
    max_topk: int | None
    holds_weights: bool
    dtype: torch.dtype | None
    exact_logprobs: bool

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, topk: int = 20, seed: int | None = None,
                 uniforms: torch.Tensor | None = None, synced: bool = False) -> RolloutBatch:
        """Sample one response per prompt row; prompt_ids/prompt_mask are (B, P), left-padded.

        `uniforms` (B, >= max_new_tokens): each row's draws, step by step, so a row's sample does not depend
        on the rest of the batch; `synced`: the model is sharded over processes (see `hf.HFRolloutEngine`)."""
        ...

    def release(self) -> None:
        """Free the engine's device memory until it is next used (see the class docstring)."""
        ...

    def resume(self) -> None:
        """Take back what `release` freed, weights as they were (see the class docstring)."""
        ...

    def sync_weights(self, weights: list[tuple[str, torch.Tensor]] | None, version: int) -> None:
        """Sample from these weights from now on, stamped `version`.

        `weights`: the named full tensors of the model's Hugging Face checkpoint in the engine's dtype
        (`jackpot.rollout.weights.checkpoint_weights`) when `holds_weights`, else None. The trainer calls it
        through `jackpot.rollout.weights.push_weights` after every update of the sampling model.
        """
        ...

    def close(self) -> None:
        """Free what the engine holds; it samples no more."""
        ...


def release_all(engines) -> None:
    """`release()` every engine of `engines` (before an update: colocated engines give their memory back)."""
    for engine in engines:
        engine.release()
