"""Tests for jackpot.rollout: RolloutBatch plumbing and HFRolloutEngine's recorded log-probs."""

from __future__ import annotations

import pytest
import torch
from reference import response_logits

from jackpot.models.forward import token_logprobs
from jackpot.models.loading import build_tiny_qwen
from jackpot.models.tokenizer import build_char_tokenizer
from jackpot.rollout import (
    ENGINES,
    HFRolloutEngine,
    RolloutBatch,
    RolloutEngine,
    decode_responses,
    encode_prompts,
    make_engine,
)
from jackpot.rollout.text import response_mask_from_ids
from jackpot.rollout.weights import checkpoint_weights, push_weights

HF_ENGINES = sorted(name for name in ENGINES if name.startswith("hf"))  # vllm: tests/rollout/test_vllm_engine.py
PROMPTS = ["12+34=", "1+2=", "what is 3*4?", "9+9+9="]
# Teacher-forced and cached-generation logits are the same math in float32; they agree to ~1e-6.
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    m = build_tiny_qwen(len(tok), hidden_size=32, num_layers=2, num_heads=2, seed=0,
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                        bos_token_id=tok.bos_token_id)
    with torch.no_grad():  # make EOS likely enough that some rows stop early
        m.lm_head.weight[tok.eos_token_id] *= 0.0
        m.model.norm.weight.mul_(4.0)
    return m


@pytest.fixture(scope="module")
def engine(model, tok):
    return HFRolloutEngine(model, tok)


@pytest.fixture(scope="module")
def prompts(tok):
    return encode_prompts(tok, PROMPTS)


def rollout(engine, prompts, **kw):
    ids, mask = prompts
    args = dict(max_new_tokens=10, temperature=1.0, top_p=1.0, topk=5, seed=0) | kw
    return engine.generate(ids, mask, **args)


def test_encode_prompts_left_pads(tok, prompts):
    ids, mask = prompts
    assert ids.shape == mask.shape == (4, len(PROMPTS[2]))
    assert mask[:, -1].all() and mask[1].tolist() == [0] * 8 + [1] * 4
    with pytest.raises(ValueError, match="prompts"):
        encode_prompts(tok, [])


