"""`jackpot plot RUN_DIR...`: overlay runs' metrics (reward, eval accuracy, actor-policy KL, acceptance, and the
rollout model's distillation coefficient and learning-rate multiplier when a run logs them).

Each run is labelled by its directory name; runs named `<label>-seed<N>` are grouped, drawn as
their mean with a min-max band.

`--x` picks the horizontal axis: `steps`; `flops`, the FLOPs counted so far (perf/flops); `seconds`, the measured
wall-clock seconds of the training steps so far (perf/step_s, evaluation excluded); `gpu-model`, the modelled H100
seconds so far (perf/gpu_model_s: a roofline model, not a measurement; docs/METHOD.md §11). A point at step s
stands at the sum over steps 1..s; a group of seeds at the mean of its seeds' sums.
"""

from __future__ import annotations

import argparse
import os
import re
from collections import defaultdict
from pathlib import Path

from jackpot.errors import InputError
from jackpot.fileio import write_atomic
from jackpot.metric_names import (
    EVAL_ACCURACY,
    MISMATCH_KL_K3,
    OBRS_ACCEPT_RATE,
    PERF_FLOPS,
    PERF_GPU_MODEL_S,
    PERF_STEP_S,
    REWARD_MEAN,
    ROLLOUT_MODEL_DISTILL_COEF,
    ROLLOUT_MODEL_LR_SCALE,
)
from jackpot.metrics import read_metrics

