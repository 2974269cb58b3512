"""Atomic checkpoints of a run: both models (safetensors), both optimizers, the step.

Layout: RUN/checkpoints/step_000010/{policy.safetensors, rollout_model.safetensors, optim.pt,
state.json}. A checkpoint is written into a temporary sibling directory and renamed into place, then
RUN/checkpoints/latest (a text file naming the directory) is replaced atomically, so an interrupted
save never leaves a half-written checkpoint behind. Every random draw of a step is seeded from
(seed, step), so model + optimizer state is all a resume needs to continue exactly.

Several processes: the same layout, but a checkpoint directory is a torch.distributed.checkpoint (DCP)
one — every rank writes its shards (FSDP2) or rank 0 the replicated tensors (DDP) into the temporary
directory, then, after all ranks are done, rank 0 writes state.json, renames it into place and moves
`latest`. A save killed on any rank leaves only the temporary directory, which nothing points to.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from jackpot.errors import InputError, checkpoint_write_error
from jackpot.fileio import write_text_atomic
from jackpot.train.distributed import Collective

KEEP_LAST = 2


def save_checkpoint(run_dir: str | Path, step: int, models: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], extra: dict | None = None,
                    coll: Collective | None = None, local: dict | None = None) -> Path:
    """Write step `step`'s checkpoint (module docstring): `extra` joins state.json; `local` is this process's own
    state (tensors and plain values, e.g. the batches generated ahead), read back by `load_local`."""
    if coll is not None and coll.world > 1:
        return _save_sharded(run_dir, step, models, optimizers, extra, coll, local)
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    need = checkpoint_bytes(models, optimizers)
    try:  # a failed write (full disk, Ctrl-C) leaves no temporary directory; `latest` still names the last one
        check_space(tmp, need)
        for name, model in models.items():
            save_file(_untie(_saved_state(model)), str(tmp / f"{name}.safetensors"))
        torch.save({k: o.state_dict() for k, o in optimizers.items()}, tmp / "optim.pt")
        if local is not None:
            torch.save(local, tmp / _local_name(0))
        (tmp / "state.json").write_text(json.dumps({"step": step, **(extra or {})}))
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, Exception):
            raise
        if "unexpected pos" in str(e):  # torch's zip writer, short of space: "[enforce fail ...] unexpected pos N vs M"
            e = OSError(errno.ENOSPC, disk_full(need, shutil.disk_usage(root).free))
        raise checkpoint_write_error(e, final, latest_checkpoint(run_dir)) from e
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _publish(root, final)
    return final


def checkpoint_bytes(models: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> int:
    """The bytes of tensor data a one-process checkpoint of `models` and `optimizers` writes (headers aside)."""
    total = 0
    for model in models.values():
        frozen = {k for k, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        total += sum(v.numel() * v.element_size() for k, v in model.state_dict().items() if k not in frozen)
    for opt in optimizers.values():
        total += sum(t.numel() * t.element_size() for state in opt.state.values() for t in state.values()
                     if torch.is_tensor(t))
    return total


def disk_full(need: int, free: int) -> str:
    """The reason a checkpoint cannot be written, with its size and the free space."""
    return f"the disk is full: the checkpoint needs {_gib(need)} and {_gib(free)} is free"


def check_space(directory: Path, need: int) -> None:
    """OSError(ENOSPC) naming both sizes if the file system of `directory` has less than `need` bytes free."""
    free = shutil.disk_usage(directory).free
    if need > free:
        raise OSError(errno.ENOSPC, disk_full(need, free))


def _gib(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 1024:.1f} KiB"


def _publish(root: Path, final: Path) -> None:
    """Point `latest` at `final` (atomically) and drop all but the KEEP_LAST newest checkpoints."""
    write_text_atomic(root / "latest", final.name)
    older = sorted(p for p in root.glob("step_*") if p != final)
    for old in older[:max(len(older) - (KEEP_LAST - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def _dcp_state(models: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> dict:
    """{name: {'model': ..., 'optim': ...}} as torch.distributed.checkpoint's state_dict helpers give them
    (fully qualified names; DTensor shards for FSDP2)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    state = {}
    for name, model in models.items():
        if name in optimizers:
            msd, osd = get_state_dict(model, optimizers[name])
            state[name] = {"model": msd, "optim": osd}
        else:
            state[name] = {"model": get_model_state_dict(model)}
    return state


