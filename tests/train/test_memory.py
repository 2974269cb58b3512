"""Bad input a new user meets on real hardware, refused in one line before anything loads: a pair that cannot fit
the device (from parameter counts), a vLLM fraction that cannot hold the model, a sleep level on CPU, vLLM
missing; and a checkpoint that the disk cannot hold (checked before writing, with both sizes)."""

from __future__ import annotations

import errno
import json
import sys

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from jackpot.errors import InputError, JackpotError, WriteError
from jackpot.models.shapes import parameters
from jackpot.train import checkpoint as ckpt
from jackpot.train import memory
from jackpot.train.config import build_config
from jackpot.train.config_checks import check_training_models, default_sleep_level, engine_options


def test_parameter_count_of_a_checkpoint_comes_from_its_config(tmp_path):
    config = Qwen3Config(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True)
    config.save_pretrained(tmp_path)  # the config alone: no weights are read
    assert memory.checkpoint_parameters(str(tmp_path)) == sum(p.numel() for p in Qwen3ForCausalLM(config).parameters())
    assert memory.checkpoint_parameters(str(tmp_path / "missing")) is None


def test_tiny_parameter_count_is_the_built_models():
    from jackpot.models.loading import build_tiny_qwen

    model = build_tiny_qwen(56, hidden_size=64, num_layers=2, num_heads=2, seed=0, pad_token_id=0, eos_token_id=1,
                            bos_token_id=2)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)  # small beside the matrices
    assert memory.tiny_parameters(64, 2, vocab=56) == sum(p.numel() for p in model.parameters()) - norms


def test_the_arithmetic_per_parameter():
    counts = {"policy": parameters("qwen3-8b"), "rollout_model": parameters("qwen3-1.7b")}
    need = memory.run_need(build_config(None, []), counts, 1, None)  # float32, AdamW, the rollout model joint
    assert need.weights == 4 * sum(counts.values()) and need.states == 12 * sum(counts.values())
    frozen = memory.run_need(build_config(None, ["distill.rollout_model=frozen", "policy.dtype=bfloat16",
                                                 "parallel.policy=fsdp"]), counts, 8, None)
    assert frozen.weights == 2 * counts["policy"] // 8 + 4 * counts["rollout_model"]
    assert frozen.states == 6 * counts["policy"] // 8


def test_a_pair_that_cannot_fit_is_refused_naming_the_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "checkpoint_parameters", lambda source: parameters("qwen3-8b"))
    monkeypatch.setattr(memory, "available_memory", lambda: 24 * 2**30)
    cfg = build_config(None, ["policy.path=/ckpt/Qwen3-8B", "train.mode=on-policy"])
    with pytest.raises(JackpotError, match=r"the models do not fit: at least 122\.1 GiB \(policy 8\.19B parameters "
                                           r"x 16 bytes\) before activations, and this machine has 24\.0 GiB"):
        memory.check_fits(cfg)
    monkeypatch.setattr(memory, "available_memory", lambda: 200 * 2**30)
    memory.check_fits(cfg)
    memory.check_fits(build_config(None, []))  # the offline default's tiny pair


def test_colocated_vllm_needs_its_fraction_beside_the_trainer():
    counts = {"policy": parameters("qwen3-1.7b"), "rollout_model": parameters("qwen3-0.6b")}
    gib = 2**30
    cfg = build_config(None, ["rollout.engine=vllm", "train.device=cuda", "rollout.gpu_memory_utilization=0.9"])
    need = memory.run_need(cfg, counts, 1, 80 * gib)
    with pytest.raises(JackpotError, match=r"lower rollout.gpu_memory_utilization"):
        memory._check(need, 80 * gib, "cuda:0 has 80.0 GiB free of 80.0", cfg)
    ok = build_config(None, ["rollout.engine=vllm", "train.device=cuda", "rollout.gpu_memory_utilization=0.3"])
    memory._check(memory.run_need(ok, counts, 1, 80 * gib), 80 * gib, "cuda:0", ok)  # asleep during the update
    awake = build_config(None, ["rollout.engine=vllm", "train.device=cuda", "rollout.gpu_memory_utilization=0.7",
                                "rollout.sleep_level=0"])
    with pytest.raises(JackpotError, match="do not fit"):  # awake, 0.7 x 80 GiB stays beside the optimizer states
        memory._check(memory.run_need(awake, counts, 1, 80 * gib), 80 * gib, "cuda:0", awake)


