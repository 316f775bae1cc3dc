"""Client selection under extreme label skew: random vs Oort vs HeteRo-Select.

The paper's setting at CPU scale: Fashion-MNIST (small CNN, trained in full), 100
clients, Dirichlet α = 0.1, 10 clients per round, FedProx μ = 0.1 for every
selector, ≥ 100 rounds, 3 seeds. Runs the real server stack (Federation, sync
driver, validation, strategies, ClientApp, trainer) on an in-process Grid, two
runs at a time. Prints peak / final accuracy and the stability drop (peak − final)
as mean ± std over seeds, and writes bench/results/selection.{md,json,png}.

    .venv/bin/python bench/selection.py [--rounds 100] [--seeds 0 1 2] [--text]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.harness import RESULTS, mean_spread, plot_groups, read_run, run_inprocess  # noqa: E402

SELECTORS = ("random", "oort", "heteroselect")


def image_config(selector: str, seed: int, rounds: int) -> dict:
    return {"task": "image-classification", "model": "cnn", "dataset": "fashion-mnist", "selector": selector,
            "seed": seed, "num-rounds": rounds, "clients-per-round": 10, "local-steps": 10, "batch-size": 32,
            "lr": 1e-3, "prox-mu": 0.1, "dirichlet-alpha": 0.1, "eval-every": 2}


def text_config(selector: str, seed: int, rounds: int) -> dict:
    return {"selector": selector, "seed": seed, "num-rounds": rounds, "clients-per-round": 4, "local-steps": 10,
            "lr": 2e-3, "prox-mu": 0.1, "dirichlet-alpha": 0.1}


def _job(args: tuple) -> tuple[str, int, str]:
    kind, selector, seed, rounds, nodes, out = args
    cfg = (image_config if kind == "image" else text_config)(selector, seed, rounds)
    run_inprocess(cfg, nodes, Path(out))
    return selector, seed, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--text", action="store_true", help="also one run per selector on BBC + MiniLM LoRA (α = 0.1)")
    p.add_argument("--text-rounds", type=int, default=12)
    p.add_argument("--text-only", action="store_true", help="only the BBC runs (reuses nothing, writes selection_text.md)")
    args = p.parse_args()
    out = RESULTS / "selection"
    jobs = [] if args.text_only else [("image", s, seed, args.rounds, 100, str(out / f"image-{s}-{seed}"))
                                      for seed in args.seeds for s in SELECTORS]
    if args.text or args.text_only:
        jobs += [("text", s, 0, args.text_rounds, 20, str(out / f"text-{s}-0")) for s in SELECTORS]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for selector, seed, run in pool.imap_unordered(_job, jobs):
            print(f"done: {selector} seed {seed} -> {run}", flush=True)
    rows, groups, results = [], {}, {}
    kinds = ("text",) if args.text_only else (("image", "text") if args.text else ("image",))
    for kind in kinds:
        for s in SELECTORS:
            runs = [read_run(Path(j[5])) for j in jobs if j[0] == kind and j[1] == s]
            summ = [r[0] for r in runs]
            results[f"{kind}/{s}"] = summ
            if kind == "image":
                groups[s] = [r[1] for r in runs]
            rows.append(f"| {kind} | {s} | {len(runs)} | {mean_spread([x['peak_accuracy'] for x in summ])} | "
                        f"{mean_spread([x['final_accuracy'] for x in summ])} | "
                        f"{mean_spread([x['stability_drop'] for x in summ])} |")
    table = ["| task | selector | runs | peak accuracy | final accuracy | stability drop (peak − final) |",
             "|---|---|---|---|---|---|", *rows]
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.text_only:
        (RESULTS / "selection_text.md").write_text(
            f"# Selection, BBC + MiniLM LoRA, 20 clients, α = 0.1, 4/round, {args.text_rounds} rounds, seed 0\n\n"
            + "\n".join(table) + "\n")
        (RESULTS / "selection_text.json").write_text(json.dumps(results, indent=2))
        print("\n".join(table))
        return
    (RESULTS / "selection.md").write_text(
        f"# Selection, Fashion-MNIST CNN, 100 clients, α = 0.1, 10/round, {args.rounds} rounds\n\n"
        + "\n".join(table) + "\n\n![curves](selection.png)\n")
    (RESULTS / "selection.json").write_text(json.dumps(results, indent=2))
    plot_groups(groups, "version", RESULTS / "selection.png",
                f"Fashion-MNIST, 100 clients, Dirichlet α=0.1, {args.rounds} rounds", "round")
    print("\n".join(table))


if __name__ == "__main__":
    main()
