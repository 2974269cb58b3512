"""Rollouts with Hugging Face `model.generate` (sampling, KV cache), recording token log-probs.

The recorded `rollout_logp` / `topk_logp` are those of the distribution tokens were actually drawn
from, q = softmax(top_p(logits / temperature)), not of the raw model softmax: importance weights
between rollout model and policy must use q.

How q is obtained: we run `generate` with HF's own warpers switched off (temperature 1, top_k 0,
top_p 1) and pass our own processor list [Temperature, TopP, _Recorder]. `generate` appends custom
processors after its defaults and samples from softmax of the last processor's output, so the
recorder, last in line, sees exactly the scores that are sampled from. The model's own
`generation_config` (hub checkpoints ship e.g. temperature 0.6, top_k 20) is swapped for a neutral
one during the call so none of its fields leak into sampling, and the model is put in eval mode
(no dropout) for the call, then restored.

Sampling with `uniforms` (B, max_new_tokens), one U(0, 1) per row and step: the recorder draws the token
itself by inverting q's cumulative distribution (in float64) at the row's uniform and hands `generate`
scores that put all mass on it. A row's sample then depends on its own uniforms and logits only — not
on which other rows share the batch — so a batch split over several processes samples exactly what one
process would (the trainer seeds each row's uniforms by its global index). Without `uniforms`,
`generate` samples with torch's RNG as usual.

Memory: unlike `output_scores=True`, which keeps T tensors of (B, V) float32 (T * B * 150k floats
for a real vocabulary), the recorder keeps only one step's (B, V) log-probs plus (B, K) per step.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from jackpot.errors import InputError
from jackpot.rollout.base import FILL_LOGPROB, RolloutBatch
from jackpot.rollout.text import check_generate_args, default_eos_ids, response_mask_from_ids
from jackpot.rollout.weights import model_copy


class _Recorder(LogitsProcessor):
    """Records log q of each sampled token and the top-k of q, step by step (see module docstring).

    At step t the sampled token of step t - 1 is the last column of `input_ids`, so the previous
    step's (B, V) log-probs are kept until then; `finish` handles the last step.
    """

    def __init__(self, k: int, uniforms: torch.Tensor | None = None):
        self.k = k
        self.uniforms = uniforms
        self.sampled: list[torch.Tensor] = []
        self.topk_ids: list[torch.Tensor] = []
        self.topk_logp: list[torch.Tensor] = []
        self._prev: torch.Tensor | None = None

    def _gather_prev(self, tokens: torch.Tensor) -> None:
        self.sampled.append(self._prev.gather(-1, tokens.view(-1, 1)).squeeze(-1))
        self._prev = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._prev is not None:
            self._gather_prev(input_ids[:, -1])
        logq = torch.log_softmax(scores.float(), dim=-1)
        values, ids = logq.topk(min(self.k, logq.shape[-1]), dim=-1)  # sorted, descending
        self.topk_ids.append(ids)
        self.topk_logp.append(values)
        self._prev = logq
        if self.uniforms is None:
            return scores
        return point_mass(scores, inverse_cdf(logq, self.uniforms[:, len(self.topk_ids) - 1]))

    def finish(self, last_tokens: torch.Tensor) -> None:
        if self._prev is not None:
            self._gather_prev(last_tokens)


def inverse_cdf(logq: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(B, V) log-probs, (B,) uniforms -> (B,) ids: the first id whose cumulative probability exceeds u
    (float64, so a 150k vocabulary adds no visible rounding; ids of probability 0 are never drawn)."""
    cdf = logq.double().exp().cumsum(-1)
    ids = torch.searchsorted(cdf, (u.to(cdf) * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return ids.clamp_max(logq.shape[-1] - 1)


def point_mass(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Scores whose softmax is 1 at `ids` and 0 elsewhere: `generate` then samples exactly `ids`."""
    out = torch.full_like(scores, float("-inf"))
    return out.scatter_(-1, ids.view(-1, 1), 0.0)


class HFRolloutEngine:
    """A `RolloutEngine` over a Hugging Face causal LM and its tokenizer.

    By default it samples from the model object it is given, the trainer's own module (no copy of the weights:
    `sync_weights` receives None and only stamps the version). `own_copy=True` makes it sample from a copy of
    its own (LoRA merged), which `sync_weights` overwrites in place with the pushed checkpoint weights: sampling
    then never races with updates of the trained module (a background generator).
    `cache_implementation`: None for transformers' dynamic KV cache, "static" for a pre-allocated one
    (`benchmarks/bench_rollout_engines.py` measures both).
    """

    per_row_uniforms = True
    """Samples each row from its `uniforms` when given (module docstring)."""
    max_topk = None
    exact_logprobs = True
    """Records the processed scores `generate` samples from: a teacher-forced forward of the same weights gives
    them to ~1e-6 in float32 (tests/rollout/test_hf_engine.py)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 eos_token_ids: list[int] | None = None, cache_implementation: str | None = None, *,
                 own_copy: bool = False):
        if tokenizer.pad_token_id is None:
            raise InputError("tokenizer has no pad token; set tokenizer.pad_token (e.g. to the eos token)")
        eos = eos_token_ids if eos_token_ids is not None else default_eos_ids(model, tokenizer)
        if not eos or any(e is None for e in eos):
            raise InputError(f"eos_token_ids must be a non-empty list of ids, got {eos}")
        self.holds_weights = own_copy
        self.model = model_copy(model) if own_copy else model
        self.dtype = next(self.model.parameters()).dtype if own_copy else None
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos)
        self.cache_implementation = cache_implementation
        self.model_version = 0

    def close(self) -> None:
        """Drop the copy of the weights it holds (`own_copy`); the trainer's module is never touched."""
        if self.holds_weights:
            self.model = None

    def set_version(self, version: int) -> None:
        """Tag subsequent rollouts with `version` (call after loading new weights into the model)."""
        self.model_version = int(version)

    def release(self) -> None:
        """Nothing to free: the engine samples from the trainer's module or a copy the trainer's memory plan holds."""

    def resume(self) -> None:
        """Nothing was freed (`release`)."""

    def sync_weights(self, weights: list[tuple[str, torch.Tensor]] | None, version: int) -> None:
        """Stamp `version`; with `own_copy`, first copy `weights` (all of the checkpoint's tensors) into the copy."""
        if self.holds_weights:
            if weights is None:
                raise ValueError("this engine samples from a copy of its own (own_copy=True): sync_weights needs "
                                 "the weights (jackpot.rollout.weights.checkpoint_weights)")
            self.model.load_state_dict(dict(weights), strict=True)
        elif weights is not None:
            raise ValueError("this engine samples from the trainer's module itself: sync_weights takes None "
                             "(build it with own_copy=True to push weights)")
        self.set_version(version)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        topk: int = 20,
        seed: int | None = None,
        uniforms: torch.Tensor | None = None,
        synced: bool = False,
    ) -> RolloutBatch:
        """Sample one response per row of prompt_ids (B, P) / prompt_mask (B, P), left-padded.

        `seed` makes the call reproducible without changing the global RNG state afterwards.
        `uniforms` (B, >= max_new_tokens) in [0, 1): the draws of each row, step by step (module docstring).
        `synced`: keep stepping until every process is done (a model sharded over processes, whose every
        forward is a collective: `generate(synced_gpus=True)`).
        Returns a `RolloutBatch` with T <= max_new_tokens (generation stops once all rows hit EOS).
        """
        check_generate_args(prompt_ids, prompt_mask, max_new_tokens, temperature, top_p, topk)
        device = self.model.device
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        if uniforms is not None and (uniforms.dim() != 2 or uniforms.shape[0] != prompt_ids.shape[0]
                                     or uniforms.shape[1] < max_new_tokens):
            raise ValueError(f"uniforms must be (B={prompt_ids.shape[0]}, >= max_new_tokens={max_new_tokens}), "
                             f"got {tuple(uniforms.shape)}")
        recorder = _Recorder(topk, None if uniforms is None else uniforms.to(device))
        processors = LogitsProcessorList(
            ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
            + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])
            + [recorder]
        )
        config = GenerationConfig(
            do_sample=True, num_beams=1, max_new_tokens=max_new_tokens, temperature=1.0, top_k=0,
            top_p=1.0, use_cache=True, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.eos_token_ids, cache_implementation=self.cache_implementation,
        )
        with _seeded(seed, device), _neutral_generation_mode(self.model):
            sequences = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                            generation_config=config, logits_processor=processors,
                                            **({"synced_gpus": True} if synced else {}))
        response_ids = sequences[:, prompt_ids.shape[1]:]
        recorder.finish(response_ids[:, -1])
        return self._assemble(prompt_ids, prompt_mask, response_ids, recorder)

    def _assemble(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                  recorder: _Recorder) -> RolloutBatch:
        T = response_ids.shape[1]
        if len(recorder.sampled) != T:
            raise RuntimeError(f"recorder saw {len(recorder.sampled)} steps for {T} generated tokens; "
                               "was generate run with a non-sampling strategy?")
        mask = response_mask_from_ids(response_ids, self.eos_token_ids)
        keep = mask.bool()
        pad = self.tokenizer.pad_token_id
        rollout_logp = torch.stack(recorder.sampled, dim=1).masked_fill(~keep, FILL_LOGPROB)
        topk_ids = torch.stack(recorder.topk_ids, dim=1).masked_fill(~keep[..., None], pad)
        topk_logp = torch.stack(recorder.topk_logp, dim=1).masked_fill(~keep[..., None], FILL_LOGPROB)
        return RolloutBatch(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask.long(),
            response_ids=response_ids.masked_fill(~keep, pad), response_mask=mask,
            rollout_logp=rollout_logp, topk_ids=topk_ids, topk_logp=topk_logp,
            model_version=self.model_version, pad_token_id=pad,
        )


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Seed torch's RNG for the block and restore the previous state afterwards (no-op for None)."""
    if seed is None:
        yield
        return
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _neutral_generation_mode(model: PreTrainedModel):
    """Eval mode, and the model's generation_config replaced by one carrying only its special token ids."""
    saved, was_training = model.generation_config, model.training
    model.generation_config = GenerationConfig(
        pad_token_id=saved.pad_token_id, eos_token_id=saved.eos_token_id, bos_token_id=saved.bos_token_id)
    model.eval()
    try:
        yield
    finally:
        model.generation_config = saved
        model.train(was_training)
