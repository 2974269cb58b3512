"""`jackpot plot RUN_DIR...`: overlay runs' metrics (reward, eval accuracy, actor-policy KL, acceptance).

Each run is labelled by its directory name; runs named `<label>-seed<N>` are grouped, drawn as
their mean with a min-max band.
"""

from __future__ import annotations

import argparse
import os
import re
from collections import defaultdict
from pathlib import Path

from jackpot.metrics import read_metrics

PANELS = (
    ("reward/mean", "train reward", "linear"),
    ("eval/accuracy", "policy eval accuracy (Mean@k)", "linear"),
    ("mismatch/kl_k3", "actor-policy KL (k3)", "log"),
    ("obrs/accept_rate", "OBRS acceptance rate", "linear"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="run directories (each with a metrics.jsonl)")
    parser.add_argument("--out", default="runs/plot.png", help="output PNG (default: %(default)s)")
    parser.add_argument("--title", default=None)


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def group_runs(run_dirs: list[str | Path]) -> dict[str, list[list[dict]]]:
    """label -> list of runs' records; '-seedN' suffixes are stripped so seeds group together."""
    groups: dict[str, list[list[dict]]] = defaultdict(list)
    for d in run_dirs:
        label = re.sub(r"-seed\d+$", "", Path(d).name)
        groups[label].append(read_metrics(d))
    return dict(groups)


def plot_runs(run_dirs: list[str | Path], out: str | Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = group_runs(run_dirs)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for ax, (key, name, scale) in zip(axes, PANELS):
        for label, runs in groups.items():
            series = [_series(r, key) for r in runs]
            series = [s for s in series if s[0]]
            if not series:
                continue
            n = min(len(s[0]) for s in series)
            steps = np.array(series[0][0][:n])
            vals = np.array([s[1][:n] for s in series])
            line, = ax.plot(steps, vals.mean(0), label=f"{label} (n={len(series)})")
            if len(series) > 1:
                ax.fill_between(steps, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.2)
        ax.set_title(name)
        ax.set_xlabel("step")
        if scale == "log" and ax.has_data():
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def main(args: argparse.Namespace) -> int:
    print(plot_runs(args.runs, args.out, args.title))
    return 0
