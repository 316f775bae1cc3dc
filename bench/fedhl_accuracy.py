"""Accuracy under heterogeneous LoRA ranks: FedHL vs HetLoRA vs FlexLoRA vs FLoRA vs FedAvg at the smallest rank.

MiniLM + LoRA on WordNet noun definitions (26 categories) and on BBC News, 20
clients, Dirichlet α = 0.3, ranks {2, 4, 8, 16, 32} assigned by tier; FedHL with
truncation-aware weights and with `examples` weights; FedAvg runs every client at
rank 2 (the rank every client can afford). Runs the real server stack on an
in-process Grid, two runs at a time; sized to finish in under an hour on 2 cores.

    .venv/bin/python bench/fedhl_accuracy.py [--seeds 0 1 2] [--datasets wordnet bbc]

Writes bench/results/fedhl_accuracy.{md,json} and one plot per corpus.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.harness import RESULTS, mean_spread, plot_groups, read_run, run_inprocess  # noqa: E402

METHODS = {
    "fedhl": {"aggregation": "fedhl", "fedhl-weighting": "truncation"},
    "fedhl-examples": {"aggregation": "fedhl", "fedhl-weighting": "examples"},
    "fedhl-relative": {"aggregation": "fedhl", "fedhl-weighting": "relative"},
    "fedhl-relative-examples": {"aggregation": "fedhl", "fedhl-weighting": "relative-examples"},
    # the default weighting with each version's SVD warm-started from the previous one (2 products, the default)
    # or from a Gaussian draw with 2 power iterations (6 products): bench/results/fedhl_svd_start.md
    "fedhl-relative-warm": {"aggregation": "fedhl", "fedhl-weighting": "relative", "fedhl-svd-start": "warm"},
    "fedhl-relative-random": {"aggregation": "fedhl", "fedhl-weighting": "relative", "fedhl-svd-start": "random"},
    "hetlora": {"aggregation": "hetlora"},
    "flexlora": {"aggregation": "flexlora"},
    "flora": {"aggregation": "flora"},
    "fedavg-r2": {"aggregation": "fedavg", "ranks": "", "lora-rank": 2},
}
#: per corpus: rounds and sequence length sized so 6 methods × 3 seeds × 2 corpora fit in an hour on 2 cores
DATASETS = {
    "wordnet": {"dataset": "wordnet", "num-rounds": 10, "max-length": 32, "local-steps": 10, "eval-examples": 500},
    "bbc": {"dataset": "bbc", "num-rounds": 6, "max-length": 32, "local-steps": 8},
}
NODES = 20
RESULT_NAME = "fedhl_accuracy"


def config(method: str, dataset: str, seed: int) -> dict:
    """The run configuration of one (method, corpus, seed) cell."""
    base = {"ranks": "2,4,8,16,32", "max-rank": 32, "seed": seed, "clients-per-round": 5, "lr": 5e-3,
            "dirichlet-alpha": 0.3}
    return {**base, **DATASETS[dataset], **METHODS[method]}


def _job(args: tuple) -> tuple[str, float]:
    method, dataset, seed, out = args
    t = time.monotonic()
    run_inprocess(config(method, dataset, seed), NODES, Path(out))
    return out, time.monotonic() - t


def weight_by_rank(run_dir: Path) -> dict[int, float]:
    """Mean aggregation weight a client of each rank received (from updates.jsonl)."""
    from corolla.server.records import read_jsonl

    by_rank: dict[int, list[float]] = defaultdict(list)
    for u in read_jsonl(run_dir / "updates.jsonl"):
        if u["status"] == "accepted" and u.get("weight") is not None:
            by_rank[int(u["rank"])].append(float(u["weight"]))
    return {r: sum(w) / len(w) for r, w in sorted(by_rank.items())}


def report(dataset: str, methods: list[str], seeds: list[int], out: Path) -> tuple[list[str], dict]:
    """Markdown rows + JSON for one corpus; also writes its plot."""
    rows, groups, results = [], {}, {}
    for m in methods:
        dirs = [d for s in seeds if ((d := out / f"{dataset}-{m}-{s}") / "summary.json").exists()]
        if not dirs:
            continue
        runs = [read_run(d) for d in dirs]
        summ = [r[0] for r in runs]
        results[m] = {"runs": summ, "weight_by_rank": [weight_by_rank(d) for d in dirs]}
        groups[m] = [r[1] for r in runs]
        rows.append(f"| {dataset} | {m} | {len(runs)} | {mean_spread([x['peak_accuracy'] for x in summ])} | "
                    f"{mean_spread([x['final_accuracy'] for x in summ])} | "
                    f"{mean_spread([x['bytes_down'] / 1e6 for x in summ])} | "
                    f"{sum(x['wall_s'] for x in summ) / len(summ):.0f} |")
    rounds = DATASETS[dataset]["num-rounds"]
    plot_groups(groups, "version", RESULTS / f"{RESULT_NAME}_{dataset}.png",
                f"{dataset}: ranks {{2,4,8,16,32}}, α=0.3, {NODES} clients, {len(seeds)} seeds, {rounds} rounds", "round",
                mean=True)
    return rows, results


def weight_table(results: dict) -> list[str]:
    """How truncation-aware and `examples` weights split the mass across ranks (mean over rounds and seeds)."""
    lines = ["| corpus | FedHL weighting | " + " | ".join(f"rank {r}" for r in (2, 4, 8, 16, 32)) + " |",
             "|---|---|" + "---|" * 5]
    for dataset, res in results.items():
        for m, label in (("fedhl", "truncation-aware"), ("fedhl-examples", "examples"), ("fedhl-relative", "relative"),
                         ("fedhl-relative-examples", "relative-examples"), ("fedhl-relative-warm", "relative, warm SVD"),
                         ("fedhl-relative-random", "relative, random SVD")):
            if m not in res:
                continue
            per_rank: dict[int, list[float]] = defaultdict(list)
            for wr in res[m]["weight_by_rank"]:
                for r, w in wr.items():
                    per_rank[int(r)].append(w)
            cells = [f"{sum(per_rank[r]) / len(per_rank[r]):.3f}" if per_rank[r] else "—" for r in (2, 4, 8, 16, 32)]
            lines.append(f"| {dataset} | {label} | " + " | ".join(cells) + " |")
    return lines


# ---- #10: the 3-site, two-class, label-skewed federation in which the paper's rule collapsed --------------------
SKEW3_CLASSES = ("business", "sport")
#: per site (LoRA rank, examples of the first class, of the second): the rank-8 silo holds almost only `business`,
#: the rank-2 and rank-4 silos mostly `sport`, so a rule that hands the rank-8 silo the step predicts one class
SKEW3_SITES = ((2, 12, 108), (4, 24, 96), (8, 114, 6))
SKEW3_METHODS = {m: {"aggregation": "fedhl", "fedhl-weighting": w}
                 for m, w in (("fedhl", "truncation"), ("fedhl-examples", "examples"), ("fedhl-relative", "relative"))}
SKEW3_SECTION = "## Three sites, two classes, label skew"


def skew3_files(out: Path, seed: int) -> tuple[list[Path], Path]:
    """Write the three sites' CSV silos and the two-class test file (BBC business vs sport) for one seed."""
    import numpy as np
    import pandas as pd

    from corolla.data.silo import builtin_split

    train, test = builtin_split("bbc")
    names = train.features["label"].names
    rng = np.random.default_rng(seed)
    pools = {c: rng.permutation([i for i, y in enumerate(train["label"]) if names[y] == c]).tolist()
             for c in SKEW3_CLASSES}
    out.mkdir(parents=True, exist_ok=True)
    silos = []
    for i, (_, *counts) in enumerate(SKEW3_SITES):
        rows = [(train[j]["text"], c) for c, k in zip(SKEW3_CLASSES, counts, strict=True)
                for j in (pools[c].pop() for _ in range(k))]
        silos.append(out / f"site{i}.csv")
        pd.DataFrame(rows, columns=["text", "label"]).sample(frac=1, random_state=seed).to_csv(silos[-1], index=False)
    rows = [(t, names[y]) for t, y in zip(test["text"], test["label"], strict=True) if names[y] in SKEW3_CLASSES]
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(out / "test.csv", index=False)
    return silos, out / "test.csv"


