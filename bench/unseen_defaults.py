"""Do the defaults hold on two-class corpora they were not tuned on? Federation vs centralised vs logreg vs site alone.

The defaults (quick start, other benchmarks) were chosen on BBC News (5 classes). This
benchmark builds two-class corpora from text that ships on this machine and that no
default was tuned on:

* `wordnet`: WordNet 3.0 noun glosses, lexicographer category noun.cognition vs
  noun.communication (a hard, abstract pair);
* `debian`: Debian package descriptions from /var/lib/dpkg/status, library packages
  (Sections libs, oldlibs, libdevel) vs everything else (programs, tools, data);
* `bbc2` (only with `--corpora ... bbc2`): BBC business vs tech.

Per corpus and seed: three silos with label skew 80/20, 50/50, 20/80 written as CSV files
(one simulated node each, in file order, at LoRA ranks 2, 4, 8: `ranks=2,4,8`, so
`aggregation=auto` picks FedHL) and a balanced held-out test CSV. Compared:

* **federation**: the real server stack (Federation, sync driver, strategies, ClientApp,
  `sim-data` = the silo folder, as `corolla sim --data FOLDER --ranks ...` runs it) on an
  in-process Grid, `--rounds` versions (default 10), every other key at its default
  (`--set KEY=VALUE` overrides, for the diagnosis);
* **centralised**: one LoRA adapter (rank 8) trained on the pooled silos with the project's
  own train loop (`AdapterModel.train`), as many optimizer steps of the same batch size as
  the whole federation takes (versions × 3 sites × local-steps), AdamW at `--central-lr`
  (constant), evaluated every version-equivalent; its final accuracy is the reference;
* **logreg**: logistic regression (sklearn) on frozen mean-pooled MiniLM embeddings of the
  pooled silos;
* **site alone**: each site's adapter (its own rank) trained on its own silo only, the
  steps that site takes in the federation (versions × local-steps), same recipe as the
  centralised run.

Every number is test accuracy on the held-out CSV. One process at a time, one thread:

    .venv/bin/python bench/unseen_defaults.py [--quick] [--seeds 0 1 2] [--corpora wordnet debian]
                                              [--set KEY=VALUE ...] [--name NAME]

`--quick`: one seed, 6 versions. Writes bench/results/NAME.{json,md,png} (NAME defaults to
unseen_defaults); runs and data go to bench/results/NAME/.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.harness import RESULTS, mean_spread, read_run, run_inprocess  # noqa: E402

#: label shares of class 0 at the three sites, and their ranks (tier assignment: node i gets ranks[i])
SKEW = (0.8, 0.5, 0.2)
RANKS = (2, 4, 8)
#: per corpus: class names, rows per site, test rows per class
CORPORA = {
    "wordnet": {"labels": ("cognition", "communication"), "site_rows": 300, "test_per_class": 200},
    "debian": {"labels": ("library", "program"), "site_rows": 158, "test_per_class": 80},
    "bbc2": {"labels": ("business", "tech"), "site_rows": 200, "test_per_class": 80},
}
#: keys every federation of this benchmark sets (the rest: defaults). max-length 64 is the default; short texts.
FIXED = {"ranks": ",".join(map(str, RANKS)), "max-rank": max(RANKS)}


# ---------------------------------------------------------------------------------------------- corpora
def _wordnet_rows() -> dict[str, list[str]]:
    from corolla.data.silo import read_wordnet_definitions

    cats = {9 - 3: "cognition", 10 - 3: "communication"}  # read_wordnet_definitions' category = lex_filenum - 3
    rows: dict[str, list[str]] = {c: [] for c in cats.values()}
    for _, definition, cat in read_wordnet_definitions():
        if cat in cats:
            rows[cats[cat]].append(definition)
    return rows


def _debian_rows() -> dict[str, list[str]]:
    text = Path("/var/lib/dpkg/status").read_text(encoding="utf-8", errors="replace")
    rows: dict[str, list[str]] = {"library": [], "program": []}
    seen = set()
    for para in text.split("\n\n"):
        sec = re.search(r"^Section: (\S+)", para, re.M)
        desc = re.search(r"^Description: (.*(?:\n .*)*)", para, re.M)
        if not sec or not desc:
            continue
        lines = [ln.strip() for ln in desc.group(1).split("\n")]
        body = " ".join(ln for ln in lines if ln != ".")
        if body in seen:
            continue
        seen.add(body)
        rows["library" if sec.group(1) in ("libs", "oldlibs", "libdevel") else "program"].append(body)
    return rows


def _bbc_rows() -> dict[str, list[str]]:
    from corolla.data.silo import builtin_split

    train, test = builtin_split("bbc")
    names = train.features["label"].names
    rows: dict[str, list[str]] = {"business": [], "tech": []}
    for split in (train, test):
        for t, y in zip(split["text"], split["label"], strict=True):
            if names[y] in rows:
                rows[names[y]].append(t)
    return rows


READERS = {"wordnet": _wordnet_rows, "debian": _debian_rows, "bbc2": _bbc_rows}


def write_corpus(corpus: str, seed: int, out: Path) -> dict:
    """Three skewed site CSVs (silos/site{0,1,2}.csv), test.csv and pooled.csv for one seed; return their paths."""
    import numpy as np
    import pandas as pd

    spec = CORPORA[corpus]
    a, b = spec["labels"]
    rows = READERS[corpus]()
    rng = np.random.default_rng(seed)
    pools = {c: [rows[c][i] for i in rng.permutation(len(rows[c]))] for c in (a, b)}
    n, k = spec["site_rows"], spec["test_per_class"]
    test = [(t, c) for c in (a, b) for t in pools[c][:k]]
    pools = {c: p[k:] for c, p in pools.items()}
    need = {a: sum(round(s * n) for s in SKEW), b: sum(n - round(s * n) for s in SKEW)}
    for c in (a, b):
        if len(pools[c]) < need[c]:
            raise SystemExit(f"{corpus}: class {c} has {len(pools[c])} training rows, the silos need {need[c]}")
    (out / "silos").mkdir(parents=True, exist_ok=True)
    sites, pooled = [], []
    for i, share in enumerate(SKEW):
        na = round(share * n)
        site = [(pools[a].pop(), a) for _ in range(na)] + [(pools[b].pop(), b) for _ in range(n - na)]
        frame = pd.DataFrame(site, columns=["text", "label"]).sample(frac=1, random_state=seed)
        sites.append(out / "silos" / f"site{i}.csv")
        frame.to_csv(sites[-1], index=False)
        pooled += site
    pd.DataFrame(test, columns=["text", "label"]).sample(frac=1, random_state=seed).to_csv(out / "test.csv", index=False)
    pd.DataFrame(pooled, columns=["text", "label"]).sample(frac=1, random_state=seed).to_csv(out / "pooled.csv",
                                                                                           index=False)
    return {"silos": str(out / "silos"), "sites": [str(s) for s in sites], "test": str(out / "test.csv"),
            "pooled": str(out / "pooled.csv"), "labels": ",".join((a, b))}


# ---------------------------------------------------------------------------------------------- runs
def fed_config(files: dict, seed: int, rounds: int, overrides: dict) -> dict:
    """The federation's keys: the silo folder, the labels, the test file, the ranks; everything else default."""
    return {"sim-data": files["silos"], "labels": files["labels"], "test-data": files["test"], "seed": seed,
            "num-rounds": rounds, **FIXED, **overrides}


