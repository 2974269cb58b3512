"""Text in and out of every rollout engine: prompts to left-padded ids, responses to text, EOS ids and the
response mask, and the checks every engine's `generate` makes on its arguments."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from jackpot.errors import InputError


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], *, chat_template: bool | None = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize and left-pad: list of B strings -> prompt_ids (B, P) long, prompt_mask (B, P) long.

    `chat_template`: True wraps each prompt as one user message in the tokenizer's chat template with the
    generation prompt (ValueError if it has none); None does so when the tokenizer has a template; False never.
    """
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError("prompts must be a non-empty list of strings")
    if tokenizer.pad_token_id is None:
        raise InputError("tokenizer has no pad token; set tokenizer.pad_token before encoding prompts")
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if chat_template and not has_template:
        raise InputError("task.chat_template is true but the tokenizer has no chat template")
    templated = has_template and chat_template is not False
    if templated:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    # a templated prompt already holds its special tokens; a plain one gets none added by the tiny tokenizers
    enc = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt",
                    add_special_tokens=not templated)
    if enc["input_ids"].shape[1] == 0:
        raise InputError("prompts encode to zero tokens; every prompt needs at least one token")
    return enc["input_ids"].long(), enc["attention_mask"].long()


def decode_responses(tokenizer: PreTrainedTokenizerBase, response_ids: torch.Tensor,
                     response_mask: torch.Tensor) -> list[str]:
    """Decode each row's unmasked tokens, dropping special tokens (EOS, pad): (B, T), (B, T) -> B strings.

    Ids the tokenizer does not have (>= len(tokenizer)) decode to nothing: a model's embedding is often
    larger than its tokenizer (Qwen3: 151,936 rows for 151,669 tokens), and a model may sample those rows.
    They stay in the rollout record (the trainer scores them like any token); only the text omits them.
    """
    if response_ids.dim() != 2 or response_mask.shape != response_ids.shape:
        raise ValueError(f"response_ids and response_mask must both be (B, T); got "
                         f"{tuple(response_ids.shape)} and {tuple(response_mask.shape)}")
    keep = (response_mask.bool() & (response_ids < len(tokenizer))).cpu()
    rows = response_ids.cpu()
    return [tokenizer.decode(row[k].tolist(), skip_special_tokens=True)
            for row, k in zip(rows, keep, strict=True)]


def default_eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's EOS plus every EOS id of the checkpoint's generation_config (Qwen chat models end a
    turn with <|im_end|> and stop at <|endoftext|> too: `generate` stops at both, and so must the mask)."""
    ids = [tokenizer.eos_token_id]
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    for e in extra if isinstance(extra, (list, tuple)) else [extra]:
        if e is not None and e not in ids:
            ids.append(int(e))
    return ids


def response_mask_from_ids(response_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """(B, T) float32: 1.0 up to and including the first EOS of each row, 0.0 after."""
    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device)).long()
    eos_before = is_eos.cumsum(dim=1) - is_eos
    return (eos_before == 0).float()


def check_generate_args(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
                        temperature: float, top_p: float, topk: int) -> None:
    """ValueError naming the first argument of a `generate` call that no engine can serve."""
    if prompt_ids.dim() != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_ids and prompt_mask must both be (B, P); got {tuple(prompt_ids.shape)} "
                         f"and {tuple(prompt_mask.shape)}")
    if (prompt_mask[:, -1] == 0).any():
        raise ValueError("prompts must be left-padded: prompt_mask[:, -1] must be 1 for every row")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (rollouts are sampled), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
