"""Tokenizers for the tiny offline models, built as real Hugging Face fast tokenizers.

Two vocabularies, both with the special tokens 0 `<pad>`, 1 `<eos>`, 2 `<bos>`, 3 `<unk>`:

- `char` (`build_char_tokenizer`, 56 tokens): then digits, `+ - * / =`, space, newline, lowercase
  letters and the punctuation `? : . , ( ) ! ' "`, one token per character. Enough for the built-in
  arithmetic tasks; any other character (an uppercase letter, `$`, `\\`) maps to `<unk>`.
- `byte` (`build_byte_tokenizer`, 260 tokens): then the 256 byte values, id 4 + b for byte b, one
  token per UTF-8 byte (GPT-2's byte-level alphabet with no merges). It encodes every string, so a
  tiny model can take any task's text (English word problems, LaTeX, other scripts); `decode`
  rebuilds the exact string (an incomplete multi-byte character decodes to U+FFFD).

`build_tokenizer(name)` picks one by name; `TOKENIZERS` lists them. Because they are
`PreTrainedTokenizerFast` objects, the rest of the library uses exactly the API it uses for hub
checkpoints (`__call__`, `decode`, `pad_token_id`, `eos_token_id`, `save_pretrained`, and
`AutoTokenizer.from_pretrained(dir)` to load them back). Ids are stable: a model's embedding rows
depend on them. No special tokens are added when encoding; callers append `<eos>` where needed, and
the literal text `<eos>` encodes to the special token.

`check_same_tokenizer` guards two-model RL: the rollout model and the policy must map text to the
same ids, otherwise the log-probability of a sampled token under the policy is meaningless.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from jackpot.errors import InputError

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK)
CHARACTERS = string.digits + "+-*/=" + " \n" + string.ascii_lowercase + "?:.,()!'\""
MODEL_MAX_LENGTH = 512
BYTE_MODEL_MAX_LENGTH = 4096  # byte-level text is ~4x longer than a BPE tokenization of it


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """The character tokenizer described in the module docstring (left padding, 56 tokens)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Split every character into its own piece (newline included), and glue pieces back on decode.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return _fast(backend, MODEL_MAX_LENGTH)


def _fast(backend: Tokenizer, max_length: int) -> PreTrainedTokenizerFast:
    """A transformers tokenizer over `backend` with the special tokens and left padding both tiny ones share."""
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, bos_token=BOS,
                                   unk_token=UNK, padding_side="left", model_max_length=max_length)


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in character for each byte value 0..255 (what `ByteLevel` pre-tokenizes to)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    stand_in, extra = {}, 0
    for b in range(256):
        if b in printable:
            stand_in[b] = chr(b)
        else:
            stand_in[b] = chr(256 + extra)
            extra += 1
    return [stand_in[b] for b in range(256)]


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """The byte-level tokenizer described in the module docstring (left padding, 260 tokens)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(byte_alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))  # no merges: one token per byte
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return _fast(backend, BYTE_MODEL_MAX_LENGTH)


TOKENIZERS = {"char": build_char_tokenizer, "byte": build_byte_tokenizer}


def build_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """The tiny models' tokenizer called `name` ('char' or 'byte')."""
    if name not in TOKENIZERS:
        raise InputError(f"unknown tokenizer {name!r}; known: {sorted(TOKENIZERS)}")
    return TOKENIZERS[name]()


def check_same_tokenizer(
    tok_a: PreTrainedTokenizerBase,
    tok_b: PreTrainedTokenizerBase,
    names: tuple[str, str] = ("rollout", "policy"),
) -> None:
    """Raise ValueError naming the first difference between two tokenizers.

    Compares vocabulary size, the token -> id map (reporting one differing token) and the ids of
    the pad, eos and bos tokens. Returns None when they agree.
    """
    a, b = names
    if len(tok_a) != len(tok_b):
        raise InputError(
            f"{a} and {b} tokenizers differ in vocabulary size: {len(tok_a)} vs {len(tok_b)}; "
            "RL with two models requires identical tokenization"
        )
    vocab_a, vocab_b = tok_a.get_vocab(), tok_b.get_vocab()
    for token, idx in vocab_a.items():
        if vocab_b.get(token) != idx:
            raise InputError(
                f"{a} and {b} tokenizers differ: token {token!r} has id {idx} in {a} but "
                f"{vocab_b.get(token)} in {b}; RL with two models requires identical tokenization"
            )
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        id_a, id_b = getattr(tok_a, attr), getattr(tok_b, attr)
        if id_a != id_b:
            raise InputError(f"{a} and {b} tokenizers differ in {attr}: {id_a} vs {id_b}")
