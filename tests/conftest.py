"""Test-wide settings and the markers that split the suite.

- One torch thread: the models here are tiny; on a shared 2-core machine a second thread makes them
  several times slower, not faster.
- `tests/` itself is importable from every sub-folder, so the shared helpers (`reference`: the float64
  reference loops; `cli_helpers`: `jackpot` run as a separate process on tiny models) are imported by
  name.
- Markers (registered in pyproject.toml): `slow` (end-to-end runs of a minute or more),
  `multiprocess` (torchrun / several processes), `integration` (other frameworks: TRL, verl). The
  README's command runs everything; `python -m pytest -q -m "not slow"` is the quick inner loop.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """The pre-trained tiny models' cache (`cache_dir=...`), shared by the whole session: a tiny model is
    pre-trained once per spec (e.g. `cli_helpers.TINY_MODELS`), whichever test needs it first."""
    return tmp_path_factory.mktemp("model_cache")
