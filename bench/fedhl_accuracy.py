"""Accuracy under heterogeneous LoRA ranks: FedHL vs HetLoRA vs FlexLoRA vs FLoRA vs FedAvg at the smallest rank.

MiniLM + LoRA on BBC News, 20 clients, Dirichlet α = 0.3, ranks {2, 4, 8, 16, 32}
assigned by tier; FedHL with truncation-aware weights and with `examples`
weights; FedAvg runs every client at rank 2 (the rank every client can afford).
Runs the real server stack on an in-process Grid, two runs at a time.

    .venv/bin/python bench/fedhl_accuracy.py [--rounds 10] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.harness import RESULTS, mean_spread, plot_groups, read_run, run_inprocess  # noqa: E402

METHODS = {
    "fedhl": {"aggregation": "fedhl", "fedhl-weighting": "truncation"},
    "fedhl-examples": {"aggregation": "fedhl", "fedhl-weighting": "examples"},
    "hetlora": {"aggregation": "hetlora"},
    "flexlora": {"aggregation": "flexlora"},
    "flora": {"aggregation": "flora"},
    "fedavg-r2": {"aggregation": "fedavg", "ranks": "", "lora-rank": 2},
}


def config(method: str, seed: int, rounds: int) -> dict:
    base = {"ranks": "2,4,8,16,32", "max-rank": 32, "seed": seed, "num-rounds": rounds, "clients-per-round": 5,
            "local-steps": 10, "lr": 2e-3, "dirichlet-alpha": 0.3}
    return {**base, **METHODS[method]}


def _job(args: tuple) -> str:
    method, seed, rounds, out = args
    run_inprocess(config(method, seed, rounds), 20, Path(out))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    args = p.parse_args()
    out = RESULTS / "fedhl_accuracy"
    jobs = [(m, seed, args.rounds, str(out / f"{m}-{seed}")) for seed in args.seeds for m in args.methods]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for run in pool.imap_unordered(_job, jobs):
            print(f"done: {run}", flush=True)
    rows, groups, results = [], {}, {}
    for m in args.methods:
        runs = [read_run(Path(j[3])) for j in jobs if j[0] == m]
        summ = [r[0] for r in runs]
        results[m] = summ
        groups[m] = [r[1] for r in runs]
        rows.append(f"| {m} | {len(runs)} | {mean_spread([x['peak_accuracy'] for x in summ])} | "
                    f"{mean_spread([x['final_accuracy'] for x in summ])} | "
                    f"{mean_spread([x['bytes_down'] / 1e6 for x in summ])} |")
    table = ["| method | runs | peak accuracy | final accuracy | MB sent to clients |", "|---|---|---|---|---|", *rows]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fedhl_accuracy.md").write_text(
        f"# Heterogeneous ranks, MiniLM + LoRA on BBC, 20 clients, α = 0.3, ranks 2–32, {args.rounds} rounds\n\n"
        + "\n".join(table) + "\n\n![curves](fedhl_accuracy.png)\n")
    (RESULTS / "fedhl_accuracy.json").write_text(json.dumps(results, indent=2))
    plot_groups(groups, "version", RESULTS / "fedhl_accuracy.png", "BBC, ranks {2,4,8,16,32}, α=0.3", "round")
    print("\n".join(table))


if __name__ == "__main__":
    main()
