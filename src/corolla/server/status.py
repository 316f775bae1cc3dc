"""`corolla status DIR`: what a running (or finished) federation is doing, read from its run directory.

The server appends one JSON line per event as it happens, so an operator on
another terminal — or another machine with the folder mounted — can follow a run
without a service to connect to: versions, accuracy, who replied, what was
refused and why.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from corolla.server.records import aggregation_of, read_jsonl


class StatusError(FileNotFoundError):
    """The folder is not a corolla run directory."""


def run_status(run_dir: str | Path, reasons: int = 3) -> str:
    """Return a short plain-text status of the run in `run_dir` (the `reasons` latest refusals included)."""
    d = Path(run_dir)
    if not (d / "config.json").is_file():
        raise StatusError(f"{str(d)!r} is not a corolla run directory (no config.json); pass the --out folder of "
                          "`corolla sim` or `corolla server`.")
    cfg = json.loads((d / "config.json").read_text())
    evals = read_jsonl(d / "metrics.jsonl")
    updates = read_jsonl(d / "updates.jsonl")
    nodes = read_jsonl(d / "nodes.jsonl")
    finished = (d / "summary.json").is_file()
    summary = json.loads((d / "summary.json").read_text()) if finished else None
    mode = cfg.get("mode", "sync")
    rule = cfg.get("async-rule") if mode == "async" else None
    lines = [f"run {d}: {'finished' if finished else 'running'} · {mode}{f' ({rule})' if rule else ''} · "
             f"aggregation {aggregation_of(cfg, summary)} · selector {cfg.get('selector')}"]
    if evals:
        last = evals[-1]
        scored = [e for e in evals if e.get("accuracy") is not None] or [last]
        best = max(scored, key=lambda e: e.get("accuracy") or 0.0)
        lines.append(f"version {last['version']} of {cfg.get('num-rounds')} · accuracy {_f(last.get('accuracy'))} "
                     f"(best {_f(best.get('accuracy'))} at version {best['version']}) · loss {_f(last.get('loss'))} · "
                     f"{last['wall_s']:.0f}s")
        if last.get("epsilon") is not None:
            lines.append(f"privacy: ε = {last['epsilon']:.4g} at δ = {last.get('dp_delta')} so far"
                         + (f" (budget {cfg.get('target-epsilon')})" if cfg.get("target-epsilon") else ""))
        sites = [e for e in evals if e.get("sites")]
        if sites:
            s = sites[-1]
            lines.append(f"sites: mean {s['site_accuracy']:.4f} at version {s['version']} · worst {s['site_worst_accuracy']:.4f} "
                         f"(node {s['site_worst_node']}) · spread {s['site_spread']:.4f} · Jain {s['site_jain']:.3f} · "
                         f"{len(s['sites'])} evaluated" + (f", {len(s['site_failures'])} missing" if s.get("site_failures")
                                                           else ""))
        lines.append(f"traffic: {last['bytes_down'] / 1e6:.1f} MB to clients, {last['bytes_up'] / 1e6:.1f} MB back"
                     + (f" · {last['in_flight']} jobs in flight" if "in_flight" in last else ""))
    else:
        lines.append("no evaluation yet (nodes joining or the first round training)")
    now = {n.get("node"): n for n in nodes}  # a node's last row is its state now: ok, unavailable or refused
    ok = [n for n in now.values() if n.get("status") == "ok"]
    down = sum(n.get("status") == "unavailable" for n in now.values())
    ranks = Counter(n.get("rank") for n in ok)
    lines.append(f"nodes: {len(ok)} profiled" + (f", ranks {dict(sorted(ranks.items()))}" if ranks else "")
                 + (f", {down} unavailable (no work until a profile query answers)" if down else "")
                 + (f", {len(now) - len(ok) - down} unusable" if len(now) > len(ok) + down else ""))
    status = Counter(u["status"] for u in updates)
    lines.append(f"updates: {status.get('accepted', 0)} accepted, {status.get('rejected', 0)} rejected, "
                 f"{status.get('failed', 0)} failed")
    stale = [u["staleness"] for u in updates if u["status"] == "accepted" and u.get("staleness") is not None]
    if mode == "async" and stale:
        lines.append(f"staleness of applied updates: mean {sum(stale) / len(stale):.2f}, max {max(stale)}")
    refused = [u for u in updates if u["status"] != "accepted"][-reasons:]
    lines += [f"  {u['status']} (node {u['node']}): {u['reason']}" for u in refused]
    return "\n".join(lines)


def _f(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"