@pytest.mark.parametrize("name", HF_ENGINES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_teacher_forced_forward(model, tok, prompts, temperature, name):
    """Every engine records log q of the distribution it sampled from, q = softmax(logits / T) (tolerance 1e-4)."""
    batch = rollout(make_engine(name, model, tok), prompts, temperature=temperature, seed=1)
    with torch.no_grad():
        logits = response_logits(model, batch.input_ids, batch.attention_mask, batch.response_len,
                                 temperature=temperature)
    expected = token_logprobs(logits, batch.response_ids)
    m = batch.response_mask.bool()
    torch.testing.assert_close(batch.rollout_logp[m], expected[m], atol=LOGPROB_TOL, rtol=0)
    # the top-k are the K largest of the same distribution
    full = torch.log_softmax(logits, -1).topk(5, dim=-1).values
    torch.testing.assert_close(batch.topk_logp[m], full[m], atol=LOGPROB_TOL, rtol=0)


def test_matches_hf_processed_scores_with_top_p(engine, model, tok, prompts):
    """With top-p, the record equals generate's processed `scores` (HF's warpers): same seed, same tokens."""
    batch = rollout(engine, prompts, temperature=0.7, top_p=0.3, seed=5)
    ids, mask = prompts
    torch.manual_seed(5)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.7, top_p=0.3,
                         top_k=0, max_new_tokens=10, output_scores=True, return_dict_in_generate=True,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    hf_response = out.sequences[:, ids.shape[1]:]
    m = batch.response_mask.bool()
    assert torch.equal(hf_response[m], batch.response_ids[m])
    hf_logq = torch.log_softmax(torch.stack(out.scores, dim=1).float(), dim=-1)
    expected = hf_logq.gather(-1, hf_response.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(batch.rollout_logp[m], expected[m], atol=1e-6, rtol=0)
    assert torch.isfinite(batch.rollout_logp[m]).all()
    assert torch.isinf(batch.topk_logp[m]).any()  # top-p removed some of the top-5 somewhere


def test_topk_sorted_and_contains_sampled_token(engine, prompts):
    batch = rollout(engine, prompts, temperature=1.3, seed=2)
    m = batch.response_mask.bool()
    lp = batch.topk_logp[m]
    assert batch.topk_ids.shape == (*batch.response_ids.shape, 5) and batch.topk_ids.dtype == torch.long
    assert (lp[:, :-1] >= lp[:, 1:]).all()
    hit = batch.topk_ids[m] == batch.response_ids[m].unsqueeze(-1)
    in_topk = hit.any(-1)
    assert in_topk.any() and (~in_topk).any()  # both cases occur at this temperature
    torch.testing.assert_close(lp[hit], batch.rollout_logp[m][in_topk], atol=1e-6, rtol=0)
    assert (batch.rollout_logp[m][~in_topk] <= lp[~in_topk, -1] + 1e-6).all()


def test_response_mask_zero_after_eos(engine, tok, prompts):
    batch = rollout(engine, prompts, seed=3)
    eos = batch.response_ids == tok.eos_token_id
    assert eos.any(), "fixture model should stop some rows early"
    for row, mask, ids in zip(eos, batch.response_mask, batch.response_ids, strict=True):
        if row.any():
            first = int(row.nonzero()[0])
            assert mask[: first + 1].eq(1).all() and mask[first + 1:].eq(0).all()
            assert ids[first + 1:].eq(tok.pad_token_id).all()
        else:
            assert mask.eq(1).all()
    assert batch.response_mask.dtype == torch.float32 and batch.rollout_logp.dtype == torch.float32
    assert (batch.rollout_logp[batch.response_mask == 0] == 0).all()


def test_response_mask_from_ids_handles_pad_equal_to_eos():
    ids = torch.tensor([[5, 1, 1, 1], [5, 6, 7, 8], [1, 0, 0, 0]])
    assert response_mask_from_ids(ids, [1]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_same_seed_same_rollout_and_global_rng_untouched(engine, prompts):
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a, b = rollout(engine, prompts, seed=11), rollout(engine, prompts, seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    for name in ("response_ids", "response_mask", "rollout_logp", "topk_ids", "topk_logp"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    c = rollout(engine, prompts, seed=12)
    assert not torch.equal(a.response_ids, c.response_ids)


def test_engine_protocol_version_and_argument_checks(engine, prompts):
    assert isinstance(engine, RolloutEngine)
    engine.set_version(3)
    try:
        assert rollout(engine, prompts).model_version == 3
    finally:
        engine.set_version(0)
    ids, mask = prompts
    with pytest.raises(ValueError, match="temperature"):
        rollout(engine, prompts, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        rollout(engine, prompts, top_p=1.5)
    with pytest.raises(ValueError, match="left-padded"):
        engine.generate(ids.flip(1), mask.flip(1), max_new_tokens=2, temperature=1.0, top_p=1.0, topk=2,
                        seed=0)


def test_model_generation_config_does_not_leak(engine, model, prompts):
    """A checkpoint's own sampling defaults (min_p, repetition penalty) must not alter what is sampled."""
    plain = rollout(engine, prompts, seed=4)
    saved = model.generation_config
    model.generation_config = type(saved)(**{**saved.to_dict(), "min_p": 0.5, "repetition_penalty": 3.0})
    try:
        leaked = rollout(engine, prompts, seed=4)
    finally:
        model.generation_config = saved
    assert torch.equal(leaked.response_ids, plain.response_ids)
    assert torch.equal(leaked.rollout_logp, plain.rollout_logp)
    model.train()  # a policy used as its own rollout model is in train mode; generate restores it
    try:
        rollout(engine, prompts, max_new_tokens=1)
        assert model.training
    finally:
        model.eval()


def test_decode_responses_drops_eos_and_padding(tok):
    ids = torch.tensor([[5, 6, tok.eos_token_id, 0], [7, 7, 7, 7]])
    mask = response_mask_from_ids(ids, [tok.eos_token_id])
    assert decode_responses(tok, ids, mask) == ["12", "3333"]


def test_ids_beyond_the_tokenizer_decode_to_nothing(tok):
    """A model whose embedding has more rows than its tokenizer has tokens may sample those rows: they are
    left out of the text (a defined behaviour, not a crash) and kept in the record."""
    big = len(tok) + 100
    ids = torch.tensor([[5, big, 6, tok.eos_token_id], [big, big, 7, 0]])
    mask = response_mask_from_ids(ids, [tok.eos_token_id])
    assert decode_responses(tok, ids, mask) == ["12", "3"]


# -------------------------------------------------------------------------------------------- batches

def make_batch(B, P, T, K=3, version=0, fill=1.0):
    return RolloutBatch(
        prompt_ids=torch.full((B, P), 5), prompt_mask=torch.ones(B, P, dtype=torch.long),
        response_ids=torch.full((B, T), 6), response_mask=torch.ones(B, T),
        rollout_logp=torch.full((B, T), -fill), topk_ids=torch.full((B, T, K), 7),
        topk_logp=torch.full((B, T, K), -fill), model_version=version,
    )


def test_rollout_batch_properties_select_and_to():
    batch = make_batch(3, 2, 4)
    assert len(batch) == 3 and batch.input_ids.shape == (3, 6) and batch.attention_mask.dtype == torch.long
    sub = batch.select(torch.tensor([2, 0]))
    assert len(sub) == 2 and sub.topk_ids.shape == (2, 4, 3)
    assert len(batch.select(torch.tensor([True, False, True]))) == 2
    assert batch.to("cpu").rollout_logp.device.type == "cpu"


def test_rollout_batch_cat_pads_prompts_left_and_responses_right():
    merged = RolloutBatch.cat([make_batch(2, 3, 2), make_batch(1, 1, 4)])
    assert merged.prompt_ids.shape == (3, 3) and merged.response_ids.shape == (3, 4)
    assert merged.prompt_mask[2].tolist() == [0, 0, 1] and merged.prompt_ids[2].tolist() == [0, 0, 5]
    assert merged.response_mask[0].tolist() == [1, 1, 0, 0]
    assert merged.response_ids[0].tolist() == [6, 6, 0, 0]
    assert merged.topk_logp.shape == (3, 4, 3) and merged.topk_logp[0, 3].tolist() == [0.0] * 3


def test_rollout_batch_validates_shapes():
    with pytest.raises(ValueError, match="topk_logp must have shape"):
        RolloutBatch(**{**make_batch(2, 3, 4).__dict__, "topk_logp": torch.zeros(2, 4, 2)})
    with pytest.raises(ValueError, match="model_version"):
        RolloutBatch.cat([make_batch(1, 1, 1, version=0), make_batch(1, 1, 1, version=1)])
    with pytest.raises(ValueError, match="non-empty"):
        RolloutBatch.cat([])


# ----------------------------------------------------------------------------- per-row uniforms
def test_uniform_sampling_is_row_local(engine, tok, prompts):
    """With `uniforms`, a row's response depends on its own prompt and uniforms only: rows sampled in
    another batch composition (as on another process) are the same tokens with the same log-probs."""
    ids, mask = prompts
    u = torch.rand(4, 10, generator=torch.Generator().manual_seed(3))
    whole = engine.generate(ids, mask, max_new_tokens=10, topk=5, uniforms=u, seed=1)
    for rows in ([0, 1], [2, 3], [3]):
        sub_ids, sub_mask = encode_prompts(tok, [PROMPTS[r] for r in rows])
        part = engine.generate(sub_ids, sub_mask, max_new_tokens=10, topk=5, uniforms=u[rows], seed=7)
        for j, r in enumerate(rows):
            n = int(whole.response_mask[r].sum())
            assert int(part.response_mask[j].sum()) == n
            assert torch.equal(part.response_ids[j, :n], whole.response_ids[r, :n])
            torch.testing.assert_close(part.rollout_logp[j, :n], whole.rollout_logp[r, :n], atol=1e-5, rtol=0)


def test_uniform_sampling_inverts_the_cdf():
    """Hand-worked: q = (0.5, 0, 0.3, 0.2); u below 0.5 -> 0, in (0.5, 0.8) -> 2 (never the 0-mass id 1),
    above -> 3."""
    from jackpot.rollout.hf import inverse_cdf, point_mass

    logq = torch.tensor([0.5, 0.0, 0.3, 0.2]).log().expand(6, 4)
    u = torch.tensor([0.0, 0.49, 0.51, 0.79, 0.81, 0.999999])
    assert inverse_cdf(logq, u).tolist() == [0, 0, 2, 2, 3, 3]
    assert torch.softmax(point_mass(torch.zeros(2, 4), torch.tensor([1, 3])), -1).tolist() == \
        [[0, 1, 0, 0], [0, 0, 0, 1]]


def test_uniform_sampling_follows_q(engine, prompts):
    """Frequencies of the first token over many uniforms match the recorded q (chi-square-sized tolerance)."""
    ids, mask = prompts
    n = 4000
    rows = torch.zeros(n, dtype=torch.long)
    u = torch.rand(n, 1, generator=torch.Generator().manual_seed(0))
    out = engine.generate(ids[rows], mask[rows], max_new_tokens=1, topk=3, uniforms=u, temperature=0.8)
    counts = torch.bincount(out.response_ids[:, 0], minlength=out.topk_ids.max() + 1).double() / n
    top = out.topk_ids[0, 0]
    q = out.topk_logp[0, 0].double().exp()
    assert torch.allclose(counts[top], q, atol=4 * (q * (1 - q) / n).sqrt().max().item() + 1e-3)


def test_uniforms_shape_is_checked(engine, prompts):
    ids, mask = prompts
    with pytest.raises(ValueError, match="uniforms must be"):
        engine.generate(ids, mask, max_new_tokens=10, uniforms=torch.rand(4, 3))


# ------------------------------------------------------------------------------------------ engine factory

def test_engine_factory_and_unknown_engine(model, tok):
    for name in HF_ENGINES:
        engine = make_engine(name, model, tok)
        assert isinstance(engine, RolloutEngine) and engine.per_row_uniforms
    assert make_engine("hf-static", model, tok).cache_implementation == "static"
    with pytest.raises(ValueError, match="unknown rollout engine 'sglang'"):
        make_engine("sglang", model, tok)


@pytest.mark.parametrize("name", HF_ENGINES)
def test_an_engine_over_the_trainers_module_samples_its_current_weights(tok, prompts, name):
    """The default engine holds no weights: it samples the module as it is now (an in-place update shows at
    once), `push_weights` only stamps the version, and a push of weights to it is refused."""
    model = _fresh(tok, 0)
    engine = make_engine(name, model, tok)
    assert not engine.holds_weights and engine.dtype is None and engine.max_topk is None
    before = rollout(engine, prompts, seed=3)
    model.load_state_dict(_fresh(tok, 1).state_dict())
    push_weights(engine, model, 7)
    after = rollout(engine, prompts, seed=3)
    assert after.model_version == 7 and before.model_version == 0
    reference = rollout(make_engine(name, _fresh(tok, 1), tok), prompts, seed=3)
    torch.testing.assert_close(after.rollout_logp, reference.rollout_logp, atol=0, rtol=0)
    with pytest.raises(ValueError, match="takes None"):
        engine.sync_weights(checkpoint_weights(model), 8)


@pytest.mark.parametrize("lora", [False, True])
def test_an_engine_with_its_own_copy_samples_the_pushed_weights_only(tok, prompts, lora):
    """`own_copy=True`: the engine samples a copy (LoRA merged), so an in-place update of the trained module
    changes nothing until `push_weights`; after it, the samples are the updated model's, bit for bit; the
    trained module keeps its adapters."""
    model = _fresh(tok, 0)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    engine = HFRolloutEngine(model, tok, own_copy=True)
    assert engine.holds_weights and engine.dtype == torch.float32
    before = rollout(engine, prompts, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    torch.testing.assert_close(rollout(engine, prompts, seed=3).rollout_logp, before.rollout_logp, atol=0, rtol=0)
    push_weights(engine, model, 1)
    after = rollout(engine, prompts, seed=3)
    assert after.model_version == 1 and not torch.equal(after.rollout_logp, before.rollout_logp)
    reference = rollout(make_engine("hf", model, tok), prompts, seed=3)  # the trained module itself
    torch.testing.assert_close(after.rollout_logp, reference.rollout_logp, atol=1e-5, rtol=0)
    assert torch.equal(after.response_ids, reference.response_ids)
    assert hasattr(model, "merge_and_unload") == lora  # the trained module still carries its adapters
    push_weights(engine, model, 1)  # already at version 1: nothing pushed
    with pytest.raises(ValueError, match="needs the weights"):
        engine.sync_weights(None, 2)


def _fresh(tok, seed):
    return build_tiny_qwen(len(tok), hidden_size=32, num_layers=2, num_heads=2, seed=seed,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)


def test_chat_template_is_applied_when_the_tokenizer_has_one(tok):
    from jackpot.models.tokenizer import build_byte_tokenizer

    plain = build_byte_tokenizer()
    chat = build_byte_tokenizer()
    chat.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                          "{% if add_generation_prompt %}>{% endif %}")

    def text(tokenizer, **kw):
        ids, mask = encode_prompts(tokenizer, ["2+2?"], **kw)
        return tokenizer.decode(ids[0][mask[0].bool()])

    assert text(chat, chat_template=None) == "<user>2+2?>" == text(chat, chat_template=True)
    assert text(chat, chat_template=False) == "2+2?" == text(plain, chat_template=None)
    with pytest.raises(ValueError, match="has no chat template"):
        encode_prompts(plain, ["2+2?"], chat_template=True)


def test_eos_ids_include_the_checkpoints_generation_config(model, tok, prompts):
    """A checkpoint whose generation_config lists a second EOS (a chat model's turn end): rollouts stop at
    it and the response mask ends there."""
    import copy

    from jackpot.rollout.text import default_eos_ids

    chat = copy.deepcopy(model)
    turn_end = tok.convert_tokens_to_ids("1")
    chat.generation_config.eos_token_id = [turn_end, tok.eos_token_id]
    assert default_eos_ids(chat, tok) == [tok.eos_token_id, turn_end]
    assert default_eos_ids(model, tok) == [tok.eos_token_id]
    with torch.no_grad():  # make the turn-end token likely
        chat.lm_head.weight[turn_end] = chat.lm_head.weight[turn_end] * 0 + chat.lm_head.weight.abs().max()
    out = HFRolloutEngine(chat, tok).generate(*prompts, max_new_tokens=10, topk=2, seed=0)
    stops = (out.response_ids == turn_end) & out.response_mask.bool()
    assert stops.any()
    for row, mask in zip(out.response_ids, out.response_mask):
        hits = (row == turn_end).nonzero()
        if len(hits):  # nothing is kept after the first turn end
            assert mask[hits[0, 0] + 1:].sum() == 0 and mask[hits[0, 0]] == 1