PANELS = (  # (metric, title, smoothed)
    (REWARD_MEAN, "train reward", True),
    (EVAL_ACCURACY, "policy eval accuracy (Mean@k)", False),
    (MISMATCH_KL_K3, "actor-policy KL (k3)", True),
    (OBRS_ACCEPT_RATE, "OBRS acceptance rate", True),
    (ROLLOUT_MODEL_DISTILL_COEF, "distillation coefficient", False),
    (ROLLOUT_MODEL_LR_SCALE, "rollout model lr multiplier", False),
)
OPTIONAL = (ROLLOUT_MODEL_DISTILL_COEF, ROLLOUT_MODEL_LR_SCALE)  # drawn only when a run logs it
# Axes show scale honestly: fractions span [0, 1] (a +0.02 change looks like one), non-negative quantities
# start at 0; a panel whose data leave those ranges keeps matplotlib's limits and says so in its title.
FRACTIONS = (REWARD_MEAN, EVAL_ACCURACY, OBRS_ACCEPT_RATE)
NON_NEGATIVE = (MISMATCH_KL_K3, ROLLOUT_MODEL_DISTILL_COEF, ROLLOUT_MODEL_LR_SCALE)
# multiplicative quantities, drawn on a log axis unless one is 0
LOG_SCALE = (ROLLOUT_MODEL_DISTILL_COEF, ROLLOUT_MODEL_LR_SCALE)
X_AXES = {  # --x: (the per-step metric summed into the axis, None: the step itself; the axis label)
    "steps": (None, "step"),
    "flops": (PERF_FLOPS, "FLOPs so far (counted)"),
    "seconds": (PERF_STEP_S, "seconds so far (measured, evaluation excluded)"),
    "gpu-model": (PERF_GPU_MODEL_S, "H100 seconds so far (MODELLED: roofline)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="run directories (each with a metrics.jsonl)")
    parser.add_argument("--out", default=None,
                        help="output PNG (default: RUN/plot.png for one run; for several, plot-<names>.png in "
                             "their common parent directory)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--smooth", type=int, default=5,
                        help="moving-average window for per-step curves (1: raw; default: %(default)s)")
    parser.add_argument("--x", default="steps", metavar="{" + ",".join(X_AXES) + "}",
                        help="horizontal axis: steps, FLOPs counted, measured seconds, or modelled H100 seconds "
                             "(a roofline model; docs/METHOD.md §11); default: %(default)s")


def _series(records: list[dict], key: str, x: str = "steps") -> tuple[list[float], list[float]]:
    """(x, value) of every record logging `key`; x as `--x` names it (module docstring)."""
    position = x_positions(records, x)
    pts = [(position[r["step"]], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def check_x_axis(x: str) -> str:
    """`x` if it names an axis of X_AXES, else InputError in one line."""
    if x not in X_AXES:
        raise InputError(f"--x must be one of {', '.join(X_AXES)}, got {x!r}")
    return x


def x_positions(records: list[dict], x: str) -> dict[int, float]:
    """step -> where a record of that step stands on the `x` axis: the step, or the sum of the axis' per-step
    metric over steps 1..step (0 at step 0). InputError for an unknown axis or a run that never logged it."""
    key = X_AXES[check_x_axis(x)][0]
    if key is None:
        return {r["step"]: float(r["step"]) for r in records}
    if not any(r.get(key) is not None for r in records if r["step"] > 0):
        raise InputError(f"--x {x}: the run logs no {key} (runs before the cost accounting); plot it with --x steps")
    total, out = 0.0, {}
    for r in sorted(records, key=lambda r: r["step"]):
        total += (r.get(key) or 0.0) if r["step"] > 0 else 0.0
        out[r["step"]] = total
    return out


def group_runs(run_dirs: list[str | Path]) -> dict[str, list[list[dict]]]:
    """label -> list of runs' records; '-seedN' suffixes are stripped so seeds group together."""
    groups: dict[str, list[list[dict]]] = defaultdict(list)
    for d in run_dirs:
        label = re.sub(r"-seed\d+$", "", Path(d).name)
        groups[label].append(read_metrics(d))
    return dict(groups)


def _moving_average(values, window: int):
    import numpy as np

    if window <= 1 or values.shape[-1] < window:
        return values
    kernel = np.ones(window) / window
    return np.stack([np.convolve(v, kernel, mode="valid") for v in values])


def set_limits(ax, key: str, values: list[float]) -> bool:
    """[0, 1] for fractions, a log axis for multiplicative quantities (all > 0), [0, ...) for non-negative
    ones; False if the data leave that range."""
    if not values:
        return True
    lo, hi = min(values), max(values)
    if key in FRACTIONS and 0 <= lo and hi <= 1:
        ax.set_ylim(0, 1)
        return True
    if key in LOG_SCALE and lo > 0:
        ax.set_yscale("log")
        return True
    if key in NON_NEGATIVE and lo >= 0:
        ax.set_ylim(bottom=0, top=hi * 1.05 if hi > 0 else 1)
        return True
    return False


def default_out(run_dirs: list[str | Path]) -> Path:
    """RUN/plot.png for one run; plot-<name>+<name>....png in the runs' common parent for several."""
    dirs = [Path(d).resolve() for d in run_dirs]
    if len(dirs) == 1:
        return dirs[0] / "plot.png"
    parent = Path(os.path.commonpath([str(d.parent) for d in dirs]))
    names = "+".join(dict.fromkeys(re.sub(r"-seed\d+$", "", d.name) for d in dirs))
    return parent / f"plot-{names[:120]}.png"


def plot_runs(run_dirs: list[str | Path], out: str | Path, title: str | None = None, smooth: int = 5,
              x: str = "steps") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    check_x_axis(x)
    groups = group_runs(run_dirs)
    colors = {label: f"C{i % 10}" for i, label in enumerate(groups)}  # one colour per run group in every panel
    logged = {k for runs in groups.values() for records in runs for r in records for k in r}
    panels = [p for p in PANELS if p[0] not in OPTIONAL or p[0] in logged]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, name, smoothed) in zip(axes, panels):
        for label, runs in groups.items():
            series = [s for s in (_series(r, key, x) for r in runs) if s[0]]
            if not series:
                continue
            n = min(len(s[0]) for s in series)
            window = smooth if smoothed else 1
            steps = _moving_average(np.array([s[0][:n] for s in series], dtype=float).mean(0, keepdims=True),
                                    window)[0]
            vals = _moving_average(np.array([s[1][:n] for s in series], dtype=float), window)
            ax.plot(steps, vals.mean(0), color=colors[label], label=f"{label} (n={len(series)})")
            if len(series) > 1:
                ax.fill_between(steps, vals.min(0), vals.max(0), color=colors[label], alpha=0.15)
        honest = set_limits(ax, key, [v for line in ax.get_lines() for v in line.get_ydata()])
        ax.set_title(name + (f" (moving avg {smooth})" if smoothed and smooth > 1 else "")
                     + (" (log scale)" if ax.get_yscale() == "log" else "")
                     + ("" if honest else "\n(y axis zoomed, not from 0)"), fontsize=10)
        ax.set_xlabel(X_AXES[x][1])
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(groups), fontsize=8,
               frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return out


def main(args: argparse.Namespace) -> int:
    print(plot_runs(args.runs, args.out or default_out(args.runs), args.title, smooth=args.smooth, x=args.x))
    return 0
