"""SmolLM2 instruction tuning across 8 silos: FedHL vs FlexLoRA vs FedAvg at the smallest rank vs each silo alone.

The embedded SmolLM2-135M-Instruct (real pretrained weights) + LoRA on the built-in
WordNet instruction corpus ("Define the noun 'X'." → its gloss), 8 silos split by
lexicographer category (Dirichlet α = 0.1), ranks {4, 8, 16, 32} by tier (2 silos each).
The federated methods run the real server stack (Federation, FedHL/FlexLoRA/FedAvg,
validation, the ClientApp and trainer code) on the in-process Grid; `local` trains each
silo's adapter alone at its own rank with the same number of local steps that silo gets
on average in the federation (rounds × clients-per-round / 8 jobs), and evaluates it the
way the server evaluates the global model. Held-out: the same 64 definitions for every
method (loss on answer tokens, perplexity = exp(loss), next-token accuracy, ROUGE-L of
greedy answers to 16 prompts). 3 seeds. Also measures a CPU client's training rate
(tokens/s) on an otherwise idle machine before the runs.

    .venv/bin/python bench/llm_federation.py [--seeds 0 1 2] [--rounds 6]

Writes bench/results/llm_federation.{md,json,png}. Sized for under an hour on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.harness import RESULTS, mean_spread, read_run, run_inprocess  # noqa: E402

NODES = 8
BASE = {"task": "causal-lm", "model": "smollm2", "dataset": "wordnet", "max-length": 72, "batch-size": 4,
        "local-steps": 4, "clients-per-round": 4, "lr": 2e-3, "lr-decay": 1.0, "ranks": "4,8,16,32",
        "dirichlet-alpha": 0.1, "eval-examples": 64}
METHODS = {
    "fedhl": {"aggregation": "fedhl"},
    "flexlora": {"aggregation": "flexlora"},
    "fedavg-r4": {"aggregation": "fedavg", "ranks": "", "lora-rank": 4},
}
RESULT_NAME = "llm_federation"


def run_config(method: str, seed: int, rounds: int) -> dict:
    """One federated run's configuration: evaluated at version 0 and at the end only (evaluation is half the cost)."""
    return {**BASE, **METHODS[method], "seed": seed, "num-rounds": rounds, "eval-every": rounds}


def tokens_per_second(steps: int = 8) -> dict:
    """A CPU client's training rate: SmolLM2 at rank 8, batch 4, on silo 0 (one warm-up step first)."""
    import torch

    from corolla.client.local import _adapter_model
    from corolla.config import RunConfig
    from corolla.learning.train_loop import initial_adapter
    from corolla.spec import LoraSpec

    cfg = RunConfig.from_mapping({**BASE, "seed": 0})
    model = _adapter_model(cfg.task_spec())
    enc = model.task.encode(model.task.builtin_partition(0, NODES, cfg.dirichlet_alpha).select(range(256)))  # in memory
    tokens_per_row = float(enc.inputs["attention_mask"].sum(1).float().mean())
    lora, start = LoraSpec(), initial_adapter(model.task, 8, LoraSpec(), 0)
    model.train(start, 8, enc, lora=lora, steps=1, batch_size=cfg.batch_size, lr=cfg.lr, seed=0)
    t = time.perf_counter()
    model.train(start, 8, enc, lora=lora, steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=1)
    seconds = time.perf_counter() - t
    return {"steps": steps, "batch_size": cfg.batch_size, "seconds": seconds, "threads": torch.get_num_threads(),
            "tokens_per_row": tokens_per_row, "tokens_per_s": steps * cfg.batch_size * tokens_per_row / seconds,
            "rows_per_s": steps * cfg.batch_size / seconds}


def local_runs(seed: int, rounds: int) -> list[dict]:
    """Each silo alone: its own adapter at its own rank, the federation's average number of steps for one silo."""
    import numpy as np

    from corolla.client.local import _adapter_model
    from corolla.config import RunConfig
    from corolla.config.fleet import simulated_rank
    from corolla.learning.train_loop import initial_adapter
    from corolla.server.evaluation import TaskEvaluator
    from corolla.strategies import MergedModel
    from corolla.strategies.lora_ops import delta, split_keys

    cfg = RunConfig.from_mapping({**BASE, "seed": seed})
    model = _adapter_model(cfg.task_spec())
    evaluator = TaskEvaluator(cfg, device="cpu")
    steps = round(rounds * cfg.clients_per_round / NODES * cfg.local_steps)
    out = []
    for pid in range(NODES):
        rank, lora = simulated_rank(cfg, pid), cfg.lora_spec()
        enc = model.task.encode(model.task.builtin_partition(pid, NODES, cfg.dirichlet_alpha))
        arrays, _ = model.train(initial_adapter(model.task, rank, lora, seed), rank, enc, lora=lora, steps=steps,
                                batch_size=cfg.batch_size, lr=cfg.lr, seed=seed * 1000 + pid)
        layers, dense = split_keys(arrays)
        deltas = {layer: delta(arrays[f"{layer}.lora_A.weight"], arrays[f"{layer}.lora_B.weight"], lora.scale(rank))
                  for layer in layers}
        r = evaluator.evaluate(MergedModel(deltas=deltas, dense={k: np.asarray(arrays[k]) for k in dense}))
        out.append({"silo": pid, "rank": rank, "rows": len(enc), "steps": steps, "loss": r.loss,
                    "accuracy": r.accuracy, **r.extra})
        print(f"  local silo {pid} (rank {rank}, {len(enc)} rows): loss {r.loss:.3f} ppl {r.extra['perplexity']:.2f} "
              f"rouge {r.extra['rouge_l']:.3f}", flush=True)
    return out


