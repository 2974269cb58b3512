"""Build tiny Qwen3 models from scratch, load checkpoints, and save them atomically.

- `build_tiny_qwen` makes a randomly initialised `Qwen3ForCausalLM` (the architecture of real
  Qwen3 checkpoints, shrunk) for the offline default: no download, deterministic given `seed`.
- `load_model` / `load_tokenizer` go through the `Auto*` classes, so a local directory written by
  `save_model_and_tokenizer` and a hub id (`"Qwen/Qwen3-0.6B"`) are handled the same way. A string
  that looks like a local path but does not exist raises FileNotFoundError instead of turning into
  a confusing hub lookup.
- Before anything is loaded, `check_model_source` checks what is cheap to check: a local directory has a
  config.json that parses and a complete weights file (a safetensors header covering the whole file); a
  hub id is looked up on the hub with a short timeout, and when the hub cannot be reached (no network,
  `HF_HUB_OFFLINE=1`) the model is taken from the local Hugging Face cache or refused at once, with the
  way to point at a local directory — instead of transformers' minute of retries.
- `save_model_and_tokenizer` writes safetensors into a temporary sibling directory and renames it
  into place, so a reader never sees a half-written checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from jackpot.core.dtypes import DTYPES
from jackpot.errors import InputError, JackpotError

MAX_POSITION_EMBEDDINGS = 4096  # a text task's prompt (~600 bytes) plus its default 1,024-token response fit
HUB_TIMEOUT_S = 5.0  # one look-up of a hub id; transformers itself retries for about a minute
# "name" or "org/name": what the hub accepts; anything else must be a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


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
            raise InputError(f"{name} must be >= 1, got {value}")
    if hidden_size % num_heads:
        raise InputError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    if intermediate_size is not None and intermediate_size < 1:
        raise InputError(f"intermediate_size must be >= 1 or None, got {intermediate_size}")
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
        raise InputError(f"path_or_hub_id for the {what} is empty")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{what} path {str(path)!r} is a file; expected a checkpoint directory")
        return str(path)
    if not _HUB_ID.match(text):  # "./x", "/x", "~/x", "a/b/c", "a\\b" are local paths
        raise FileNotFoundError(f"{what} directory {str(path)!r} does not exist (and is not a hub id)")
    return text


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"dtype must be a torch.dtype, 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


class ModelFileError(JackpotError):
    """A model/tokenizer source that cannot be loaded: a broken directory or an unreachable hub id."""


def _safetensors_size(file: Path) -> tuple[int, int]:
    """(bytes on disk, bytes its header describes); raises ModelFileError for an unreadable header."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or 8 + n > size:
            return size, max(8 + max(n, 0), size + 1)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelFileError(f"{file}: not a safetensors file (its header is not valid JSON); "
                                 "re-download or re-save the checkpoint") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    return size, 8 + n + max(ends, default=0)


def _weight_files(directory: Path) -> list[Path]:
    """The weight files a checkpoint directory names (sharded via an index, or single); [] if none."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError):
                raise ModelFileError(f"{index}: not a valid weight index (JSON with a 'weight_map'); "
                                     "re-download or re-save the checkpoint") from None
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise ModelFileError(f"{index} lists weight files that are not in {directory}: {missing[:3]}; "
                                     "the download is incomplete — download the checkpoint again")
            return [directory / s for s in shards]
    return [f for f in (directory / "model.safetensors", directory / "pytorch_model.bin") if f.is_file()]


def check_model_dir(directory: str | os.PathLike, what: str = "model", *, weights: bool = True) -> None:
    """Cheap checks of a local checkpoint directory before transformers touches it: config.json is valid
    JSON and (if `weights`) the weight files exist and are as long as their headers say."""
    directory = Path(directory)
    config = directory / "config.json"
    if (directory / "adapter_config.json").is_file() and not config.is_file():
        return  # a PEFT adapter directory: transformers resolves its base model itself
    if not config.is_file():
        raise ModelFileError(f"{what} directory {directory} has no config.json: it is not a Hugging Face "
                             "checkpoint (save one with save_pretrained, or pass a hub id)")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{config} is not valid JSON ({e}); re-download or re-save the checkpoint") from None
    if not weights:
        return
    files = _weight_files(directory)
    if not files:
        raise ModelFileError(f"{what} directory {directory} has no weights (model.safetensors, "
                             "model.safetensors.index.json or pytorch_model.bin); the checkpoint was not "
                             "saved completely — save or download it again")
    for file in files:
        if file.suffix != ".safetensors":
            continue
        size, expected = _safetensors_size(file)
        if size < expected:
            raise ModelFileError(f"{file} is truncated ({size} bytes; its header describes {expected}); "
                                 "the download or save was cut short — download or save it again")


@functools.cache
def _hub_unreachable(hub_id: str) -> str | None:
    """Why the hub cannot serve `hub_id` right now (None: it can). One request, HUB_TIMEOUT_S at most."""
    from huggingface_hub import HfApi
    from huggingface_hub import constants as hf_constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if hf_constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        HfApi().model_info(hub_id, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return None  # reachable; transformers asks for the token and says so
    except RepositoryNotFoundError:
        raise ModelFileError(f"{hub_id!r} is neither a local directory nor a model on the Hugging Face hub "
                             "(or it is private: log in with `hf auth login`)") from None
    except HfHubHTTPError as e:
        return f"the hub answered {getattr(e.response, 'status_code', '?')}"
    except Exception as e:  # connection refused, DNS failure, timeout: the hub cannot be reached
        return f"{hf_constants.ENDPOINT} cannot be reached ({_first_line(e)})"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _cached_on_disk(hub_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)


def check_model_source(path_or_hub_id: str | os.PathLike, what: str = "model", *, weights: bool = True) -> bool:
    """Check a model source before loading it; returns True when it must come from the local Hugging Face
    cache (hub id, hub unreachable, cached copy present). Raises ModelFileError naming the problem."""
    source = _resolve(path_or_hub_id, what)
    if Path(source).expanduser().is_dir():
        check_model_dir(source, what, weights=weights)
        return False
    reason = _hub_unreachable(source)
    if reason is None:
        return False
    if _cached_on_disk(source):
        return True
    raise ModelFileError(f"{what} {source!r} is a hub id but the hub cannot be used ({reason}) and it is not in "
                         f"the local Hugging Face cache; on a machine with network run `hf download {source} "
                         f"--local-dir DIR`, then pass that directory (e.g. policy.path=DIR)")


def load_model(
    path_or_hub_id: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """Load a causal LM (local directory or hub id) in eval mode. `dtype=None` means float32."""
    source = _resolve(path_or_hub_id, "model")
    dtype = _as_dtype(dtype)
    local_only = check_model_source(source, "model")
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_only)
    except (OSError, ValueError, SafetensorError) as e:
        raise ModelFileError(f"could not load the model from {source}: {_first_line(e)}") from e
    return model.to(device).eval()


def load_tokenizer(path_or_hub_id: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer (local directory or hub id) through `AutoTokenizer`."""
    source = _resolve(path_or_hub_id, "tokenizer")
    local_only = check_model_source(source, "tokenizer", weights=False)
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as e:
        raise ModelFileError(f"could not load the tokenizer from {source}: {_first_line(e)}") from e


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