def skew3_config(method: str, seed: int, test: Path) -> dict:
    """Three clients at ranks 2/4/8, all in every round, FedHL with the method's weighting; otherwise defaults."""
    return {"model": "minilm", "labels": ",".join(SKEW3_CLASSES), "test-data": str(test), "ranks": "2,4,8",
            "max-rank": 8, "clients-per-round": 3, "num-rounds": 8, "local-steps": 8, "max-length": 32,
            "lr": 5e-3, "seed": seed, **SKEW3_METHODS[method]}


def _skew3_job(args: tuple) -> tuple[str, float]:
    """One run in a fresh process: simulated node i trains on site i's CSV silo instead of a built-in partition."""
    method, seed, out = args
    import corolla.client.local as local
    from corolla.client.trainer import Trainer
    from corolla.data.files import FileSource

    silos, test = skew3_files(Path(out) / "data", seed)

    def trainer(spec, *args):  # local._trainer's arguments end with (partition id, partitions, α, rank, slowdown)
        partition_id, rank, slowdown = args[-5], args[-2], args[-1]
        model = local._adapter_model(spec)
        return Trainer(model, model.task.encode(model.task.load_silo(FileSource(silos[partition_id]), "text", "label")),
                       rank, slowdown)

    local._trainer = trainer
    t = time.monotonic()
    run_inprocess(skew3_config(method, seed, test), len(SKEW3_SITES), Path(out))
    return out, time.monotonic() - t


