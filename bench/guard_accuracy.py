"""Does bounding every update (the server's guards) cost an honest federation accuracy?

The server bounds every reply: (a) the optimizer bound, always on — a reply that moves a
value further than the job's AdamW steps can is rejected (`adam_change_bound`); (b) norm
clipping (`max-update-norm`, 0 = adaptive: 4 × the lower median of the update norms);
(c) the weight-share bound (`max-weight-share`, 0 = auto: 1/2 for two updates, max(1/2, 2/k)
above). This benchmark runs honest federations with (b) and (c) at their defaults ("guards
on") and switched off (`max-update-norm=-1`, `max-weight-share=1`, "guards off") and counts,
from updates.jsonl, the honest updates the optimizer bound rejected (must be 0), the updates
clipped and the updates whose weight was capped. Two settings:

* quick-start: the defaults (MiniLM + LoRA, BBC, 20 nodes, 6 clients per round, α = 0.5)
  at `--rounds` rounds (default 8: the default 12 takes about 11 min per run on one core);
* two-site: 2 nodes, both in every round (`min-nodes=2`, `clients-per-round=2`), α = 0.5, BBC,
  `--rounds` rounds — the cross-silo case the guards target.

Runs the real server stack on an in-process Grid, one federation at a time on one core
(OMP_NUM_THREADS=1, torch.set_num_threads(1)), each in a fresh process:

    .venv/bin/python bench/guard_accuracy.py [--seeds 0 1 2] [--rounds 8] [--settings quickstart two-site]

Writes bench/results/guard_accuracy.{md,json,png}; run directories go to bench/results/guard_accuracy/.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the spawned run processes
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.harness import RESULTS, mean_spread, read_run, run_inprocess  # noqa: E402

NAME = "guard_accuracy"
GUARDS = {
    "on": {"max-update-norm": 0.0, "max-weight-share": 0.0},  # the defaults
    "off": {"max-update-norm": -1.0, "max-weight-share": 1.0},
}
#: per setting: nodes and the keys it sets (everything else: the defaults)
SETTINGS = {
    "quickstart": {"nodes": 20, "keys": {}, "title": "quick-start defaults: MiniLM, BBC, 20 nodes, 6 per round, α = 0.5"},
    "two-site": {"nodes": 2, "keys": {"dataset": "bbc", "clients-per-round": 2, "dirichlet-alpha": 0.5},
                 "title": "two sites: MiniLM, BBC, 2 nodes, both every round, α = 0.5"},
}


def config(setting: str, guards: str, seed: int, rounds: int) -> dict:
    """The run configuration of one (setting, guards, seed) cell (`min-nodes` = nodes is set by the harness)."""
    return {"seed": seed, "num-rounds": rounds, **SETTINGS[setting]["keys"], **GUARDS[guards]}


def _record_headroom(ratios: list[float]) -> None:
    """Wrap the server's optimizer-bound check to also record, per reply, its largest per-value change as a
    fraction of the bound (the check itself runs unchanged)."""
    import numpy as np

    from corolla.server.federation import Federation
    from corolla.strategies.guard import adam_change_bound

    check = Federation._check_optimizer_bound

    def wrapped(self, update):  # noqa: ANN001, ANN202
        job = self.job_config(update.sent.version)
        bound = adam_change_bound(job.lr, job.local_steps)
        worst = max((float(np.max(np.abs(np.asarray(update.arrays[k], np.float64)
                                          - np.asarray(update.sent.arrays[k], np.float64))))
                     for k in update.arrays if np.size(update.arrays[k])), default=0.0)
        ratios.append(worst / bound)
        return check(self, update)

    Federation._check_optimizer_bound = wrapped


def _job(args: tuple) -> tuple[str, float]:
    setting, guards, seed, rounds, out = args
    import torch

    torch.set_num_threads(1)
    ratios: list[float] = []
    _record_headroom(ratios)
    t = time.monotonic()
    run_inprocess(config(setting, guards, seed, rounds), SETTINGS[setting]["nodes"], Path(out))
    secs = time.monotonic() - t
    (Path(out) / "optimizer_bound_use.json").write_text(json.dumps(ratios))
    (Path(out) / "run_s.json").write_text(json.dumps(secs))  # so that a report rebuilt with --reuse keeps it
    return out, secs


def guard_counts(run_dir: Path) -> dict:
    """What the guards did to a run's replies (updates.jsonl)."""
    from corolla.server.records import read_jsonl

    rows = read_jsonl(run_dir / "updates.jsonl")
    rejected = [u for u in rows if u["status"] == "rejected"]
    accepted = [u for u in rows if u["status"] == "accepted"]
    clipped = [u for u in accepted if u.get("clipped") is not None]
    capped = [u for u in accepted if u.get("weight_capped_from") is not None]
    lowered = [u for u in capped if float(u["weight_capped_from"]) > float(u["weight"])]
    shares: dict[int, list[float]] = {}
    for u in accepted:
        shares.setdefault(u["applied_version"], []).append(float(u["weight"]))
    use_file = run_dir / "optimizer_bound_use.json"
    use = json.loads(use_file.read_text()) if use_file.exists() else []
    return {
        "bound_use_max": max(use, default=None), "bound_use_median": statistics.median(use) if use else None,
        "updates": len(rows), "accepted": len(accepted), "rejected": len(rejected),
        "rejected_optimizer_bound": sum("AdamW" in (u.get("reason") or "") for u in rejected),
        "rejected_reasons": [u.get("reason") for u in rejected],
        "clipped": len(clipped), "capped": len(capped), "lowered": len(lowered),
        "clip_factors": [float(u["clipped"]) for u in clipped],
        # lowered updates: (share before the bound, share applied) of the step's total weight
        "lowered_shares": [(float(u["weight_capped_from"]) / sum(shares[u["applied_version"]]),
                            float(u["weight"]) / sum(shares[u["applied_version"]])) for u in lowered],
        "max_share": max((max(w) / sum(w) for w in shares.values() if sum(w) > 0), default=None),
        "update_norms": [float(u["update_norm"]) for u in accepted if u.get("update_norm") is not None],
    }


