"""Metric sinks of a run: metrics.jsonl (always), TensorBoard (default) and Weights & Biases (optional).

Core functions return 0-dim tensors; `scalars()` turns a dict of them into floats with a single
device sync per step (one stacked `.tolist()`), which is the only place the loop reads values back.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

import torch

from jackpot.errors import warn
from jackpot.fileio import write_text_atomic


def scalars(metrics: dict[str, torch.Tensor | float | int]) -> dict[str, float]:
    """{name: 0-dim tensor or number} -> {name: float}, one host transfer for all the tensors."""
    tensor_keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
    if tensor_keys:
        values = torch.stack([metrics[k].detach().float().reshape(()).cpu() for k in tensor_keys]).tolist()
        out.update(zip(tensor_keys, values))
    return out


def standard_error(rewards: torch.Tensor) -> float:
    """Standard error of Mean@k over prompts: rewards (n prompts, k samples) -> std of the n per-prompt means
    (ddof 1) / sqrt(n). The k samples of one prompt are not independent, so the prompt is the unit; nan for
    n < 2."""
    per_prompt = rewards.double().mean(-1)
    n = per_prompt.numel()
    return float(per_prompt.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan


def mean_of(dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Average per-micro-batch metric dicts key by key (keys missing in some dicts average over the rest)."""
    keys = {k for d in dicts for k in d}
    return {k: torch.stack([d[k].detach().float().reshape(()) for d in dicts if k in d]).mean() for k in keys}


class MetricLogger:
    """Appends one JSON object per step to `run_dir/metrics.jsonl` and mirrors it to TensorBoard/W&B."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, wandb_project: str | None = None,
                 config: dict | None = None, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("wandb_project is set but wandb is not installed: pip install wandb") from e
            # The W&B run id lives in the run directory, so `--resume` continues the same W&B run.
            id_file = Path(run_dir) / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else ""
            if not run_id:
                run_id = write_text_atomic(id_file, uuid.uuid4().hex[:16]).read_text()
            self._wandb = wandb.init(project=wandb_project, config=config, dir=str(run_dir),
                                     name=Path(run_dir).resolve().name, id=run_id, resume="allow")

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps after the checkpoint so the log has no duplicates."""
        if not self.path.exists():
            return
        kept = [json.dumps(r) for r in read_metrics(self.path.parent) if r["step"] <= step]
        write_text_atomic(self.path, "".join(ln + "\n" for ln in kept))

    def log(self, step: int, values: dict[str, float]) -> None:
        record = {"step": step, **{k: (v if math.isfinite(v) else None) if isinstance(v, float) else v
                                   for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of `run_dir/metrics.jsonl`. A line that is not a JSON object with a "step" (the torn last
    line of a run killed mid-write) is skipped with a warning naming the file and line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    records = []
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            warn(f"{path}:{lineno}: skipped a line that is not a complete metrics record (torn by an interrupted "
                 f"write?): {line[:60]!r}")
            continue
        records.append(record)
    return records
