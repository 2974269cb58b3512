"""Checks a run makes before any model is built or loaded, so that a bad device, a broken or unreachable
model, unreadable data or an unwritable run directory fails in seconds with one line naming it — not after
minutes of pre-training, and not as a library's traceback.

    check_device(name)        the torch device exists in this torch build and on this machine
    check_writable_dir(path)  the run directory can be created and written (nothing is left behind)
    check_run(cfg, out)       all of the above, plus both models' sources, the task's data, and whether the models
                              fit the device (`jackpot.train.memory.check_fits`, from parameter counts)
"""

from __future__ import annotations

import uuid
from pathlib import Path

import torch

from jackpot.errors import JackpotError, WriteError
from jackpot.models.loading import check_model_source
from jackpot.tasks import make_task
from jackpot.train.config import Config
from jackpot.train.memory import check_fits


def check_device(name: str) -> torch.device:
    """`torch.device(name)` if this torch can allocate on it; JackpotError naming the fix otherwise."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise JackpotError(f"train.device={name!r} is not a torch device ({str(e).splitlines()[0]}); "
                           "use e.g. train.device=cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build (pip install a CUDA build of torch)" if torch.version.cuda is None
                   else "no CUDA GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
            raise JackpotError(f"train.device={name!r} but {why}; use train.device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise JackpotError(f"train.device={name!r} but only {torch.cuda.device_count()} CUDA device(s) are "
                               f"visible (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    if device.type != "cpu":
        try:
            torch.empty(1, device=device)
        except (RuntimeError, AssertionError) as e:
            raise JackpotError(f"train.device={name!r} cannot be used by this torch ({str(e).splitlines()[0]}); "
                               "use train.device=cpu") from None
    return device


def check_writable_dir(path: str | Path, what: str = "--out") -> None:
    """Create `path` (and parents) if needed and write a probe file in it; WriteError naming `what`.

    Directories this check created are removed again, so a run that fails later leaves nothing behind. Under
    torchrun every rank runs it on the same path at the same moment: a directory another rank created first is
    not an error, and one it removed while this rank probed is created again (a few tries)."""
    path = Path(path)
    created = []
    probe = path / f".write-test-{uuid.uuid4().hex[:8]}"
    try:
        for attempt in range(5):
            try:
                for parent in (*reversed(path.parents), path):
                    if not parent.exists():
                        try:
                            parent.mkdir()
                        except FileExistsError:  # another rank made it between the test and the mkdir
                            continue
                        created.append(parent)
                probe.write_text("")
                probe.unlink()
                return
            except FileNotFoundError:  # another rank removed the directory it had created
                if attempt == 4:
                    raise
    except OSError as e:
        raise WriteError(path, e, f"{what} must be a directory you can write to") from None
    finally:
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass


def check_run(cfg: Config, out: str | Path) -> None:
    """Everything `jackpot train` can check before it loads or builds a model (see the module docstring)."""
    check_device(cfg.train.device)
    roles = [("policy", cfg.policy)] + ([("rollout_model", cfg.rollout_model)] if cfg.decoupled else [])
    for role, mc in roles:
        if mc.path is not None:
            check_model_source(mc.path, f"{role}.path")
    try:
        make_task(cfg.task.name, **cfg.task.options)
    except (OSError, ValueError, TypeError) as e:
        if isinstance(e, OSError) and e.filename:
            reason = f"{e.strerror}: {e.filename}"
        else:
            reason = " ".join(str(e).split())
        raise JackpotError(f"task.name={cfg.task.name} task.options={cfg.task.options}: {reason}") from None
    check_fits(cfg)
    check_writable_dir(out)
