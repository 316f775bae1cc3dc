"""Shared benchmark plumbing: run the real server stack in-process, collect run directories, plot."""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


def run_inprocess(overrides: Mapping[str, Any], nodes: int, out_dir: Path) -> dict:
    """Run one federation through Federation + the configured driver on an InProcessGrid; return summary."""
    os.environ.setdefault("COROLLA_LOG_LEVEL", "WARNING")
    import torch

    torch.set_num_threads(1)
    from bench.inprocess import InProcessGrid
    from corolla.config import RunConfig
    from corolla.logs import setup_logging
    from corolla.server.async_driver import run_async
    from corolla.server.evaluation import TaskEvaluator
    from corolla.server.federation import Federation

    setup_logging()
    cfg = RunConfig.from_mapping({"existing-run": "overwrite", **overrides, "out-dir": str(out_dir), "min-nodes": nodes})
    grid = InProcessGrid(nodes, cfg.to_mapping())
    fed = Federation(cfg, grid, TaskEvaluator(cfg))
    from corolla.server.sync_driver import run_sync

    return (run_async if cfg.mode == "async" else run_sync)(fed)


def read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """summary.json and metrics.jsonl of a run directory."""
    from corolla.server.records import read_jsonl

    return json.loads((run_dir / "summary.json").read_text()), read_jsonl(run_dir / "metrics.jsonl")


def mean_spread(values: Sequence[float]) -> str:
    """'mean ± std' (std over seeds; 0 for one value)."""
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def plot_groups(groups: Mapping[str, list[list[dict]]], x: str, path: Path, title: str, xlabel: str,
                mean: bool = False) -> None:
    """Accuracy against `x`, one colour per group (method): one line per run, or (`mean`) the mean over runs
    with a band from the lowest to the highest run — for runs evaluated at the same `x` values (sync rounds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for ci, (name, runs) in enumerate(groups.items()):
        if mean and runs:
            xs = sorted(set.intersection(*({e[x] for e in ev} for ev in runs)))
            acc = [[next(e["accuracy"] for e in ev if e[x] == v) for ev in runs] for v in xs]
            ax.plot(xs, [statistics.mean(a) for a in acc], color=f"C{ci}", lw=1.8, label=f"{name} (mean of {len(runs)})")
            ax.fill_between(xs, [min(a) for a in acc], [max(a) for a in acc], color=f"C{ci}", alpha=0.12)
            continue
        for ri, evals in enumerate(runs):
            ax.plot([e[x] for e in evals], [e["accuracy"] for e in evals], color=f"C{ci}", alpha=0.8, lw=1.2,
                    label=name if ri == 0 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
