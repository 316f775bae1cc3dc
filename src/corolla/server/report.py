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
    evals = [e for e in evals if e.get("accuracy") is not None]
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


def plot_sites(evals: list[dict], path: Path, title: str) -> None:
    """Each site's accuracy on its held-out rows against global version, with the weighted mean and the worst."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [e for e in evals if e.get("sites")]
    fig, ax = plt.subplots(figsize=(7, 4))
    for site in sorted({s for e in rows for s in e["sites"]}, key=int):
        pts = [(e["version"], e["sites"][site]["accuracy"]) for e in rows if site in e["sites"]]
        ax.plot(*zip(*pts), alpha=0.35, linewidth=1)
    v = [e["version"] for e in rows]
    ax.plot(v, [e["site_accuracy"] for e in rows], color="black", linewidth=2, label="mean (example-weighted)")
    ax.plot(v, [e["site_worst_accuracy"] for e in rows], color="tab:red", linewidth=2, linestyle="--",
            label="worst site")
    ax.set_xlabel("global version")
    ax.set_ylabel("accuracy on the site's held-out rows")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def headline(cfg: dict, summary: dict) -> str:
    """What ran: the resolved aggregation, mode, selector, model and where it was evaluated (never `auto`)."""
    ran = {**cfg, **{k: v for k, v in summary.items() if v is not None}}
    rank = f" (rank {ran['rank']})" if ran.get("rank") else ""
    return (f"{aggregation_of(cfg, summary)}{rank} · {ran.get('mode')} · selector {ran.get('selector')} · "
            f"{ran.get('model')} · {ran.get('task')} · evaluated on the {ran.get('evaluation', 'server')}")


def write_report(run_dir: str | Path) -> Path:
    """Write report.md and curves.png into `run_dir`; return the report's path."""
    d = Path(run_dir)
    if not (d / "config.json").exists():
        raise FileNotFoundError(f"{d} is not a run directory (no config.json); pass the --out of a finished run.")
    cfg = json.loads((d / "config.json").read_text())
    evals = read_jsonl(d / "metrics.jsonl")
    updates = read_jsonl(d / "updates.jsonl")
    summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else summarize(evals)
    title = headline(cfg, summary)
    if evals:
        plot_curves(evals, d / "curves.png", title)
    site_rows = [e for e in evals if e.get("sites")]
    if site_rows:
        plot_sites(evals, d / "sites.png", title)
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
    if summary.get("epsilon") is not None:
        lines.append(f"Differential privacy (client level, central): ε = {summary['epsilon']:.4g} at δ = "
                     f"{summary['dp_delta']:g} after {summary.get('versions')} versions (Opacus RDP accountant; "
                     f"dp-noise-multiplier {cfg.get('dp-noise-multiplier')}, dp-clip {cfg.get('dp-clip')}).")
    if summary.get("max_site_epsilon") is not None:
        lines.append(f"DP-SGD at the sites (dp-sgd-clip {cfg.get('dp-sgd-clip')}, noise multiplier "
                     f"{cfg.get('dp-sgd-noise-multiplier')}): the largest ε a site reported for itself is "
                     f"{summary['max_site_epsilon']:.4g} at δ = {cfg.get('dp-delta')} (per site in updates.jsonl).")
    if summary.get("stopped_by"):
        lines.append(f"The run stopped before num-rounds: {summary['stopped_by']}.")
    if summary.get("best_version") is not None:
        lines.append(f"Best version: {summary['best_version']} ({summary['best_on']} accuracy "
                     f"{summary['best_score']:.4f}); its model is best.npz" +
                     (" and adapter-best/." if (d / "adapter-best").exists() else "."))
    lines += ["", "![curves](curves.png)"]
    if site_rows:
        lines += site_section(site_rows)
    if (d / "personalization.json").exists():
        lines += personalization_section(json.loads((d / "personalization.json").read_text()))
    lines += ["", "## Evaluations", "",
              "| version | wall s | accuracy | loss | " + "".join(f"{k} | " for k in extra) + "clients | MB up | MB down |",
              "|---|---|---|---|" + "---|" * len(extra) + "---|---|---|"]
    for e in evals:
        more = "".join(f"{e[k]:.4f} | " if k in e else "– | " for k in extra)
        lines.append(f"| {e['version']} | {e['wall_s']:.1f} | {_f(e.get('accuracy'))} | {_f(e.get('loss'))} | {more}"
                     f"{e['clients']} | {e['bytes_up'] / 1e6:.2f} | {e['bytes_down'] / 1e6:.2f} |")
    lines += ["", "## Configuration", "", "```json", json.dumps(cfg, indent=2, sort_keys=True), "```", ""]
    path = d / "report.md"
    path.write_text("\n".join(lines))
    return path


def _f(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def site_section(rows: list[dict]) -> list[str]:
    """The per-site part of the report: how evenly each version serves the sites, and the last version per site."""
    last = rows[-1]
    lines = ["", "## Per site", "",
             f"Each site evaluates the global model on its own held-out rows. Version {last['version']}: mean "
             f"{last['site_accuracy']:.4f}, worst site {last['site_worst_accuracy']:.4f} (node "
             f"{last['site_worst_node']}), spread {last['site_spread']:.4f}, Jain's index {last['site_jain']:.3f} "
             f"over {len(last['sites'])} sites.", "", "![per-site accuracy](sites.png)", "",
             "| version | mean | worst site | worst node | spread | std | Jain | sites | missing |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in rows:
        lines.append(f"| {e['version']} | {e['site_accuracy']:.4f} | {e['site_worst_accuracy']:.4f} | "
                     f"{e['site_worst_node']} | {e['site_spread']:.4f} | {e['site_std']:.4f} | {e['site_jain']:.3f} | "
                     f"{len(e['sites'])} | {len(e.get('site_failures') or {})} |")
    lines += ["", f"Version {last['version']} per site:", "", "| node | accuracy | loss | held-out rows |",
              "|---|---|---|---|"]
    for node, r in last["sites"].items():
        lines.append(f"| {node} | {r['accuracy']:.4f} | {r['loss']:.4f} | {r['examples']} |")
    failures = last.get("site_failures") or {}
    lines += [f"- node {n}: {why}" for n, why in failures.items()]
    return lines


def personalization_section(row: dict) -> list[str]:
    """The personalization gap: each site's accuracy with the global model and with its own fine-tuned copy."""
    if "personalization_gap" not in row:
        return ["", "## Personalization gap", "", "No site answered the personalization round."]
    lines = ["", "## Personalization gap", "",
             f"At version {row['version']} each site fine-tuned the global model for {row['personalize_steps']} steps "
             f"on its own training rows and evaluated both on its held-out rows: global "
             f"{row['site_accuracy']:.4f}, own copies {row['site_personal_accuracy']:.4f}, gap "
             f"{row['personalization_gap']:+.4f}.", "", "| node | global | own copy | gap |", "|---|---|---|---|"]
    for node, r in row["sites"].items():
        if "personal_accuracy" in r:
            lines.append(f"| {node} | {r['accuracy']:.4f} | {r['personal_accuracy']:.4f} | "
                         f"{r['personal_accuracy'] - r['accuracy']:+.4f} |")
    return lines
