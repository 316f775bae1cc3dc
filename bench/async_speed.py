"""Time to target accuracy with slow clients: synchronous FedAvg vs FedAsync, FedBuff and FedFix.

Ray simulation (`corolla sim`, real Flower simulation engine) of 16 clients with a
10× spread of speeds (tiers 1×, 2×, 5×, 10×: each job is stretched to that factor
of its real duration), small CNN on Fashion-MNIST, Dirichlet α = 0.5. Every method
gets the same wall-clock budget and 8 concurrent clients; accuracy is measured on
2,000 held-out images. Reports time to the target accuracy (and the ratio against
sync FedAvg measured in the same run), final accuracy and the stability drop.

    .venv/bin/python bench/async_speed.py [--seeds 0 1 2] [--budget 150] [--target 0.7]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.harness import RESULTS, mean_spread, plot_groups, read_run  # noqa: E402
from server import launch  # noqa: E402

COMMON = {"task": "image-classification", "model": "cnn", "dataset": "fashion-mnist", "dirichlet-alpha": 0.5,
          "local-steps": 40, "batch-size": 32, "lr": 2e-3, "eval-examples": 2000, "speed-profile": "tiers",
          "speed-tiers": "1,2,5,10", "num-rounds": 100000, "round-timeout": 120, "lr-decay": 1.0}
METHODS = {
    "sync-fedavg": {"mode": "sync", "clients-per-round": 8},
    "fedasync": {"mode": "async", "async-rule": "fedasync", "concurrency": 8, "server-lr": 0.5, "eval-interval": 2},
    "fedbuff": {"mode": "async", "async-rule": "fedbuff", "concurrency": 8, "buffer-size": 4, "eval-interval": 2},
    "fedfix": {"mode": "async", "async-rule": "fedfix", "concurrency": 8, "interval": 2.0, "eval-interval": 2},
}


def time_to(evals: list[dict], target: float) -> float | None:
    t0 = evals[0]["wall_s"]
    return next((e["wall_s"] - t0 for e in evals if e["accuracy"] >= target), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget", type=float, default=150.0)
    p.add_argument("--target", type=float, default=0.7)
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    args = p.parse_args()
    out = RESULTS / "async_speed"
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[Path]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for m in args.methods:
            run = out / f"{m}-{seed}"
            cfg = {**COMMON, **METHODS[m], "seed": seed, "time-budget": args.budget, "min-nodes": args.nodes}
            cmd = [sys.executable, "-m", "server.cli", "sim", "--out", str(run), "--nodes", str(args.nodes),
                   "--cpus", "8"] + [x for k, v in cfg.items() for x in ("--set", f"{k}={v}")]
            print(f"running {m} seed {seed} ...", flush=True)
            proc = launch.start(cmd, launch.flower_env(run / ".home"), log_path=out / f"{m}-{seed}.log")
            try:
                proc.wait(timeout=args.budget + 600)
            finally:
                launch.stop(proc)
            if proc.returncode != 0:
                raise SystemExit(f"{m} seed {seed} failed; see {out / f'{m}-{seed}.log'}")
            runs[m].append(run)
    results, rows, groups = {}, [], {}
    sync_times = [time_to(read_run(r)[1], args.target) for r in runs.get("sync-fedavg", [])]
    for m, dirs in runs.items():
        data = [read_run(d) for d in dirs]
        times = [time_to(ev, args.target) for _, ev in data]
        reached = [t for t in times if t is not None]
        ratio = [s / t for s, t in zip(sync_times, times) if s is not None and t]
        results[m] = {"time_to_target_s": times, "summaries": [s for s, _ in data]}
        groups[m] = [[{**e, "t": e["wall_s"] - ev[0]["wall_s"]} for e in ev] for _, ev in data]
        rows.append(f"| {m} | {len(reached)}/{len(times)} | {mean_spread(reached)} | "
                    f"{mean_spread(ratio) if ratio else '—'} | {mean_spread([s['final_accuracy'] for s, _ in data])} | "
                    f"{mean_spread([s['stability_drop'] for s, _ in data])} | "
                    f"{mean_spread([float(s['versions']) for s, _ in data])} |")
    table = [f"| method | reached {args.target:.2f} | time to target s | speed-up vs sync | final accuracy | "
             "stability drop | versions |", "|---|---|---|---|---|---|---|", *rows]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "async_speed.md").write_text(
        f"# Slow clients (tiers 1/2/5/10×), Fashion-MNIST CNN, {args.nodes} clients, 8 concurrent, "
        f"{args.budget:.0f} s budget\n\n" + "\n".join(table) + "\n\n![curves](async_speed.png)\n")
    (RESULTS / "async_speed.json").write_text(json.dumps(results, indent=2))
    plot_groups(groups, "t", RESULTS / "async_speed.png", "accuracy against wall-clock, 10× speed spread",
                "seconds since training started")
    print("\n".join(table))


if __name__ == "__main__":
    main()
