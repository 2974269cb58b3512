"""A character-level tokenizer for the offline default, built as a real Hugging Face fast tokenizer.

Every character of the vocabulary is one token, so a tiny model trained from scratch can learn
arithmetic without a download. Because it is a `PreTrainedTokenizerFast`, the rest of the library
uses exactly the API it uses for hub checkpoints (`__call__`, `decode`, `pad_token_id`,
`eos_token_id`, `save_pretrained`, and `AutoTokenizer.from_pretrained(dir)` to load it back).

Vocabulary (ids are stable: the model's embedding rows depend on them):
    0 `<pad>`, 1 `<eos>`, 2 `<bos>`, 3 `<unk>`, then digits, `+ - * / =`, space, newline,
    lowercase letters and the punctuation `? : . , ( ) ! ' "`.
No special tokens are added when encoding; callers append `<eos>` themselves where needed.
Characters outside the vocabulary (e.g. uppercase letters) map to `<unk>`.

`check_same_tokenizer` guards two-model RL: the rollout model and the policy must map text to the
same ids, otherwise the log-probability of a sampled token under the policy is meaningless.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK)
CHARACTERS = string.digits + "+-*/=" + " \n" + string.ascii_lowercase + "?:.,()!'\""
MODEL_MAX_LENGTH = 512


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """The character tokenizer described in the module docstring (left padding, 56 tokens)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Split every character into its own piece (newline included), and glue pieces back on decode.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD, eos_token=EOS, bos_token=BOS, unk_token=UNK,
        padding_side="left",
        model_max_length=MODEL_MAX_LENGTH,
    )


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
        raise ValueError(
            f"{a} and {b} tokenizers differ in vocabulary size: {len(tok_a)} vs {len(tok_b)}; "
            "RL with two models requires identical tokenization"
        )
    vocab_a, vocab_b = tok_a.get_vocab(), tok_b.get_vocab()
    for token, idx in vocab_a.items():
        if vocab_b.get(token) != idx:
            raise ValueError(
                f"{a} and {b} tokenizers differ: token {token!r} has id {idx} in {a} but "
                f"{vocab_b.get(token)} in {b}; RL with two models requires identical tokenization"
            )
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        id_a, id_b = getattr(tok_a, attr), getattr(tok_b, attr)
        if id_a != id_b:
            raise ValueError(f"{a} and {b} tokenizers differ in {attr}: {id_a} vs {id_b}")
