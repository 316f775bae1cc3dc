"""The run directory: the contract every driver, report and benchmark shares.

- config.json   the resolved run configuration
- metrics.jsonl one object per evaluation: version, wall_s, accuracy, loss, bytes_up, bytes_down, clients
- updates.jsonl one object per client reply: node, rank, accepted or the rejection reason, weights, telemetry
- nodes.jsonl   one object per node profile seen
- selection.jsonl one object per selection: every candidate's score terms, the picks, telemetry problems
- rounds.jsonl  one object per round (sync) or version (async): host seconds per phase (select, dispatch, ...)
- global.npz    the final global model: `delta/<layer>` ΔW per LoRA layer, `dense/<key>` trained parameters
- summary.json  final_accuracy, peak_accuracy, stability_drop, wall_s (+ counts)
- report.md, curves.png  written by server/report.py
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


#: the append-only record files (a checkpoint remembers how many lines each had)
RECORDS = ("metrics.jsonl", "updates.jsonl", "nodes.jsonl", "selection.jsonl", "rounds.jsonl")


class RunDirError(RuntimeError):
    """The run directory holds an earlier run and the command did not say what to do with it."""


class _Monotonic:
    def monotonic(self) -> float:
        return time.monotonic()


class RunRecorder:
    """Appends JSON lines as the run goes; writes the summary at the end."""

    def __init__(self, out_dir: str | Path, config_json: str, clock: Any = None, existing: str = "refuse") -> None:
        """Open the run directory; `existing` says what to do with an earlier run in it: refuse, overwrite, resume."""
        self.clock = clock or _Monotonic()
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)  # metrics, updates and the global model of a run: its owner's alone
        earlier = any((self.dir / n).exists() for n in (*RECORDS, "summary.json", "checkpoint.json"))
        if existing == "refuse" and earlier:
            raise RunDirError(f"{self.dir} holds an earlier run; continue it with --resume (existing-run=resume) or "
                              "replace it with --overwrite (existing-run=overwrite)")
        if existing != "resume":
            for name in (*RECORDS, "summary.json", "checkpoint.pkl", "checkpoint.json", "global.npz", "best.npz"):
                (self.dir / name).unlink(missing_ok=True)
            (self.dir / "config.json").write_text(config_json + "\n")
        self.t0 = self.clock.monotonic()
        self.bytes_up = 0
        self.bytes_down = 0
        self.rejected = 0
        self.failed = 0
        self.evals: list[dict[str, Any]] = []
        #: the best version so far: {"version", "score", "on": "sites" | "server"} (its model is best.npz)
        self.best: dict[str, Any] | None = None

    def wall_s(self) -> float:
        """Seconds since the run started (across resumes: the time before a crash counts)."""
        return self.clock.monotonic() - self.t0

    def state(self) -> dict[str, Any]:
        """The counters a checkpoint keeps."""
        return {"wall_s": self.wall_s(), "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "rejected": self.rejected, "failed": self.failed, "evals": list(self.evals), "best": self.best}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue the counters (and the wall clock) of a checkpointed run."""
        self.t0 = self.clock.monotonic() - float(state["wall_s"])
        self.bytes_up, self.bytes_down = int(state["bytes_up"]), int(state["bytes_down"])
        self.rejected, self.failed = int(state["rejected"]), int(state["failed"])
        self.evals = list(state["evals"])
        self.best = state.get("best")

    def _append(self, name: str, row: dict[str, Any]) -> None:
        with (self.dir / name).open("a") as f:
            f.write(json.dumps(_clean(row), sort_keys=True) + "\n")

    def selection(self, row: dict[str, Any]) -> None:
        """Record one selection: candidates' scores (every term) and the picks."""
        self._append("selection.jsonl", {"wall_s": round(self.wall_s(), 3), **row})

    def round_timing(self, row: dict[str, Any]) -> None:
        """Record where one round's (or async version's) host time went (`RoundTimer`)."""
        self._append("rounds.jsonl", {"wall_s": round(self.wall_s(), 3), **row})

    def node(self, row: dict[str, Any]) -> None:
        """Record a node profile."""
        self._append("nodes.jsonl", {"wall_s": round(self.wall_s(), 3), **row})

    def update(self, row: dict[str, Any]) -> None:
        """Record one client reply (accepted, rejected or failed)."""
        status = row.get("status")
        self.rejected += status == "rejected"
        self.failed += status == "failed"
        self._append("updates.jsonl", {"wall_s": round(self.wall_s(), 3), **row})

    def evaluation(self, version: int, accuracy: float | None, loss: float | None, clients: int,
                   **extra: Any) -> dict[str, Any]:
        """Record an evaluation of global version `version` (accuracy None: nobody could evaluate it)."""
        row = {"version": version, "wall_s": round(self.wall_s(), 3), "accuracy": accuracy, "loss": loss,
               "bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "clients": clients, **extra}
        self.evals.append(row)
        self._append("metrics.jsonl", row)
        return row

    def finish(self, **extra: Any) -> dict[str, Any]:
        """Write summary.json and return it."""
        summary = summarize(self.evals)
        if self.best is not None:
            summary.update(best_version=self.best["version"], best_score=self.best["score"], best_on=self.best["on"])
        summary.update(wall_s=round(self.wall_s(), 3), rejected_updates=self.rejected, failed_replies=self.failed,
                       bytes_up=self.bytes_up, bytes_down=self.bytes_down, **extra)
        (self.dir / "summary.json").write_text(json.dumps(_clean(summary), indent=2, sort_keys=True) + "\n")
        return summary


def summarize(evals: list[dict[str, Any]]) -> dict[str, Any]:
    """Return final/peak accuracy and the stability drop (peak − final) of an evaluation series."""
    scored = [e for e in evals if e.get("accuracy") is not None]
    if not scored:
        return {"final_accuracy": None, "peak_accuracy": None, "stability_drop": None,
                "versions": evals[-1]["version"] if evals else 0}
    accs = [e["accuracy"] for e in scored]
    final, peak = accs[-1], max(accs)
    out = {"final_accuracy": final, "peak_accuracy": peak, "stability_drop": peak - final,
           "versions": evals[-1]["version"], "peak_version": scored[accs.index(peak)]["version"]}
    sites = [e for e in evals if "site_accuracy" in e]
    if sites:  # how the final global model serves each site: the mean, the worst one, the spread and Jain's index
        last = sites[-1]
        out.update(final_site_accuracy=last["site_accuracy"], final_worst_site_accuracy=last["site_worst_accuracy"],
                   final_worst_site=last["site_worst_node"], final_site_spread=last["site_spread"],
                   final_site_jain=last["site_jain"], sites_evaluated=len(last["sites"]))
    return out


def aggregation_of(config: dict[str, Any], summary: dict[str, Any] | None = None) -> str:
    """The aggregator a run used: the one the server resolved (summary.json) over the configured choice.

    A finished run's summary holds the aggregator's own name, so a run configured
    `auto` reports `fedavg` or `fedhl` — the same name the server factory chose —
    and a running one (no summary yet) its configured choice.
    """
    return str((summary or {}).get("aggregation") or config.get("aggregation"))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file (missing file: empty list)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


class RoundTimer:
    """Host seconds per phase of one round (sync) or version (async), so the server's own cost can be told from training's.

    select_s (node refresh + selection + its record), dispatch_s (starts + messages),
    exchange_s (sync: push, the clients' training, pull), validate_s (every reply checked and
    recorded), aggregate_s, record_s (accepted updates recorded, the selector told),
    evaluate_s, checkpoint_s, and wait_s (async: polling while clients train; sync: waiting for a node). The
    server's overhead is the sum without exchange_s, wait_s and evaluate_s;
    `bench/fleet_scale.py` reports it against fleet size.
    """

    def __init__(self, registered: int) -> None:
        self.row: dict[str, float | int] = {"registered": registered}
        self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Charge the time since the last lap to `phase`."""
        now = time.perf_counter()
        self.row[phase] = round(self.row.get(phase, 0.0) + now - self._t, 6)
        self._t = now

    def done(self, **extra: int) -> dict[str, float | int]:
        """The row so far (a round that ended early has fewer phases)."""
        return {**self.row, **extra}