def _fed_job(args: tuple) -> dict:
    files, seed, rounds, overrides, out = args
    import torch

    torch.set_num_threads(1)
    t = time.monotonic()
    run_inprocess(fed_config(files, seed, rounds, overrides), len(SKEW), Path(out))
    summary, evals = read_run(Path(out))
    return {"final": summary["final_accuracy"], "peak": summary["peak_accuracy"],
            "curve": [e["accuracy"] for e in evals], "s": time.monotonic() - t}


def _task(files: dict):  # noqa: ANN202
    from corolla.config import RunConfig

    cfg = RunConfig.from_mapping({"labels": files["labels"], "test-data": files["test"]})
    from corolla.learning.tasks import build_task

    return cfg, build_task(cfg.task_spec())


def _load(task, path: str):  # noqa: ANN001, ANN202
    from corolla.data.files import FileSource

    return task.load_silo(FileSource(Path(path)), "text", "label")


def _adapter_job(args: tuple) -> dict:
    """Train one adapter on one CSV (pooled or a site) with the project's train loop; accuracy every `every` steps."""
    files, train_csv, rank, steps, every, lr, seed = args
    import torch

    torch.set_num_threads(1)
    from corolla.learning.train_loop import AdapterModel, initial_adapter

    cfg, task = _task(files)
    lora = cfg.lora_spec()
    t = time.monotonic()
    torch.manual_seed(seed)
    model = AdapterModel(task, torch.device("cpu"))
    data, test = task.encode(_load(task, train_csv)), task.encode(_load(task, files["test"]))
    arrays = initial_adapter(task, rank, lora, seed)
    curve = [model.evaluate(arrays, rank, test, lora).accuracy]
    done = 0
    while done < steps:
        k = min(every, steps - done)
        # one AdamW run over all steps would keep its moments; a fresh optimizer per chunk is what a client does per job
        arrays, _ = model.train(arrays, rank, data, lora=lora, steps=k, batch_size=cfg.batch_size, lr=lr,
                                seed=seed * 100003 + done)
        done += k
        curve.append(model.evaluate(arrays, rank, test, lora).accuracy)
    return {"final": curve[-1], "peak": max(curve), "curve": curve, "s": time.monotonic() - t}