def collect(out: Path, setting: str, seeds: list[int]) -> dict:
    """Per guards on/off: the finished runs' summaries, curves and guard counts."""
    res = {}
    for g in GUARDS:
        runs = []
        for s in seeds:
            d = out / f"{setting}-{g}-{s}"
            if not (d / "summary.json").exists():
                continue
            summary, evals = read_run(d)
            runs.append({"seed": s, "summary": summary, "counts": guard_counts(d),
                         "curve": [(e["version"], e["accuracy"]) for e in evals]})
        res[g] = runs
    return res


def _use(counts: list[dict]) -> str:
    """Median (over runs' medians) and max of each reply's largest per-value change as a fraction of the bound."""
    med = [c["bound_use_median"] for c in counts if c["bound_use_median"] is not None]
    top = [c["bound_use_max"] for c in counts if c["bound_use_max"] is not None]
    return f"{statistics.median(med):.4f}, {max(top):.4f}" if med else "—"


def table(res: dict) -> list[str]:
    """One row per guards on/off, then the paired (same seed) difference."""
    lines = ["| guards | runs | final accuracy | best accuracy | rejected by the optimizer bound | other rejections | "
             "clipped | weight-capped (of which lowered) | accepted updates | largest change / optimizer bound "
             "(median, max over replies) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for g, runs in res.items():
        if not runs:
            continue
        c = [r["counts"] for r in runs]
        lines.append(
            f"| {g} | {len(runs)} | {mean_spread([r['summary']['final_accuracy'] for r in runs])} | "
            f"{mean_spread([r['summary']['peak_accuracy'] for r in runs])} | "
            f"{sum(x['rejected_optimizer_bound'] for x in c)} | "
            f"{sum(x['rejected'] - x['rejected_optimizer_bound'] for x in c)} | {sum(x['clipped'] for x in c)} | "
            f"{sum(x['capped'] for x in c)} ({sum(x['lowered'] for x in c)}) | {sum(x['accepted'] for x in c)} | "
            f"{_use(c)} |")
    on = {r["seed"]: r["summary"] for r in res.get("on", [])}
    off = {r["seed"]: r["summary"] for r in res.get("off", [])}
    both = sorted(set(on) & set(off))
    if both:
        def diff(key: str) -> str:
            return mean_spread([round(on[s][key] - off[s][key], 9) + 0.0 for s in both])

        lines.append(f"| on − off (same seed) | {len(both)} | {diff('final_accuracy')} | {diff('peak_accuracy')} | "
                     "| | | | | |")
    return lines


def reading(res: dict) -> str:
    """One paragraph: did the guards engage, and did they change the curves."""
    on, off = {r["seed"]: r for r in res.get("on", [])}, {r["seed"]: r for r in res.get("off", [])}
    both = sorted(set(on) & set(off))
    c = [on[s]["counts"] for s in both]
    rejected = sum(x["rejected"] for r in (*on.values(), *off.values()) for x in [r["counts"]])
    text = (f"No honest update was rejected ({rejected} rejections in {len(on) + len(off)} runs). "
            if rejected == 0 else f"**{rejected} honest updates were rejected.** ")
    use = [r["counts"]["bound_use_max"] for r in (*on.values(), *off.values()) if r["counts"]["bound_use_max"]]
    if use:
        text += (f"The honest replies' largest per-value change reached at most {max(use):.4f} of the optimizer "
                 "bound (a constant-sign gradient moves a value by almost exactly lr per AdamW step, which the bound "
                 "allows for; rounding slack is on top). ")
    if not both:
        return text
    identical = all(on[s]["curve"] == off[s]["curve"] for s in both)
    clipped, capped = sum(x["clipped"] for x in c), sum(x["lowered"] for x in c)
    steps = sum(len(on[s]["curve"]) - 1 for s in both)
    if clipped == 0 and capped == 0:
        text += "With guards on, neither norm clipping nor the weight-share bound engaged in any step"
    else:
        before = max((a for x in c for a, _ in x["lowered_shares"]), default=0.0)
        text += (f"With guards on, the weight-share bound lowered one update's weight in {capped} of {steps} "
                 f"aggregation steps (largest share before the bound: {before:.3f}) and norm clipping scaled "
                 f"{clipped} updates")
    text += ("; guards on and off produced the same accuracy at every version, seed for seed."
             if identical else
             "; final accuracy on − off, same seed: "
             + ", ".join(f"{on[s]['summary']['final_accuracy'] - off[s]['summary']['final_accuracy']:+.4f}"
                         for s in both) + ".")
    return text


def per_seed(res: dict) -> list[str]:
    """Per run: accuracy per version, clip factors and capped shares."""
    lines = ["| guards | seed | accuracy per version (0 = initial) | clip factors | lowered shares (before → applied) |",
             "|---|---|---|---|---|"]
    for g, runs in res.items():
        for r in runs:
            c = r["counts"]
            clips = " ".join(f"{f:.2f}" for f in c["clip_factors"]) or "—"
            caps = " ".join(f"{a:.3f}→{b:.3f}" for a, b in c["lowered_shares"]) or "—"
            lines.append(f"| {g} | {r['seed']} | {' '.join(f'{a:.2f}' for _, a in r['curve'])} | {clips} | {caps} |")
    return lines


def plot(results: dict, path: Path, rounds: int) -> None:
    """Accuracy vs version per setting: mean over seeds per guards on/off, band from the lowest to the highest run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, (setting, res) in zip(axes[0], results.items(), strict=True):
        for ci, (g, runs) in enumerate(res.items()):
            if not runs:
                continue
            xs = sorted(set.intersection(*({v for v, _ in r["curve"]} for r in runs)))
            acc = [[dict(r["curve"])[v] for r in runs] for v in xs]
            ax.plot(xs, [statistics.mean(a) for a in acc], color=f"C{ci}", lw=1.8, marker="o", ms=3,
                    ls="-" if g == "on" else "--",  # dashed, so that identical curves both show
                    label=f"guards {g} (mean of {len(runs)})")
            ax.fill_between(xs, [min(a) for a in acc], [max(a) for a in acc], color=f"C{ci}", alpha=0.15)
        ax.set_title(SETTINGS[setting]["title"], fontsize=9)
        ax.set_xlabel("version (round)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Guards on (defaults) vs off, {rounds} rounds; band: lowest to highest seed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, seeds: list[int], rounds: int, total: float | None, timings: dict) -> str:
    from corolla.strategies.guard import adam_change_bound

    bound = adam_change_bound(3e-3, 10)
    parts = [
        "# Guards on vs off: the honest federation's accuracy", "",
        "The server bounds every update: the optimizer bound (always on; a reply that moves any value further than "
        f"the job's AdamW steps can is rejected — at the defaults, lr 3e-3 and 10 local steps, {bound:.4g} per value "
        "at version 0, shrinking with `lr-decay`), norm clipping (`max-update-norm`) and the weight-share bound "
        "(`max-weight-share`). **Guards on** = the defaults (`max-update-norm=0`: adaptive, 4 × the lower median; "
        "`max-weight-share=0`: auto, 1/2 for two updates, max(1/2, 2/k) above). **Guards off** = "
        "`max-update-norm=-1`, `max-weight-share=1` (the optimizer bound stays on in both).", "",
        f"`python bench/guard_accuracy.py --seeds {' '.join(map(str, seeds))} --rounds {rounds}`: MiniLM + LoRA "
        "(`model=auto`), BBC News (5 classes), defaults otherwise (rank 8, 10 local steps, batch 16, lr 3e-3, "
        "lr-decay 0.9, FedAvg, server evaluation on the full BBC test split after every version). Real server stack "
        "on an in-process Grid, CPU, one federation at a time on one core. Final = accuracy of the last version; "
        "best = highest over versions 0…N (version 0 is the untrained adapter). Counts are summed over the seeds, "
        "from each run's updates.jsonl: rejected = `status == \"rejected\"` (split into the optimizer bound's and "
        "any other), clipped = `clipped` not null, weight-capped = `weight_capped_from` not null (the share bound moved its "
        "weight: lowered for the update above the bound, raised for the others, which receive the excess; "
        "'of which lowered' counts the first). 'Largest change / optimizer bound': for every reply, the largest "
        "|returned − sent| over all its values divided by the bound of its job (lr × lr-decay^version, 10 steps), "
        "recorded by wrapping the server's check; 1 would be rejected.", "",
    ]
    if rounds != 12:
        parts += [f"The quick-start setting runs {rounds} rounds instead of the default 12: one 12-round run takes "
                  "about 11 minutes on one core here, beyond this benchmark's budget.", ""]
    for setting, res in results.items():
        nodes = SETTINGS[setting]["nodes"]
        ran = sorted({r["seed"] for runs in res.values() for r in runs})
        missing = [s for s in seeds if s not in ran]
        parts += [f"## {SETTINGS[setting]['title']}", "",
                  f"{nodes} nodes, {rounds} rounds, seeds {ran}, `min-nodes={nodes}`"
                  + (", `clients-per-round=2`" if setting == "two-site" else ", `clients-per-round=6` (default)")
                  + "." + (f" **Seed(s) {missing} were not run** (time budget)." if missing else ""), "",
                  *table(res), "", reading(res), "", *per_seed(res), ""]
    parts += ["![accuracy vs version](guard_accuracy.png)", "",
              "Scope: CPU, float32 training and float32 wire only; with bf16 training (CUDA) or a half-precision "
              "`wire-dtype` the optimizer bound's rounding slack is larger and is not measured here. The two-site "
              "split is Dirichlet α = 0.5 over 2 nodes; the site sizes it gives (the shares before the bound, per "
              "seed above) decide how much the share bound changes the weighting, and a strongly unbalanced pair "
              "is not covered.", ""]
    if timings:
        spans = "; ".join(f"{st} {min(v):.0f}–{max(v):.0f} s" for st in results
                          if (v := [t for k, t in timings.items() if k.startswith(st + "-")]))
        parts += [f"Run times vary with other work on this 2-core machine during the benchmark ({spans}); they are "
                  "not a speed measurement.", ""]
    if timings:
        parts += ["Run times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + ".", ""]
    if timings:
        parts += [f"Sum of the run times: {sum(timings.values()) / 60:.1f} min"
                  + (f" (this invocation: {total / 60:.1f} min wall)." if total is not None else "."), ""]
    return "\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=8, help="rounds of both settings (the quick-start default is 12)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--reuse", action="store_true", help="keep finished runs of an earlier invocation")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the existing runs")
    args = p.parse_args()
    out = RESULTS / NAME
    # seed-major order: if the benchmark is stopped, the finished seeds are complete pairs in both settings
    jobs = [(st, g, s, args.rounds, str(out / f"{st}-{g}-{s}")) for s in args.seeds for st in args.settings
            for g in GUARDS]
    jobs_all = list(jobs)
    if args.reuse or args.report_only:
        jobs = [j for j in jobs if not (Path(j[-1]) / "summary.json").exists()]
    timings = {name: json.loads((out / name / "run_s.json").read_text()) for *_, run in jobs_all
               if (out / (name := Path(run).name) / "run_s.json").exists() and (args.reuse or args.report_only)}
    total = None
    if not args.report_only:
        t0 = time.monotonic()
        ctx = mp.get_context("spawn")
        for i, job in enumerate(jobs, 1):
            with ctx.Pool(1) as pool:  # a fresh process per federation, one at a time
                run, secs = pool.apply(_job, (job,))
            timings[Path(run).name] = secs
            print(f"[{i}/{len(jobs)}] {Path(run).name}: {secs:.0f}s (bench {time.monotonic() - t0:.0f}s)", flush=True)
        total = time.monotonic() - t0
    results = {st: collect(out, st, args.seeds) for st in args.settings}
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(results, RESULTS / f"{NAME}.png", args.rounds)
    md = write_report(results, args.seeds, args.rounds, total, timings)
    (RESULTS / f"{NAME}.md").write_text(md)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(
        {"seeds": args.seeds, "rounds": args.rounds, "total_s": total, "run_s": timings,
         "results": {st: {g: [{k: r[k] for k in ("seed", "summary", "counts", "curve")} for r in runs]
                          for g, runs in res.items()} for st, res in results.items()}}, indent=2))
    print(md)


if __name__ == "__main__":
    main()
