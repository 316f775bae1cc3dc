"""Turn a run directory into report.md and curves.png (`corolla report DIR`)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from corolla.server.records import aggregation_of, read_jsonl, summarize


def plot_curves(evals: list[dict], path: Path, title: str) -> None:
    """Accuracy against global version and against wall-clock time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    v = [e["version"] for e in evals]
    t = [e["wall_s"] for e in evals]
    a = [e["accuracy"] for e in evals]
    ax1.plot(v, a, marker="o")
    ax1.set_xlabel("global version")
    ax2.plot(t, a, marker="o", color="tab:orange")
    ax2.set_xlabel("wall-clock time (s)")
    for ax in (ax1, ax2):
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dir: str | Path) -> Path:
    """Write report.md and curves.png into `run_dir`; return the report's path."""
    d = Path(run_dir)
    if not (d / "config.json").exists():
        raise FileNotFoundError(f"{d} is not a run directory (no config.json); pass the --out of a finished run.")
    cfg = json.loads((d / "config.json").read_text())
    evals = read_jsonl(d / "metrics.jsonl")
    updates = read_jsonl(d / "updates.jsonl")
    summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else summarize(evals)
    title = f"{aggregation_of(cfg, summary)} · {cfg.get('model')} · {cfg.get('dataset')} · {cfg.get('mode')}"
    if evals:
        plot_curves(evals, d / "curves.png", title)
    accepted = [u for u in updates if u.get("status") == "accepted"]
    lines = [
        f"# corolla run report — {title}", "",
        "| final accuracy | peak accuracy | stability drop | versions | wall time |",
        "|---|---|---|---|---|",
        f"| {_f(summary.get('final_accuracy'))} | {_f(summary.get('peak_accuracy'))} | "
        f"{_f(summary.get('stability_drop'))} | {summary.get('versions')} | {_f(summary.get('wall_s'), 1)} s |", "",
        f"Updates: {len(accepted)} accepted, {sum(u.get('status') == 'rejected' for u in updates)} rejected, "
        f"{sum(u.get('status') == 'failed' for u in updates)} failed replies.",
    ]
    queue = [u["queue_s"] for u in accepted if u.get("queue_s") is not None]
    if queue:
        lines.append(f"Push → training start: median {statistics.median(queue):.2f} s, max {max(queue):.2f} s.")
    reasons = sorted({u.get("reason") for u in updates if u.get("status") != "accepted" and u.get("reason")})
    if reasons:
        lines += ["", "## Rejected or failed replies", *[f"- {r}" for r in reasons[:20]]]
    # a causal LM adds perplexity and ROUGE-L; its accuracy is next-token accuracy on the answers
    extra = [k for k in ("perplexity", "rouge_l") if evals and k in evals[-1]]
    lines += ["", "![curves](curves.png)", "", "## Evaluations", "",
              "| version | wall s | accuracy | loss | " + "".join(f"{k} | " for k in extra) + "clients | MB up | MB down |",
              "|---|---|---|---|" + "---|" * len(extra) + "---|---|---|"]
    for e in evals:
        more = "".join(f"{e[k]:.4f} | " if k in e else "– | " for k in extra)
        lines.append(f"| {e['version']} | {e['wall_s']:.1f} | {e['accuracy']:.4f} | {e['loss']:.4f} | {more}"
                     f"{e['clients']} | {e['bytes_up'] / 1e6:.2f} | {e['bytes_down'] / 1e6:.2f} |")
    lines += ["", "## Configuration", "", "```json", json.dumps(cfg, indent=2, sort_keys=True), "```", ""]
    path = d / "report.md"
    path.write_text("\n".join(lines))
    return path


def _f(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"
