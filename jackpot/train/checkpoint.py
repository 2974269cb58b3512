"""Atomic checkpoints of a run: both models (safetensors), both optimizers, the step.

Layout: RUN/checkpoints/step_000010/{policy.safetensors, rollout_model.safetensors, optim.pt,
state.json}. A checkpoint is written into a temporary sibling directory and renamed into place, then
RUN/checkpoints/latest (a text file naming the directory) is replaced atomically, so an interrupted
save never leaves a half-written checkpoint behind. Every random draw of a step is seeded from
(seed, step), so model + optimizer state is all a resume needs to continue exactly.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from jackpot.fileio import write_text_atomic

KEEP_LAST = 2


def save_checkpoint(run_dir: str | Path, step: int, models: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], extra: dict | None = None) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, model in models.items():
        save_file(_untie(_saved_state(model)), str(tmp / f"{name}.safetensors"))
    torch.save({k: o.state_dict() for k, o in optimizers.items()}, tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **(extra or {})}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(root / "latest", final.name)
    older = sorted(p for p in root.glob("step_*") if p != final)
    for old in older[:max(len(older) - (KEEP_LAST - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _saved_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model's state, or — when some parameters are frozen (LoRA) — the trainable ones:
    the frozen weights come from the model's own checkpoint on resume."""
    state = model.state_dict()
    frozen = {k for k, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v.detach().contiguous().cpu() for k, v in state.items() if k not in frozen}


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing storage (tied embeddings): give each its own copy."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: str | Path, models: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer]) -> dict:
    """Restore models and optimizers in place; returns state.json (with 'step')."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"not a checkpoint directory (no state.json): {path}")
    for name, model in models.items():
        missing, unexpected = model.load_state_dict(load_file(str(path / f"{name}.safetensors")), strict=False)
        frozen = {k for k, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        if unexpected or [m for m in missing if not m.endswith("lm_head.weight") and m not in frozen]:
            raise ValueError(f"checkpoint {path} does not match model {name!r}: "
                             f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    states = torch.load(path / "optim.pt", weights_only=True)
    for name, opt in optimizers.items():
        opt.load_state_dict(states[name])
    return json.loads((path / "state.json").read_text())