def _logreg_job(args: tuple) -> dict:
    """Logistic regression on frozen mean-pooled MiniLM embeddings (the base encoder, no adapter, no head)."""
    files, seed = args
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoModel

    from corolla.learning import models

    torch.set_num_threads(1)
    t = time.monotonic()
    _, task = _task(files)
    enc = AutoModel.from_pretrained(models.minilm_path()).eval()

    def embed(path: str) -> tuple[np.ndarray, np.ndarray]:
        ds = _load(task, path)
        data = task.encode(ds)
        out = []
        with torch.no_grad():
            for i in range(0, len(data), 64):
                inputs, _ = data.batch(torch.arange(i, min(i + 64, len(data))), torch.device("cpu"))
                h = enc(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
                m = inputs["attention_mask"].unsqueeze(-1).float()
                out.append(((h * m).sum(1) / m.sum(1)).numpy())
        return np.concatenate(out), np.asarray(ds["label"])

    x, y = embed(files["pooled"])
    xt, yt = embed(files["test"])
    clf = LogisticRegression(max_iter=5000, random_state=seed).fit(x, y)
    return {"final": float((clf.predict(xt) == yt).mean()), "s": time.monotonic() - t}


def run_in_child(fn, args: tuple) -> dict:  # noqa: ANN001
    """Run one job in a fresh spawned process (one at a time; each loads its own model)."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, (args,))


# ---------------------------------------------------------------------------------------------- report
def summarise(res: dict, corpora: list[str], seeds: list[int], rounds: int, overrides: dict,
              baseline: dict | None = None) -> tuple[str, dict]:
    """Markdown table per corpus: mean ± sd over seeds and the ratio to the centralised level.

    `baseline`: another invocation's saved JSON (e.g. the old defaults); its federation rows are shown too.
    """
    lines = []
    summary: dict = {}
    for c in corpora:
        cells = {}
        for kind in ("fed", "central", "logreg", "site0", "site1", "site2"):
            vals = [res[c][str(s)][kind] for s in seeds if kind in res[c].get(str(s), {})]
            if vals:
                cells[kind] = vals
        if all(f"site{i}" in cells for i in range(len(SKEW))):
            n = min(len(cells[f"site{i}"]) for i in range(len(SKEW)))
            cells["site-best"] = [max(cells[f"site{i}"][j]["final"] for i in range(len(SKEW))) for j in range(n)]
            cells["site-mean"] = [statistics.mean(cells[f"site{i}"][j]["final"] for i in range(len(SKEW)))
                                  for j in range(n)]
        central = statistics.mean(r["final"] for r in cells["central"]) if "central" in cells else None

        def row(name: str, finals: list[float], peaks: list[float] | None = None, last3: list[float] | None = None,
                c: str = c, central: float | None = central) -> str:
            ratio = f"{statistics.mean(finals) / central:.3f}" if central else "—"
            return (f"| {c} | {name} | {len(finals)} | {mean_spread(finals)} | "
                    f"{mean_spread(peaks) if peaks else '—'} | {mean_spread(last3) if last3 else '—'} | {ratio} |")

        keys = ", ".join(f"{k}={v}" for k, v in (baseline or {}).get("overrides", {}).items())
        if baseline:
            old = [baseline["results"].get(c, {}).get(str(s), {}).get("fed") for s in seeds]
            if any(old):
                cells["fed-baseline"] = [r for r in old if r]
        names = {"fed-baseline": f"federation, {keys} ({rounds} versions)",
                 "fed": f"federation, {', '.join(f'{k}={v}' for k, v in overrides.items()) or 'defaults'} "
                        f"({rounds} versions)",
                 "central": "centralised LoRA (rank 8)", "logreg": "logreg, frozen embeddings"}
        for kind, name in names.items():
            if kind in cells:
                curves = "curve" in cells[kind][0]
                lines.append(row(name, [r["final"] for r in cells[kind]],
                                 [r["peak"] for r in cells[kind]] if curves else None,
                                 [statistics.mean(r["curve"][-3:]) for r in cells[kind]] if curves else None))
        for i, r in enumerate(RANKS):
            if f"site{i}" in cells:
                lines.append(row(f"site {i} alone (rank {r}, {round(SKEW[i] * 100)}/{round(100 - SKEW[i] * 100)})",
                                 [x["final"] for x in cells[f"site{i}"]]))
        if "site-best" in cells:
            lines.append(row("best site alone", cells["site-best"]))
        summary[c] = {k: v for k, v in cells.items()}
    head = ["| corpus | method | seeds | final accuracy | peak accuracy | mean of the last 3 evaluations | "
            "final / centralised |", "|---|---|---|---|---|---|---|"]
    return "\n".join(head + lines), summary


def plot(res: dict, corpora: list[str], seeds: list[int], path: Path, rounds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(corpora), figsize=(6 * len(corpora), 4), squeeze=False)
    for ax, c in zip(axes[0], corpora, strict=True):
        for ci, kind in enumerate(("fed", "central")):
            for j, s in enumerate(seeds):
                r = res[c].get(str(s), {}).get(kind)
                if r:
                    ax.plot(range(len(r["curve"])), r["curve"], color=f"C{ci}", alpha=0.8,
                            label=("federation (defaults)" if kind == "fed" else "centralised LoRA, per version-equivalent")
                            if j == 0 else None)
        lr = [res[c][str(s)]["logreg"]["final"] for s in seeds if "logreg" in res[c].get(str(s), {})]
        if lr:
            ax.axhline(statistics.mean(lr), color="C2", ls="--", label="logreg on frozen embeddings")
        ax.set_title(c)
        ax.set_xlabel("version")
        ax.set_ylabel("test accuracy")
        ax.set_xlim(0, rounds)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one seed, 6 versions")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--corpora", nargs="+", default=["wordnet", "debian"], choices=list(CORPORA))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="federation key overriding its default (diagnosis runs)")
    p.add_argument("--central-lr", type=float, default=1e-3, help="AdamW lr of the centralised and site-alone runs")
    p.add_argument("--only", nargs="+", default=["fed", "central", "logreg", "sites"],
                   choices=["fed", "central", "logreg", "sites"])
    p.add_argument("--reuse", action="store_true", help="keep results of an earlier invocation (same NAME)")
    p.add_argument("--name", default="unseen_defaults")
    p.add_argument("--baseline", help="NAME of an earlier invocation (e.g. old defaults) whose federation rows the "
                                      "table shows too")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.rounds = args.seeds[:1], 6
    overrides = dict(kv.split("=", 1) for kv in args.overrides)
    out = RESULTS / args.name
    saved = RESULTS / f"{args.name}.json"
    res: dict = json.loads(saved.read_text())["results"] if args.reuse and saved.exists() else {}
    from corolla.config import RunConfig

    defaults = RunConfig()
    steps_per_site = args.rounds * defaults.local_steps if "local-steps" not in overrides \
        else args.rounds * int(overrides["local-steps"])
    t0 = time.monotonic()

    def save() -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps({"rounds": args.rounds, "seeds": args.seeds, "overrides": overrides,
                                     "central_lr": args.central_lr, "results": res}, indent=1))

    for seed in args.seeds:
        for c in args.corpora:
            cell = res.setdefault(c, {}).setdefault(str(seed), {})
            files = write_corpus(c, seed, out / "data" / f"{c}-{seed}")
            jobs = []
            if "fed" in args.only:
                jobs.append(("fed", _fed_job, (files, seed, args.rounds, overrides, str(out / f"{c}-fed-{seed}"))))
            if "central" in args.only:
                jobs.append(("central", _adapter_job, (files, files["pooled"], max(RANKS), steps_per_site * len(SKEW),
                                                        steps_per_site * len(SKEW) // args.rounds, args.central_lr,
                                                        seed)))
            if "logreg" in args.only:
                jobs.append(("logreg", _logreg_job, (files, seed)))
            if "sites" in args.only:
                jobs += [(f"site{i}", _adapter_job, (files, files["sites"][i], r, steps_per_site, steps_per_site,
                                                     args.central_lr, seed)) for i, r in enumerate(RANKS)]
            for kind, fn, job in jobs:
                if args.reuse and kind in cell:
                    continue
                cell[kind] = run_in_child(fn, job)
                r = cell[kind]
                print(f"{c} seed {seed} {kind}: final {r['final']:.4f}"
                      + (f" peak {r['peak']:.4f}" if "peak" in r else "")
                      + (f" curve {' '.join(f'{x:.2f}' for x in r['curve'])}" if "curve" in r else "")
                      + f" ({r['s']:.0f}s, bench {time.monotonic() - t0:.0f}s)", flush=True)
                save()
    baseline = json.loads((RESULTS / f"{args.baseline}.json").read_text()) if args.baseline else None
    table, _ = summarise(res, args.corpora, args.seeds, args.rounds, overrides, baseline)
    plot(res, args.corpora, args.seeds, RESULTS / f"{args.name}.png", args.rounds)
    keys = ", ".join(f"`{k}={v}`" for k, v in overrides.items()) or "none (every key at its default)"
    md = [f"# Defaults on unseen two-class corpora: federation vs centralised vs logreg vs site alone ({args.name})",
          "", f"`python bench/unseen_defaults.py {' '.join(sys.argv[1:])}`", "",
          f"Three sites with label skew {'/'.join(f'{round(s * 100)}' for s in SKEW)} % of the first class at LoRA "
          f"ranks {', '.join(map(str, RANKS))} (`ranks=2,4,8`: aggregation auto → FedHL), {args.rounds} versions, "
          f"seeds {args.seeds}; federation keys set beyond the silos, labels, test file and ranks: {keys}. "
          f"Centralised: rank 8 on the pooled silos, {steps_per_site * len(SKEW)} AdamW steps at lr "
          f"{args.central_lr:g} (constant), batch {defaults.batch_size}; site alone: its own rank and silo, "
          f"{steps_per_site} steps, same recipe. Logreg: sklearn on frozen mean-pooled MiniLM embeddings of the pooled "
          "silos. Final / centralised: mean final accuracy over the mean centralised final accuracy.", "",
          table, "", f"![curves]({args.name}.png)", "",
          f"Whole benchmark: {(time.monotonic() - t0) / 60:.1f} min (one process at a time, one thread)."]
    (RESULTS / f"{args.name}.md").write_text("\n".join(md) + "\n")
    save()
    print(table)


if __name__ == "__main__":
    main()
