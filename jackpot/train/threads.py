"""How many CPU threads torch uses when `train.threads` is not set.

torch's own default is the machine's core count, which ignores both the CPUs this process may actually use
(affinity masks, container quotas) and how small the models are. On a shared 2-core machine with four
jobs, that oversubscription made the offline default 40x slower (68 minutes instead of about 100 s).
The default here is the number of CPUs the process may use (`os.sched_getaffinity`, capped by a cgroup v2
`cpu.max` quota), and a single thread for tiny models: for them a second thread gains ~20 % on an idle
machine but costs 4-10x as soon as another job wants a core (docs/PERFORMANCE.md, "Threads").
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from jackpot.train.config import Config, ModelConfig

# A model below this many parameters runs on one thread by default (the offline default's are 0.11M and
# 0.65M; docs/PERFORMANCE.md, "Threads").
TINY_MODEL_PARAMS = 5_000_000
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota if one is set."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _tiny_params(mc: ModelConfig) -> int | None:
    """Approximate parameter count of a tiny model built from `mc` (None: a checkpoint of unknown size)."""
    if mc.path is not None:
        return None
    h = mc.hidden_size
    return mc.num_layers * (4 * h * h + 3 * h * 3 * h)  # attention + MLP (3 * hidden), embeddings aside


def default_threads(cfg: Config) -> tuple[int, str]:
    """(threads, why) for a run whose `train.threads` is None."""
    cpus = available_cpus()
    models = [cfg.policy] + ([cfg.rollout_model] if cfg.decoupled else [])
    sizes = [_tiny_params(mc) for mc in models]
    if all(s is not None and s < TINY_MODEL_PARAMS for s in sizes):
        return 1, f"default for tiny models; {cpus} CPU(s) usable"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # processes on this node (torchrun, accelerate)
    if local > 1:
        return max(1, cpus // local), f"default: {cpus} usable CPU(s) shared by {local} processes on this node"
    return cpus, "default: the CPUs this process may use"


def choose_threads(cfg: Config) -> tuple[int, str]:
    """(threads, why): `train.threads` if set, else `default_threads`."""
    if cfg.train.threads is not None:
        return cfg.train.threads, "train.threads"
    return default_threads(cfg)