def skew3_report(out: Path, seeds: list[int]) -> str:
    """The markdown section: accuracy, one-class collapse and the rank-8 silo's weight share per method."""
    import pandas as pd

    from corolla.server.records import read_jsonl

    rows, curves = [], []
    for m in SKEW3_METHODS:
        runs = [(s, d) for s in seeds if ((d := out / f"{m}-{s}") / "summary.json").exists()]
        if not runs:
            continue
        finals, peaks, collapsed, top, top_max = [], [], 0, [], []
        for s, d in runs:
            summary, evals = read_run(d)
            finals.append(summary["final_accuracy"])
            peaks.append(summary["peak_accuracy"])
            share = float(pd.read_csv(d / "data" / "test.csv")["label"].value_counts(normalize=True).max())
            one_class = [abs(e["accuracy"] - share) < 0.02 or abs(e["accuracy"] - (1 - share)) < 0.02
                         for e in evals[-3:]]
            collapsed += all(one_class)
            per_version: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
            for u in read_jsonl(d / "updates.jsonl"):
                if u["status"] == "accepted":
                    per_version[u["applied_version"]][0] += float(u["weight"]) * (int(u["rank"]) == 8)
                    per_version[u["applied_version"]][1] += float(u["weight"])
            shares = [a / b for a, b in per_version.values() if b > 0]
            top.append(sum(shares) / len(shares))
            top_max.append(max(shares))
            curves.append(f"| {m} | {s} | " + " ".join(f"{e['accuracy']:.2f}" for e in evals)
                          + f" | {' '.join(f'{x:.2f}' for x in shares)} |")
        rows.append(f"| {m} | {len(runs)} | {mean_spread(peaks)} | {mean_spread(finals)} | {collapsed}/{len(runs)} | "
                    f"{mean_spread(top)} (max {max(top_max):.3f}) |")
    return "\n".join([
        SKEW3_SECTION, "",
        f"`bench/fedhl_accuracy.py --skew3 --seeds {' '.join(map(str, seeds))}`: MiniLM + LoRA, BBC `business` vs "
        "`sport` only, 3 sites at ranks 2/4/8 holding " + ", ".join(f"{a}/{b} (rank {r})" for r, a, b in SKEW3_SITES)
        + " business/sport examples (the rank-8 silo nearly all business, the others mostly sport), all 3 in "
        "every one of 8 rounds, 8 local steps, server evaluation on the 2-class BBC test split (about 50/50). "
        "Defaults otherwise, including `max-weight-share` (2/3 at three updates). In-process Grid; simulated node i "
        "trains on site i's CSV silo. 'One class at the end' = the last 3 evaluations all within 0.02 of one "
        "class's test share.", "",
        "| FedHL weighting | runs | peak accuracy | final accuracy | one class at the end | rank-8 silo's share of "
        "each version's weight (mean over versions and seeds; max) |",
        "|---|---|---|---|---|---|", *rows, "",
        "| FedHL weighting | seed | accuracy per version (0 = initial) | rank-8 share per version |",
        "|---|---|---|---|", *curves, ""])


