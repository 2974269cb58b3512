"""Shared by the tests that train: the tiny pair of models (`TINY_MODELS`, pre-trained once per session into
the `cache` fixture of conftest.py), a tiny configuration that trains in seconds (`TINY`), and `jackpot` run
the way a user runs it, as a separate process."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY_MODELS = [
    "policy.hidden_size=32", "policy.num_layers=2", "policy.num_heads=2", "policy.sft_steps=3",
    "rollout_model.hidden_size=16", "rollout_model.num_layers=1", "rollout_model.num_heads=2",
    "rollout_model.sft_steps=3",
]
TINY = [
    *TINY_MODELS, "train.prompts_per_step=2", "train.group_size=2", "train.eval_prompts=4",
    "train.eval_samples=2", "tensorboard=false",
]


def jackpot(*args: str, env: dict | None = None, prelude: str = "", wrapper: tuple[str, ...] = (),
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """`jackpot ARGS` in a fresh process (`prelude`: Python run first in that process, e.g. a monkeypatch;
    `wrapper`: a command it runs under), with an empty Hugging Face cache and no traceback requested."""
    code = f"import sys\n{prelude}\nfrom jackpot.cli import run\nrun(sys.argv[1:])"
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(Path(tempfile.gettempdir()) / "jackpot-no-hf"),
                "JACKPOT_TRACEBACK": "", **(env or {})}
    return subprocess.run([*wrapper, sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=600)
