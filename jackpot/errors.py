"""Expected failures and how the command line reports them: one line, `jackpot: error: ...`.

An *expected* failure is one a user can fix (a bad value, a missing or broken file, a device that is not
there, an unreachable hub, a full disk, a directory without write permission); it is reported as one line
that names the file, field or value and says what to do, with a non-zero exit status. Anything else is a
bug and keeps its traceback. `JACKPOT_TRACEBACK=1` (or `jackpot --debug ...`) shows the traceback of
expected failures too.

Which is which is decided where the failure is raised, not by its type's name alone: the places that
check what a user gave (config validation, task options and data files, tokenizers and checkpoints, the
command-line arguments) raise `InputError`, which is a `ValueError` too (so `except ValueError` and
`pytest.raises(ValueError)` keep working), or another `JackpotError`; files that cannot be read or written
raise the OSError family; a missing optional dependency raises ImportError naming the extra to install.
`describe` turns those into the one line. A plain `ValueError` (a shape check deep inside `jackpot.core`
tripped by the trainer, an error from torch), like a `RuntimeError`, `IndexError` or `AttributeError`, is a
bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import warnings
from pathlib import Path


class JackpotError(Exception):
    """An expected failure whose message names the problem and what to do about it."""


class InputError(JackpotError, ValueError):
    """A value the user gave is wrong (a config field, a task option, a row of a data file, a command-line
    argument, a checkpoint that does not fit); the message names it and what is allowed."""


class JackpotWarning(UserWarning):
    """Something was skipped or repaired (e.g. a torn line of metrics.jsonl); the run goes on."""


def warn(message: str) -> None:
    """Emit a JackpotWarning (the CLI prints it as one `jackpot: warning: ...` line)."""
    warnings.warn(message, JackpotWarning, stacklevel=2)


class WriteError(JackpotError, OSError):
    """Writing `path` failed (disk full, permission denied, ...); nothing half-written was left behind."""

    def __init__(self, path: str | Path, cause: BaseException, kept: str = ""):
        self.path, self.cause = Path(path), cause
        code = getattr(cause, "errno", None)
        if code is None and "No space left on device" in str(cause):  # safetensors' error is not an OSError
            code = errno.ENOSPC
        reason = _os_reason(cause) if isinstance(cause, OSError) else _one_line(str(cause))
        hint = {errno.ENOSPC: "free some disk space or choose a run directory on another disk",
                errno.EACCES: "choose a directory you can write to",
                errno.EROFS: "choose a directory on a writable file system"}.get(code, "")
        parts = [f"could not write {self.path}: {reason}", kept, hint]
        super().__init__(code, "; ".join(p for p in parts if p))
        self.errno = code

    def __str__(self) -> str:
        return self.strerror


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _os_reason(e: OSError) -> str:
    if e.strerror and e.filename:
        return f"{e.strerror}: {e.filename}"
    return e.strerror or str(e)


def describe(e: BaseException) -> str | None:
    """The one-line message for an expected failure, or None for an unexpected one (a bug)."""
    if isinstance(e, JackpotError):
        return _one_line(str(e))
    if isinstance(e, OSError):
        if e.errno == errno.ENOSPC:
            return _one_line(f"no space left on device{' writing ' + str(e.filename) if e.filename else ''}: "
                             "free some disk space or choose a run directory on another disk")
        if isinstance(e, PermissionError):
            return _one_line(f"permission denied: {e.filename or e}: choose a path you can read/write")
        return _one_line(str(e) if not e.filename or str(e.filename) in str(e) else f"{_os_reason(e)}")
    if isinstance(e, ImportError):  # a missing optional dependency: the message names the extra to install
        return _one_line(str(e))
    if type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA), without importing torch here
        return _one_line(f"out of memory on the accelerator ({str(e).splitlines()[0]}): lower "
                         "train.micro_batch_tokens or train.head_chunk, or use a smaller model / dtype=bfloat16")
    return None


def checkpoint_write_error(e: Exception, path: Path, kept: Path | None) -> WriteError:
    """What a failed checkpoint save raises: a WriteError that says which checkpoint is still the latest."""
    return WriteError(path, e, f"the last complete checkpoint {kept} is kept (--resume continues from it)"
                      if kept is not None else "no complete checkpoint exists yet")
