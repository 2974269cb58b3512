"""Build tiny Qwen3 models from scratch, load checkpoints, and save them atomically.

- `build_tiny_qwen` makes a randomly initialised `Qwen3ForCausalLM` (the architecture of real
  Qwen3 checkpoints, shrunk) for the offline default: no download, deterministic given `seed`.
- `load_model` / `load_tokenizer` go through the `Auto*` classes, so a local directory written by
  `save_model_and_tokenizer` and a hub id (`"Qwen/Qwen3-0.6B"`) are handled the same way. A string
  that looks like a local path but does not exist raises FileNotFoundError instead of turning into
  a confusing hub lookup.
- `save_model_and_tokenizer` writes safetensors into a temporary sibling directory and renames it
  into place, so a reader never sees a half-written checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen3Config,
    Qwen3ForCausalLM,
)

MAX_POSITION_EMBEDDINGS = 512
# "name" or "org/name": what the hub accepts; anything else must be a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_tiny_qwen(
    vocab_size: int,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int | None = None,
    seed: int,
    pad_token_id: int,
    eos_token_id: int,
    bos_token_id: int,
) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3 causal LM with tied embeddings, in float32 and eval mode.

    `head_dim = hidden_size // num_heads`, `num_key_value_heads = num_heads` (no GQA),
    `intermediate_size` defaults to `3 * hidden_size` (Qwen's ratio), 512 positions.
    The global torch RNG is left untouched: initialisation runs under a forked RNG seeded with `seed`.
    """
    for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                        ("num_layers", num_layers), ("num_heads", num_heads)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    if intermediate_size is not None and intermediate_size < 1:
        raise ValueError(f"intermediate_size must be >= 1 or None, got {intermediate_size}")
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 3 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    return model.eval()


def _resolve(path_or_hub_id: str | os.PathLike, what: str) -> str:
    """Return a local directory as a string, or a hub id unchanged; raise for missing local paths."""
    text = os.fspath(path_or_hub_id)
    if not text:
        raise ValueError(f"path_or_hub_id for the {what} is empty")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{what} path {str(path)!r} is a file; expected a checkpoint directory")
        return str(path)
    if not _HUB_ID.match(text):  # "./x", "/x", "~/x", "a/b/c", "a\\b" are local paths
        raise FileNotFoundError(f"{what} directory {str(path)!r} does not exist (and is not a hub id)")
    return text


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be a torch.dtype, 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def load_model(
    path_or_hub_id: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """Load a causal LM (local directory or hub id) in eval mode. `dtype=None` means float32."""
    source = _resolve(path_or_hub_id, "model")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=_as_dtype(dtype))
    return model.to(device).eval()


def load_tokenizer(path_or_hub_id: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer (local directory or hub id) through `AutoTokenizer`."""
    return AutoTokenizer.from_pretrained(_resolve(path_or_hub_id, "tokenizer"))


def save_model_and_tokenizer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    directory: str | os.PathLike,
    *,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write model (safetensors) and tokenizer to `directory` atomically; returns the directory.

    `extra_files` maps file names to text written alongside (e.g. metadata as JSON).

    Everything is written into a temporary sibling first. An existing `directory` is moved aside,
    the new one renamed into place, then the old one deleted.
    """
    target = Path(directory).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp creates 0o700; the final directory should be readable like any other
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "previous")
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target
