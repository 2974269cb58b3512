"""LoRA (peft) for either model: only the adapters train, checkpoints hold the adapters, resume is exact."""

from __future__ import annotations

import pytest
import torch

from jackpot.cli import main as cli_main
from jackpot.metrics import read_metrics
from jackpot.train.config import build_config
from jackpot.train.loop import setup, train_step

pytest.importorskip("peft")

TINY = [
    "policy.hidden_size=32", "policy.num_layers=2", "policy.num_heads=2", "policy.sft_steps=2",
    "rollout_model.hidden_size=16", "rollout_model.num_layers=1", "rollout_model.num_heads=2",
    "rollout_model.sft_steps=2", "train.prompts_per_step=2", "train.group_size=4", "train.eval_prompts=4",
    "train.eval_samples=2", "tensorboard=false", "policy.lr=1e-2", "rollout_model.lr=1e-2",
    "policy.lora_rank=4", "rollout_model.lora_rank=2", "rollout_model.lora_target_modules=q_proj,v_proj",
]


def test_only_the_adapters_train(tmp_path, cache):
    run = setup(build_config(None, [*TINY, f"cache_dir={cache}"]), tmp_path / "run")
    object.__setattr__(run.task, "reward", lambda ex, c: float(len(c) % 2))  # non-zero advantages
    before = {n: {k: p.detach().clone() for k, p in m.named_parameters()} for n, m in run.models.items()}
    train_step(run, 1)
    for name, model in run.models.items():
        changed = {k for k, p in model.named_parameters() if not torch.equal(p, before[name][k])}
        assert changed and all("lora_" in k for k in changed), name
        assert all(p.requires_grad == ("lora_" in k) for k, p in model.named_parameters())
    targets = {k.split(".")[-4] for k, _ in run.rollout_model.named_parameters() if "lora_A" in k}
    assert targets == {"q_proj", "v_proj"}


def test_checkpoints_hold_the_adapters_and_resume_exactly(tmp_path, cache):
    from safetensors.torch import load_file

    args = ["train", "--no-progress", *TINY, f"cache_dir={cache}"]
    cli_main([*args, "--out", str(tmp_path / "full"), "train.steps=2"])
    cli_main([*args, "--out", str(tmp_path / "cut"), "train.steps=1"])
    saved = load_file(str(tmp_path / "cut" / "checkpoints" / "step_000001" / "policy.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    cli_main(["train", "--no-progress", "--out", str(tmp_path / "cut"), "--resume", "train.steps=2"])
    full, cut = read_metrics(tmp_path / "full")[-1], read_metrics(tmp_path / "cut")[-1]
    for k in full:
        if not k.startswith("perf/"):
            assert full[k] == cut[k], k


def test_lora_without_peft_is_a_clear_error(tmp_path, cache, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_peft(name, *a, **kw):
        if name == "peft":
            raise ImportError("no peft")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    with pytest.raises(ImportError, match=r"jackpot\[lora\]"):
        setup(build_config(None, [*TINY, f"cache_dir={cache}"]), tmp_path / "run")


def test_unwrap_peft_finds_the_causal_lm_that_holds_the_adapters():
    from peft import LoraConfig, get_peft_model

    from jackpot.models.forward import output_head, unwrap_peft
    from jackpot.models.loading import build_tiny_qwen

    model = build_tiny_qwen(40, hidden_size=16, num_layers=1, num_heads=2, seed=0, pad_token_id=0, eos_token_id=1,
                            bos_token_id=2)
    assert unwrap_peft(model) is model
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    inner = unwrap_peft(wrapped)
    assert inner is wrapped.get_base_model() and type(inner) is type(model)
    assert any("lora_A" in name for name, _ in inner.named_parameters())  # the adapters live in it
    assert output_head(wrapped)[0] is output_head(model)[0]