def test_sleep_level_defaults_and_refusals():
    assert default_sleep_level(build_config(None, ["rollout.engine=vllm"])) == 0  # CPU
    assert default_sleep_level(build_config(None, ["rollout.engine=vllm", "train.device=cuda"])) == 2  # joint
    assert default_sleep_level(build_config(None, ["rollout.engine=vllm", "train.device=cuda",
                                                   "distill.rollout_model=frozen"])) == 1
    assert default_sleep_level(build_config(None, ["rollout.engine=vllm", "train.device=cuda",
                                                   "rollout.async_steps=1"])) == 0
    assert engine_options(build_config(None, ["rollout.engine=vllm"]))["sleep_level"] == 0
    assert "sleep_level" not in engine_options(build_config(None, []))
    with pytest.raises(InputError, match="rollout.sleep_level=1: vLLM's sleep mode exists on CUDA"):
        build_config(None, ["rollout.engine=vllm", "rollout.sleep_level=1"])
    with pytest.raises(InputError, match="cannot sleep"):
        build_config(None, ["rollout.engine=vllm", "train.device=cuda", "rollout.sleep_level=2",
                            "rollout.async_steps=1"])
    with pytest.raises(InputError, match="rollout.engine=hf has no such option"):
        build_config(None, ["rollout.sleep_level=0"])


def test_missing_vllm_is_refused_before_anything_is_pre_trained(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "jackpot\[vllm\]"'):
        check_training_models(build_config(None, ["rollout.engine=vllm"]))
    from jackpot.cli import main

    with pytest.raises(ImportError, match="needs vLLM"):
        main(["train", "--no-progress", "--out", str(tmp_path / "run"), "rollout.engine=vllm",
              f"cache_dir={tmp_path / 'cache'}"])
    assert not (tmp_path / "cache").exists()  # nothing was pre-trained


def _pair():
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 64)).sum().backward()
    opt.step()
    return {"policy": model}, {"policy": opt}


def test_checkpoint_size_is_known_before_writing(tmp_path):
    models, opts = _pair()
    need = ckpt.checkpoint_bytes(models, opts)
    assert need == 3 * 4 * (64 * 64 + 64) + 2 * 4  # weights, two moments, a step counter per tensor (float32)
    final = ckpt.save_checkpoint(tmp_path, 1, models, opts)
    written = sum(f.stat().st_size for f in final.iterdir())
    assert need <= written < need + 8192  # what is written on top: headers, names, state.json


def test_a_disk_too_full_for_the_checkpoint_is_refused_before_writing(tmp_path, monkeypatch):
    models, opts = _pair()
    first = ckpt.save_checkpoint(tmp_path, 1, models, opts)
    free = type("Usage", (), {"free": 1000})
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: free)
    with pytest.raises(WriteError) as info:
        ckpt.save_checkpoint(tmp_path, 2, models, opts)
    assert info.value.errno == errno.ENOSPC
    assert (f"could not write {tmp_path}/checkpoints/step_000002: the disk is full: the checkpoint needs 48.8 KiB "
            f"and 1.0 KiB is free; the last complete checkpoint {first} is kept") in str(info.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000001"]


def test_torch_unexpected_pos_reads_as_a_full_disk(tmp_path, monkeypatch):
    models, opts = _pair()

    def full(obj, path, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 622336128 vs 622336080")

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(WriteError) as info:
        ckpt.save_checkpoint(tmp_path, 1, models, opts)
    text = str(info.value)
    assert info.value.errno == errno.ENOSPC and "the disk is full: the checkpoint needs" in text
    assert "unexpected pos" not in text and "\n" not in text
    assert json.dumps(text)  # one plain line
