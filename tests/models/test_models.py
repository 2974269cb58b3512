"""Tests for jackpot.models: char tokenizer, tiny Qwen3 build/load/save, teacher-forced scoring, SFT."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from reference import response_logits
from transformers import AutoTokenizer

from jackpot.models.forward import token_logprobs
from jackpot.models.loading import build_tiny_qwen, load_model, load_tokenizer, save_model_and_tokenizer
from jackpot.models.tokenizer import build_byte_tokenizer, build_char_tokenizer, build_tokenizer, check_same_tokenizer
from jackpot.tasks import AdditionTask, Example
from jackpot.train.pretrain import (
    IGNORE_INDEX,
    TinyModelSpec,
    add_arguments,
    evaluate_accuracy,
    main,
    pretrain,
    pretrained_model,
    sft_batch,
)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def tiny(tok, seed=0, hidden=32, layers=1):
    return build_tiny_qwen(len(tok), hidden_size=hidden, num_layers=layers, num_heads=2, seed=seed,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                           bos_token_id=tok.bos_token_id)


# ------------------------------------------------------------------------------------------ tokenizer

def test_char_tokenizer_one_token_per_character_and_decode_roundtrip(tok):
    text = "what is (12+34)*5?\nanswer: 230."
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)


def test_char_tokenizer_left_pads_batches(tok):
    enc = tok(["1+2=", "10+20="], padding=True, return_tensors="pt")
    assert enc["input_ids"].shape == (2, 6)
    assert enc["attention_mask"][0].tolist() == [0, 0, 1, 1, 1, 1]
    assert enc["input_ids"][0, :2].tolist() == [tok.pad_token_id] * 2


def test_char_tokenizer_save_and_autotokenizer_roundtrip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    check_same_tokenizer(tok, loaded)
    assert loaded("12+34=\n")["input_ids"] == tok("12+34=\n")["input_ids"]
    assert loaded.padding_side == "left"


@pytest.mark.parametrize("text", ["Natalia sold 48/2 = 24 clips.\n#### 72", "\\boxed{\\frac{1}{2}} $x^2$",
                                  "Ünïcödé 日本語 🙂", "\x00\t\r end", ""])
def test_byte_tokenizer_encodes_any_text_one_token_per_byte(text):
    tok = build_byte_tokenizer()
    ids = tok(text)["input_ids"]
    assert ids == [4 + b for b in text.encode("utf-8")]  # id 4 + b for byte b, no special tokens added
    assert tok.decode(ids) == text
    assert len(tok) == 260 and (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok("ok<eos>")["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(tok("ok<eos>")["input_ids"], skip_special_tokens=True) == "ok"


def test_byte_tokenizer_save_and_autotokenizer_roundtrip(tmp_path):
    tok = build_tokenizer("byte")
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    check_same_tokenizer(tok, loaded)
    text = "Why? Because É = 3."
    assert loaded(text)["input_ids"] == tok(text)["input_ids"] and loaded.padding_side == "left"
    with pytest.raises(ValueError, match="differ in vocabulary size"):
        check_same_tokenizer(tok, build_char_tokenizer())
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe'"):
        build_tokenizer("bpe")


def test_check_same_tokenizer_names_the_difference(tok):
    bigger = build_char_tokenizer()
    bigger.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="vocabulary size: 56 vs 57"):
        check_same_tokenizer(tok, bigger)
    other_pad = build_char_tokenizer()
    other_pad.pad_token = "<eos>"
    with pytest.raises(ValueError, match="pad_token_id: 0 vs 1"):
        check_same_tokenizer(tok, other_pad, names=("a", "b"))


# --------------------------------------------------------------------------------------------- models

def test_build_tiny_qwen_is_deterministic_and_leaves_global_rng_alone(tok):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = tiny(tok, seed=7), tiny(tok, seed=7)
    assert torch.equal(torch.rand(1), before)  # initialisation ran under a forked RNG
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.model.embed_tokens.weight, tiny(tok, seed=8).model.embed_tokens.weight)
    assert a.lm_head.weight is a.model.embed_tokens.weight  # tied
    assert a.config.head_dim == 16 and a.config.num_key_value_heads == 2
    assert a.config.intermediate_size == 96


def test_build_tiny_qwen_rejects_bad_sizes(tok):
    with pytest.raises(ValueError, match="hidden_size .* divisible by num_heads"):
        build_tiny_qwen(len(tok), hidden_size=30, num_layers=1, num_heads=4, seed=0,
                        pad_token_id=0, eos_token_id=1, bos_token_id=2)
    with pytest.raises(ValueError, match="num_layers"):
        build_tiny_qwen(len(tok), hidden_size=32, num_layers=0, num_heads=2, seed=0,
                        pad_token_id=0, eos_token_id=1, bos_token_id=2)


def test_save_and_load_roundtrip_is_atomic_and_overwrites(tok, tmp_path):
    model = tiny(tok)
    target = tmp_path / "ckpt"
    save_model_and_tokenizer(tiny(tok, seed=1), tok, target)  # an older checkpoint to replace
    save_model_and_tokenizer(model, tok, target, extra_files={"note.json": "{}"})
    assert (target / "model.safetensors").is_file() and (target / "note.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp/backup left behind
    loaded, loaded_tok = load_model(target), load_tokenizer(target)
    check_same_tokenizer(tok, loaded_tok)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("path", ["./missing-dir", "/nonexistent/model", "a/b/c"])
def test_load_missing_local_path_raises_file_not_found(path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(path)


def test_load_model_rejects_unknown_dtype(tok, tmp_path):
    save_model_and_tokenizer(tiny(tok), tok, tmp_path / "m")
    with pytest.raises(ValueError, match="dtype"):
        load_model(tmp_path / "m", dtype="float8")
    assert load_model(tmp_path / "m", dtype="bfloat16").dtype == torch.bfloat16


# -------------------------------------------------------------------------------------------- forward

def test_response_logits_align_with_plain_forward_and_ignore_left_padding(tok):
    """Row t of response_logits is the logit at position P-1+t; left padding does not change it."""
    model = tiny(tok, layers=2)
    prompt, response = tok("12+3=")["input_ids"], tok("15")["input_ids"]
    full = torch.tensor([prompt + response])
    with torch.no_grad():
        plain = model(full).logits[0, len(prompt) - 1:-1]
        padded = torch.tensor([[tok.pad_token_id] * 3 + prompt + response])
        mask = (padded != tok.pad_token_id).long()
        got = response_logits(model, padded, mask, response_len=2, temperature=0.5)
    assert got.shape == (1, 2, len(tok)) and got.dtype == torch.float32
    torch.testing.assert_close(got[0], plain / 0.5, atol=1e-5, rtol=1e-5)


def test_token_logprobs_matches_log_softmax_reference():
    logits = torch.randn(2, 3, 7, dtype=torch.float64)
    ids = torch.tensor([[0, 6, 2], [3, 3, 1]])
    expected = torch.tensor([[torch.log_softmax(logits[b, t], -1)[ids[b, t]].item() for t in range(3)]
                             for b in range(2)], dtype=torch.float64)
    torch.testing.assert_close(token_logprobs(logits, ids), expected, atol=1e-12, rtol=0)  # float64 stays float64
    half = token_logprobs(logits.bfloat16(), ids)  # lower precision is upcast to float32
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, expected.float(), atol=0.1, rtol=0)


def test_forward_shape_checks(tok):
    model = tiny(tok)
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="response_len"):
        response_logits(model, ids, torch.ones_like(ids), response_len=5)
    with pytest.raises(ValueError, match="attention_mask shape"):
        response_logits(model, ids, torch.ones(2, 4), response_len=2)
    with pytest.raises(ValueError, match="ids"):
        token_logprobs(torch.zeros(2, 5, 3), torch.zeros(2, 4, dtype=torch.long))


# ------------------------------------------------------------------------------------------- pretrain

def test_sft_batch_masks_prompt_and_padding(tok):
    batch = sft_batch(tok, [Example("1+2=", "3"), Example("10+20=", "30")])
    assert batch["input_ids"].shape == (2, 9)
    three, zero, eos = tok.convert_tokens_to_ids("3"), tok.convert_tokens_to_ids("0"), tok.eos_token_id
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 4 + [three, eos] + [IGNORE_INDEX] * 3
    assert batch["attention_mask"][0].tolist() == [1] * 6 + [0] * 3
    assert batch["labels"][1, -3:].tolist() == [three, zero, eos]


def test_pretrain_lowers_loss_and_changes_parameters(tok):
    model = tiny(tok)
    before = model.model.embed_tokens.weight.detach().clone()
    stats = pretrain(AdditionTask(digits=1), tok, model, steps=30, batch_size=16, lr=3e-3, seed=0,
                     progress=False)
    assert stats["sft/loss_last"] < stats["sft/loss_first"]
    assert not torch.equal(before, model.model.embed_tokens.weight)
    assert not model.training
    acc = evaluate_accuracy(AdditionTask(digits=1), tok, model, n=8)
    assert 0.0 <= acc <= 1.0


def test_pretrained_model_caches_by_settings(tmp_path):
    spec = TinyModelSpec(name="t", hidden=32, layers=1, heads=2, steps=2, batch_size=4,
                         task_kwargs={"digits": 1})
    path = pretrained_model(spec, tmp_path, eval_n=4, progress=False)
    assert path.name == f"t-{spec.cache_key()}"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert pretrained_model(spec, tmp_path, eval_n=4, progress=False) == path  # reused, not rebuilt
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((path / "spec.json").read_text())["hidden"] == 32
    other = TinyModelSpec(**{**spec.__dict__, "steps": 3})
    assert other.cache_key() != spec.cache_key()
    load_model(path), load_tokenizer(path)


def test_a_text_task_pretrains_with_the_byte_tokenizer(tmp_path):
    data = tmp_path / "gsm.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"Tom has {i} Apples. How many?", "answer": f"#### {i}"})
                              for i in range(20)) + "\n")
    spec = TinyModelSpec(name="t", task="file", task_kwargs={"path": str(data), "prompt_field": "question"},
                         hidden=32, layers=1, heads=2, steps=2, batch_size=4)
    assert spec.tokenizer_name == "byte" and TinyModelSpec().tokenizer_name == "char"
    assert TinyModelSpec(tokenizer="byte").cache_key() != TinyModelSpec().cache_key()
    path = pretrained_model(spec, tmp_path / "cache", eval_n=2, progress=False)
    tok = load_tokenizer(path)
    assert len(tok) == 260 and tok.unk_token_id not in tok("Tom has 3 Apples.")["input_ids"]


def test_pretrain_cli_main_prints_accuracy(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--task", "addition", "--task-arg", "digits=1", "--hidden", "32",
                              "--layers", "1", "--heads", "2", "--steps", "2", "--batch-size", "4",
                              "--eval-n", "4", "--out", str(tmp_path / "out"), "--no-progress"])
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "eval/greedy_acc_after" in out and "eval/sampled_acc_before" in out
    assert (tmp_path / "out" / "stats.json").is_file()


def test_models_package_depends_on_neither_rollout_nor_train():
    """Layering: models/ loads and builds models; sampling (rollout/) and training (train/) build on it."""
    import ast
    from pathlib import Path

    import jackpot.models

    for path in Path(jackpot.models.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(("jackpot.rollout", "jackpot.train")), f"{path.name} imports {name}"


def _arch(name: str, tied: bool):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    if name == "qwen3":
        cfg = Qwen3Config(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=tied)
        return Qwen3ForCausalLM(cfg)
    if name == "llama":
        cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
        return LlamaForCausalLM(cfg)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=tied))


@pytest.mark.parametrize(("arch", "tied"), [("qwen3", True), ("qwen3", False), ("llama", False), ("gpt2", True)])
def test_hidden_states_and_head_give_the_models_own_logits(arch, tied):
    """response_hidden + output_head reproduce the model's logits (and its log-probs through the chunked head,
    temperature included), tied or untied, for several architectures."""
    from jackpot.core.head import Head, logprobs_at
    from jackpot.models.forward import output_head, response_hidden

    model = _arch(arch, tied).double().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    T = 4
    weight, bias = output_head(model)
    assert (weight is model.get_input_embeddings().weight) == tied
    hidden = response_hidden(model, ids, mask, T)
    logits = response_logits(model, ids, mask, T, temperature=0.7)
    torch.testing.assert_close(torch.nn.functional.linear(hidden, weight, bias) / 0.7, logits, rtol=1e-10, atol=1e-10)
    resp = ids[:, -T:]
    lp = logprobs_at(Head(hidden.reshape(-1, hidden.shape[-1]), weight, bias, 0.7), resp.reshape(-1), chunk=5)
    torch.testing.assert_close(lp.reshape(3, T), token_logprobs(logits, resp), rtol=1e-10, atol=1e-10)


def test_a_head_that_is_not_a_linear_map_is_refused():
    from jackpot.models.forward import output_head

    model = _arch("qwen3", True)
    model.config.final_logit_softcapping = 30.0  # as Gemma 2
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        output_head(model)