def summarize(results: dict) -> str:
    """The markdown report: before/after per method (mean ± std over seeds), local as mean over its 8 silos."""
    rows = ["| method | perplexity before | perplexity after | ROUGE-L before | ROUGE-L after | next-token acc. after "
            "| wall s per run |", "|---|---|---|---|---|---|---|"]
    before = [r["metrics"][0] for runs in results["runs"].values() for r in runs]
    for method, runs in results["runs"].items():
        final = [r["metrics"][-1] for r in runs]
        rows.append(f"| {method} | {mean_spread([m['perplexity'] for m in before])} | "
                    f"{mean_spread([m['perplexity'] for m in final])} | {mean_spread([m['rouge_l'] for m in before])} | "
                    f"{mean_spread([m['rouge_l'] for m in final])} | {mean_spread([m['accuracy'] for m in final])} | "
                    f"{mean_spread([r['wall_s'] for r in runs])} |")
    local = results["local"]
    per_seed = {k: [statistics.mean(s[k] for s in silos) for silos in local.values()]
                for k in ("perplexity", "rouge_l", "accuracy")}
    best = [min(s["perplexity"] for s in silos) for silos in local.values()]
    rows.append(f"| local (each silo alone, mean of 8) | {mean_spread([m['perplexity'] for m in before])} | "
                f"{mean_spread(per_seed['perplexity'])} | {mean_spread([m['rouge_l'] for m in before])} | "
                f"{mean_spread(per_seed['rouge_l'])} | {mean_spread(per_seed['accuracy'])} | "
                f"{mean_spread(results['local_wall_s'])} |")
    rows.append(f"| local (best silo) | | {mean_spread(best)} | | | | |")
    tps = results["tokens_per_s"]
    lines = [f"# SmolLM2-135M-Instruct + LoRA, 8 WordNet silos by category (Dirichlet α = 0.1), ranks 4/8/16/32, "
             f"seeds {results['seeds']}", "",
             f"{results['rounds']} versions, 4 of 8 silos per round, 4 local steps of batch 4 at ≤ 72 tokens, lr 2e-3; "
             "held-out: the same 64 definitions for every method (perplexity of the answer tokens, next-token accuracy, "
             "ROUGE-L of greedy answers to 16 of them). `local`: each silo trains alone at its rank for "
             f"{results['local_steps']} steps (the federation's average per silo) and is evaluated like the global "
             "model. Mean ± std over seeds (local: the mean over its 8 silos, then over seeds).", "",
             *rows, "",
             f"- CPU client training rate (idle machine, {tps['threads']} torch threads, rank 8, batch 4): "
             f"{tps['tokens_per_s']:.0f} tokens/s ({tps['rows_per_s']:.2f} rows/s, {tps['tokens_per_row']:.1f} tokens "
             f"a row, {tps['steps']} steps in {tps['seconds']:.1f} s).",
             f"- Whole benchmark: {results['total_s'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = [*results["runs"], "local"]
    for ax, key, label in ((axes[0], "perplexity", "held-out perplexity (lower is better)"),
                           (axes[1], "rouge_l", "held-out ROUGE-L")):
        before = statistics.mean(r["metrics"][0][key] for runs in results["runs"].values() for r in runs)
        after = [statistics.mean(r["metrics"][-1][key] for r in runs) for runs in results["runs"].values()]
        after.append(statistics.mean(statistics.mean(s[key] for s in silos) for silos in results["local"].values()))
        ax.bar(names, after, color="tab:blue", label="after")
        ax.axhline(before, color="tab:red", linestyle="--", label="before (base model)")
        ax.set_title(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--out", type=Path, default=RESULTS / RESULT_NAME)
    args = p.parse_args()
    t0 = time.monotonic()
    results: dict = {"seeds": args.seeds, "rounds": args.rounds, "runs": {m: [] for m in METHODS}, "local": {},
                     "local_wall_s": []}
    results["tokens_per_s"] = tokens_per_second()
    print(f"CPU client: {results['tokens_per_s']['tokens_per_s']:.0f} tokens/s", flush=True)
    for seed in args.seeds:
        for method in METHODS:
            out = args.out / f"{method}-{seed}"
            t = time.monotonic()
            run_inprocess(run_config(method, seed, args.rounds), NODES, out)
            summary, metrics = read_run(out)
            results["runs"][method].append({"seed": seed, "wall_s": time.monotonic() - t, "metrics": metrics,
                                            "summary": summary})
            print(f"{method} seed {seed}: ppl {metrics[0]['perplexity']:.2f} → {metrics[-1]['perplexity']:.2f}, "
                  f"rouge {metrics[0]['rouge_l']:.3f} → {metrics[-1]['rouge_l']:.3f} "
                  f"({time.monotonic() - t:.0f} s)", flush=True)
        t = time.monotonic()
        results["local"][str(seed)] = local_runs(seed, args.rounds)
        results["local_wall_s"].append(time.monotonic() - t)
        results["local_steps"] = results["local"][str(seed)][0]["steps"]
    results["total_s"] = time.monotonic() - t0
    (RESULTS / f"{RESULT_NAME}.json").write_text(json.dumps(results, indent=1, default=float))
    plot(results, RESULTS / f"{RESULT_NAME}.png")
    text = summarize(results) + f"\n![results]({RESULT_NAME}.png)\n"
    (RESULTS / f"{RESULT_NAME}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