def _save_sharded(run_dir, step, models, optimizers, extra, coll: Collective, local: dict | None) -> Path:
    import torch.distributed.checkpoint as dcp

    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step_{step:06d}", root / f".tmp_step_{step:06d}"
    if coll.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    coll.barrier()
    try:  # DCP gathers a failure on any rank and raises it on every rank (a CheckpointException: BaseException)
        dcp.save(_dcp_state(models, optimizers), checkpoint_id=str(tmp))
        if local is not None:
            torch.save(local, tmp / _local_name(coll.rank))
    except BaseException as e:
        if coll.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise checkpoint_write_error(_first_failure(e), final, latest_checkpoint(run_dir)) from e
    coll.barrier()  # every rank's shards are on disk
    if coll.is_main:
        (tmp / "state.json").write_text(json.dumps({"step": step, "processes": coll.world, **(extra or {})}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _publish(root, final)
    coll.barrier()
    return final


def _local_name(rank: int) -> str:
    return f"local_rank{rank}.pt"


def load_local(path: str | Path, rank: int = 0) -> dict | None:
    """The `local` state process `rank` saved in checkpoint `path` (None if it saved none)."""
    file = Path(path) / _local_name(rank)
    return torch.load(file, weights_only=True) if file.is_file() else None


def _first_failure(e: BaseException) -> BaseException:
    """The first rank's own error inside DCP's CheckpointException (e.g. the OSError of a full disk)."""
    failures = getattr(e, "failures", None)  # {rank: (exception, traceback summary)}
    if not failures:
        return e
    first = failures[min(failures)]
    return first[0] if isinstance(first, tuple) else first


def _load_sharded(path: Path, models, optimizers) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    state = _dcp_state(models, optimizers)
    dcp.load(state, checkpoint_id=str(path))
    for name, model in models.items():
        if name in optimizers:
            set_state_dict(model, optimizers[name], model_state_dict=state[name]["model"],
                           optim_state_dict=state[name]["optim"])
        else:
            set_model_state_dict(model, state[name]["model"])


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


RUN_RECORDS = ("metrics.jsonl", "checkpoints")
"""What a run writes into its directory once it has started: a directory holding either holds a run."""


def holds_run(run_dir: str | Path) -> bool:
    """Whether `run_dir` holds a run (its metrics or its checkpoints), finished or not."""
    return any((Path(run_dir) / name).exists() for name in RUN_RECORDS)


def refuse_used_run_dir(run_dir: str | Path) -> None:
    """FileExistsError when `run_dir` holds a run: a new run there would mix its records with the old one's."""
    if holds_run(run_dir):
        raise FileExistsError(f"run directory {run_dir} already holds a run: continue it with `jackpot train --out "
                              f"{run_dir} --resume` (resume=True from Python), or leave out --out to start a new one")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: str | Path, models: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], coll: Collective | None = None) -> dict:
    """Restore models and optimizers in place; returns state.json (with 'step'). A checkpoint written by
    several processes loads into any number of processes (one included); a one-process checkpoint only
    into one process."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"not a checkpoint directory (no state.json): {path}")
    if (path / ".metadata").is_file():  # written by several processes (torch.distributed.checkpoint)
        _load_sharded(path, models, optimizers)
        return json.loads((path / "state.json").read_text())
    if coll is not None and coll.world > 1:
        raise InputError(f"checkpoint {path} was written by one process: resume it with one process (its "
                         "optimizer state is not laid out for sharding), or start a new run")
    for name, model in models.items():
        missing, unexpected = model.load_state_dict(load_file(str(path / f"{name}.safetensors")), strict=False)
        frozen = {k for k, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        if unexpected or [m for m in missing if not m.endswith("lm_head.weight") and m not in frozen]:
            raise InputError(f"checkpoint {path} does not match model {name!r}: "
                             f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    states = torch.load(path / "optim.pt", weights_only=True)
    for name, opt in optimizers.items():
        opt.load_state_dict(states[name])
    return json.loads((path / "state.json").read_text())


def export_models(run_dir: str | Path, models: dict[str, torch.nn.Module], wrapped: dict[str, torch.nn.Module],
                  tokenizer, coll: Collective | None = None) -> Path:
    """Write the models as Hugging Face directories RUN/final/<name> (config, safetensors, tokenizer), which
    `jackpot eval --model`, `from_pretrained` and vLLM load. Written into a temporary directory and renamed
    into place (rank 0; a sharded model is gathered first). LoRA: the adapters (peft's format)."""
    coll = coll or Collective()
    states = {name: _full_state(model, wrapped.get(name)) for name, model in models.items()}
    final, tmp = Path(run_dir) / "final", Path(run_dir) / ".tmp_final"
    if coll.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for name, model in models.items():
                model.save_pretrained(tmp / name, state_dict=states[name])
                tokenizer.save_pretrained(tmp / name)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if not isinstance(e, Exception):
                raise
            raise checkpoint_write_error(e, final, latest_checkpoint(run_dir)) from e
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    coll.barrier()
    return final


def _full_state(model: torch.nn.Module, wrapped: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state on the CPU; every rank must call it (FSDP2 gathers)."""
    from jackpot.train.distributed import is_sharded

    if wrapped is not None and is_sharded(wrapped):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