def skew3(args: argparse.Namespace) -> None:
    """Run (unless --report-only) and report the 3-site case into fedhl_weighting.md (its own section)."""
    out = RESULTS / "fedhl_weighting_skew3"
    jobs = [(m, s, str(out / f"{m}-{s}")) for s in args.seeds for m in SKEW3_METHODS
            if not (args.reuse and (out / f"{m}-{s}" / "summary.json").exists())]
    if not args.report_only:
        t0 = time.monotonic()
        with mp.get_context("spawn").Pool(args.workers) as pool:
            for i, (run, secs) in enumerate(pool.imap_unordered(_skew3_job, jobs), 1):
                print(f"[{i}/{len(jobs)}] {Path(run).name}: {secs:.0f}s (bench {time.monotonic() - t0:.0f}s)",
                      flush=True)
    section = skew3_report(out, args.seeds)
    md = RESULTS / "fedhl_weighting.md"
    text = md.read_text() if md.exists() else ""
    text = text.split(SKEW3_SECTION)[0].rstrip() + "\n\n" + section
    md.write_text(text)
    print(section)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--report-only", action="store_true", help="rewrite the tables and plots from the existing runs")
    p.add_argument("--reuse", action="store_true", help="keep finished runs of an earlier invocation")
    p.add_argument("--name", default="fedhl_accuracy", help="name of the results (bench/results/NAME.md/.json, runs in NAME/)")
    p.add_argument("--skew3", action="store_true", help="the 3-site two-class label-skew case (ranks 2/4/8) only; "
                   "its section of bench/results/fedhl_weighting.md")
    args = p.parse_args()
    if args.skew3:
        skew3(args)
        return
    global RESULT_NAME
    RESULT_NAME = args.name
    out = RESULTS / args.name
    jobs = [(m, d, s, str(out / f"{d}-{m}-{s}")) for s in args.seeds for d in args.datasets for m in args.methods]
    if args.reuse:  # a cell whose run finished (summary.json) is not run again
        jobs = [j for j in jobs if not (Path(j[3]) / "summary.json").exists()]
    t0 = time.monotonic()
    if args.report_only:
        saved = RESULTS / f"{args.name}.json"  # absent when the benchmark was stopped before writing it
        total = json.loads(saved.read_text())["total_s"] if saved.exists() else None
    else:
        with mp.get_context("spawn").Pool(args.workers) as pool:
            for i, (run, secs) in enumerate(pool.imap_unordered(_job, jobs), 1):
                print(f"[{i}/{len(jobs)}] {Path(run).name}: {secs:.0f}s (bench {time.monotonic() - t0:.0f}s)",
                      flush=True)
        total = time.monotonic() - t0
    rows, results = [], {}
    for d in args.datasets:
        r, results[d] = report(d, args.methods, args.seeds, out)
        rows += r
    table = ["| corpus | method | runs | peak accuracy | final accuracy | MB sent to clients | s per run |",
             "|---|---|---|---|---|---|---|", *rows]
    weights = weight_table(results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    plots = "\n".join(f"![{d}]({args.name}_{d}.png)" for d in args.datasets)
    md = RESULTS / f"{args.name}.md"
    kept = md.read_text().split(SKEW3_SECTION, 1) if md.exists() else []
    kept_section = "\n\n" + SKEW3_SECTION + kept[1] if len(kept) == 2 else ""
    md.write_text(
        f"# Heterogeneous LoRA ranks: MiniLM + LoRA, {NODES} clients, α = 0.3, ranks {{2,4,8,16,32}}, "
        f"seeds {args.seeds}\n\n"
        + (f"Whole benchmark: {total / 60:.1f} min on this machine ({args.workers} runs at a time).\n\n" if total
           else "Rebuilt from the finished runs of an interrupted benchmark (its total time was not recorded).\n\n")
        + "\n".join(table) + "\n\nMean aggregation weight per update, by the client's rank:\n\n" + "\n".join(weights)
        + "\n\n" + plots + "\n" + kept_section)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"total_s": total, "results": results}, indent=2))
    print("\n".join(table + [""] + weights))
    print(f"whole benchmark: {total / 60:.1f} min" if total else "whole benchmark: not timed (rebuilt report)")


if __name__ == "__main__":
    main()
