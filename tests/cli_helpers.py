"""Shared by the tests that train: the tiny pair of models (`TINY_MODELS`, pre-trained once per session into
the `cache` fixture of conftest.py), a tiny configuration that trains in seconds (`TINY`), and `jackpot` run
the way a user runs it, as a separate process. Also: the interpreter of vLLM's own environment (`vllm_python`),
the `needs_vllm` mark, and running a test file in another environment (`pytest_in_other_env`)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

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


def vllm_python() -> Path | None:
    """The interpreter of the vLLM environment (JACKPOT_VLLM_PYTHON, else .venv-vllm/bin/python) if it exists."""
    given = os.environ.get("JACKPOT_VLLM_PYTHON")
    path = Path(given) if given else REPO / ".venv-vllm" / "bin" / "python"
    return path if path.exists() else None


HAVE_VLLM = importlib.util.find_spec("vllm") is not None
# Without vLLM here the vLLM tests skip: test_vllm_in_its_env.py runs them in .venv-vllm. With JACKPOT_REQUIRE_VLLM=1
# (CI) and no such environment either, they run and fail (the engine's ImportError names what to install).
needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM and not (os.environ.get("JACKPOT_REQUIRE_VLLM") == "1" and vllm_python() is None),
    reason="vLLM is not installed here; tests/rollout/test_vllm_in_its_env.py runs these in .venv-vllm "
           "(README: 'The vLLM engine')")


def pytest_in_other_env(python: Path, tests: Path, *, missing: str, required_by: str) -> None:
    """Run the pytest file `tests` with another environment's interpreter `python` (None: that environment is
    absent, `missing` says how to build it: a failure when the variable `required_by` is "1", as in CI, else a
    skip); fails unless every test there ran and passed."""
    if python is None:
        if os.environ.get(required_by) == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-2000:]
