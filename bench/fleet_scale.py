"""Memory and server overhead of `corolla sim` against the registered fleet size (100 / 1,000 / 10,000 clients).

Each size runs the real simulation (`corolla sim`: SuperLink, Flower's simulation engine,
Ray actors, the ServerApp) on the WordNet noun corpus (82,115 definitions, 26 classes,
IID so 10,000 silos of 6-7 rows still work), with 100 clients trained per round by the
tiny BERT (training is not what is measured: it is kept small). While it runs, every
process of the simulation's tree (the sim command, SuperLink, SuperExec, the ServerApp,
Ray's GCS, raylet and actors) is sampled every 0.5 s:

- PSS summed over the tree (proportional set size: a page shared by k processes counts
  1/k in each, so the sum is the memory the simulation really holds; summed RSS counts
  torch's shared libraries once per process and is printed beside it);
- the server's overhead per round from rounds.jsonl (host seconds of node refresh,
  selection, dispatch, validation, aggregation, recording and checkpoint: everything but
  the clients' training and the evaluation), the median over rounds 2..R.

Targets (issue #14): ≤ 8 GB for the whole simulation and ≤ 1 s overhead at 10,000 clients,
with cost growing no worse than linearly in the fleet and flat in per-round work.

    .venv/bin/python bench/fleet_scale.py [--sizes 100,1000,10000] [--selector random] [--rounds 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import RESULTS  # noqa: E402
from corolla.launch import processes as launch  # noqa: E402
from corolla.server.records import read_jsonl  # noqa: E402

GB = 1e9
#: phases of rounds.jsonl that are the server's own work (not the clients' training, not the evaluation)
OVERHEAD = ("select_s", "dispatch_s", "validate_s", "aggregate_s", "record_s", "checkpoint_s")


def _pss(p: psutil.Process) -> int:
    """PSS of one process from /proc/PID/smaps_rollup (0 when it is gone or unreadable)."""
    try:
        with open(f"/proc/{p.pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreeSampler(threading.Thread):
    """Samples the summed PSS and RSS of a process and all its descendants until stopped."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.every = every
        self.peak_pss = self.peak_rss = 0
        self.peak_procs = 0
        self.series: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self._halt.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            pss = rss = 0
            for p in procs:
                pss += _pss(p)
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            self.peak_procs = max(self.peak_procs, len(procs))
            self.series.append((round(time.monotonic() - t0, 1), pss))
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def run_size(n: int, args: argparse.Namespace, work: Path) -> dict:
    """One simulation of `n` registered clients; its memory, start-up and per-round overhead."""
    out = work / f"fleet{n}"
    cmd = [sys.executable, "-m", "corolla.cli", "sim", "--out", str(out), "--overwrite", "--nodes", str(n),
           "--partitioner", "iid", "--cpus", str(args.cpus),
           "--set", "task=text-classification", "--set", "dataset=wordnet", "--set", f"model={args.model}",
           "--set", f"clients-per-round={args.per_round}", "--set", f"min-nodes={n}",
           "--set", f"num-rounds={args.rounds}", "--set", "local-steps=1", "--set", "batch-size=4",
           "--set", "eval-examples=200", "--set", f"selector={args.selector}", "--set", "round-timeout=1800"]
    log = (work / f"fleet{n}.log").open("w")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    try:
        code = proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        code = -1
    finally:
        sampler.stop()
        launch.stop(proc)
        log.close()
    wall = time.monotonic() - t0
    if code != 0:
        raise SystemExit(f"{n} clients: corolla sim exited {code}; see {work / f'fleet{n}.log'}")
    rounds = read_jsonl(out / "rounds.jsonl")
    evals = read_jsonl(out / "metrics.jsonl")
    steady = rounds[1:] or rounds
    overhead = [sum(r.get(k, 0.0) for k in OVERHEAD) for r in steady]
    phases = {k: statistics.median(r.get(k, 0.0) for r in steady) for k in (*OVERHEAD, "exchange_s", "evaluate_s")}
    first_round = rounds[0]["wall_s"] - rounds[0].get("exchange_s", 0) if rounds else float("nan")
    row = {"clients": n, "per_round": args.per_round, "selector": args.selector, "wall_s": round(wall, 1),
           "startup_s": round(evals[0]["wall_s"], 1) if evals else None,  # until version 0 is evaluated: all profiled
           "peak_pss_gb": round(sampler.peak_pss / GB, 3), "peak_rss_sum_gb": round(sampler.peak_rss / GB, 3),
           "processes": sampler.peak_procs, "overhead_median_s": round(statistics.median(overhead), 4),
           "overhead_max_s": round(max(overhead), 4), "phases_median_s": {k: round(v, 4) for k, v in phases.items()},
           "rounds": len(rounds), "first_round_wall_s": round(first_round, 1),
           "registered": rounds[-1]["registered"] if rounds else None,
           "final_accuracy": evals[-1]["accuracy"] if evals else None,
           "pss_series": sampler.series[:: max(1, len(sampler.series) // 200)]}
    print(f"{n:>6} clients: peak PSS {row['peak_pss_gb']:.2f} GB (RSS summed {row['peak_rss_sum_gb']:.2f} GB, "
          f"{row['processes']} processes), overhead {row['overhead_median_s']:.3f} s/round (max "
          f"{row['overhead_max_s']:.3f}), start-up {row['startup_s']} s, wall {row['wall_s']} s", flush=True)
    return row


def report(rows: list[dict], args: argparse.Namespace, path: Path) -> None:
    """Markdown table, growth ratios against the smallest fleet, and a plot."""
    base = rows[0]
    lines = [
        "# Fleet scale: memory and server overhead against registered clients",
        "",
        f"`bench/fleet_scale.py --sizes {args.sizes} --selector {args.selector} --rounds {args.rounds}`: real "
        f"`corolla sim` runs (Ray, {args.cpus} CPUs), {args.per_round} clients per round, model {args.model}, WordNet "
        "nouns IID. Memory: PSS summed over the whole process tree (sim command, SuperLink, SuperExec, ServerApp, "
        "Ray GCS/raylet/actors), sampled every 0.5 s. Overhead: host seconds per round of node refresh, selection, "
        "dispatch, validation, aggregation, recording and checkpoint (median of rounds 2..R); training (exchange) and "
        "evaluation excluded and shown apart.",
        "",
        "| clients | peak PSS GB | RSS summed GB | overhead s/round (median / max) | select | dispatch | validate | "
        "aggregate | record | checkpoint | exchange (training) | start-up s (profiles) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["phases_median_s"]
        lines.append(
            f"| {r['clients']:,} | {r['peak_pss_gb']:.2f} | {r['peak_rss_sum_gb']:.2f} | {r['overhead_median_s']:.3f} / "
            f"{r['overhead_max_s']:.3f} | {p['select_s']:.3f} | {p['dispatch_s']:.3f} | {p['validate_s']:.3f} | "
            f"{p['aggregate_s']:.3f} | {p['record_s']:.3f} | {p['checkpoint_s']:.3f} | {p['exchange_s']:.2f} | "
            f"{r['startup_s']} |")
    lines += ["", "Growth against the smallest fleet (linear would be the fleet ratio):", ""]
    for r in rows[1:]:
        k = r["clients"] / base["clients"]
        lines.append(f"- {r['clients']:,} clients ({k:.0f}× the fleet): memory {r['peak_pss_gb'] / base['peak_pss_gb']:.2f}×"
                     f" (+{(r['peak_pss_gb'] - base['peak_pss_gb']) * GB / (r['clients'] - base['clients']) / 1e3:.1f} "
                     f"kB per added client), overhead {r['overhead_median_s'] / max(base['overhead_median_s'], 1e-9):.2f}×,"
                     f" start-up {r['startup_s'] / max(base['startup_s'], 1e-9):.1f}×")
    top = rows[-1]
    lines += ["", f"Targets at {top['clients']:,} clients: memory ≤ 8 GB → {top['peak_pss_gb']:.2f} GB "
              f"({'met' if top['peak_pss_gb'] <= 8 else 'MISSED'}); overhead ≤ 1 s → {top['overhead_median_s']:.3f} s "
              f"median, {top['overhead_max_s']:.3f} s worst ({'met' if top['overhead_max_s'] <= 1 else 'MISSED'})."]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        xs = [r["clients"] for r in rows]
        ax[0].plot(xs, [r["peak_pss_gb"] for r in rows], "o-", label="peak PSS (whole simulation)")
        ax[0].axhline(8, color="r", ls="--", label="target 8 GB")
        ax[0].set(xscale="log", xlabel="registered clients", ylabel="GB", title="memory")
        ax[0].legend()
        for k in OVERHEAD:
            ax[1].plot(xs, [r["phases_median_s"][k] for r in rows], "o-", label=k[:-2])
        ax[1].plot(xs, [r["overhead_median_s"] for r in rows], "ko-", lw=2, label="overhead (sum)")
        ax[1].axhline(1, color="r", ls="--", label="target 1 s")
        ax[1].set(xscale="log", yscale="log", xlabel="registered clients", ylabel="s per round",
                  title=f"server overhead, {args.per_round} per round")
        ax[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path.with_suffix(".png"), dpi=110)
    except ImportError:
        pass
    print(f"report: {path.with_suffix('.md')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--per-round", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--selector", default="random")
    ap.add_argument("--model", default="tiny-bert")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--name", default="", help="result file name (default fleet_scale[_SELECTOR])")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    name = args.name or ("fleet_scale" if args.selector == "random" else f"fleet_scale_{args.selector}")
    with tempfile.TemporaryDirectory(prefix="fleet-") as tmp:
        rows = [run_size(n, args, Path(tmp)) for n in sizes]
    report(rows, args, RESULTS / name)


if __name__ == "__main__":
    main()
