"""Runs the verl checks (tests/integrations/verl_env/checks_verl.py) in verl's own virtual environment.

verl 0.9 pins transformers < 5.11, so it cannot share the test environment. .ci/run builds
`.venv-verl` (torch 2.13.0 CPU, then `pip install -e ".[verl]" pytest`) and sets
JACKPOT_REQUIRE_VERL=1, which makes a missing environment a failure here; elsewhere the test skips
and says how to create it. JACKPOT_VERL_PYTHON points at another interpreter that has verl.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cli_helpers import pytest_in_other_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CHECKS = ROOT / "tests" / "integrations" / "verl_env" / "checks_verl.py"


def _verl_python() -> Path | None:
    given = os.environ.get("JACKPOT_VERL_PYTHON")
    path = Path(given) if given else ROOT / ".venv-verl" / "bin" / "python"
    return path if path.exists() else None


def test_verl_integration_in_its_own_environment():
    message = ("no verl environment: create it with `python3 -m venv .venv-verl && .venv-verl/bin/pip install "
               "torch==2.13.0 && .venv-verl/bin/pip install -e '.[verl]' pytest` (as .ci/run does), or set "
               "JACKPOT_VERL_PYTHON")
    pytest_in_other_env(_verl_python(), CHECKS, missing=message, required_by="JACKPOT_REQUIRE_VERL")
