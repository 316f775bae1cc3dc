"""FedHL aggregation + redistribution speed and memory on a synthetic large-model adapter layout.

100 client updates with ranks drawn from 4–64 against a dense full-rank global
update per LoRA layer (7B-class: 32 layers × {q, v}, 4096 × 4096). Each route runs
in its own subprocess so its peak RSS is its own:

- fedhl: corolla's FedHL — randomized top-r_max SVD once per version, every
  client's start point rebuilt from it, returned factors applied as stacked GEMMs;
- dense: the reference route of FlexLoRA's code — ΔW accumulated client by
  client as dense products, then an exact full SVD per layer, truncated per client;
- floor: reading the updates once (the memory-bandwidth floor).

The dense route's exact SVD takes tens of seconds per 4096² layer on 2 cores, so it
runs on `--dense-layers` layers and is reported per layer and extrapolated; FedHL
is measured on the same layers (per-layer ratio) and on the whole layout.

    .venv/bin/python bench/aggregation_speed.py            # 7B and 1B layouts
    .venv/bin/python bench/aggregation_speed.py --quick    # small layout, seconds
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from corolla.strategies import (  # noqa: E402
    ClientUpdate,
    Dispatch,
    FedHL,
    LoraSpec,
    lora_ops,  # noqa: E402
)

LAYOUTS = {
    "7b": {"layers": 64, "d": 4096},  # 32 transformer layers × {q, v}
    "1b": {"layers": 32, "d": 2048},  # 16 transformer layers × {q, v}
    "quick": {"layers": 4, "d": 512},
}
MAX_RANK = 64
W_RANK = 256  # the global update's rank in the synthetic state (a few hundred client updates deep)


def layer_names(n: int) -> list[str]:
    return [f"base_model.model.layers.{i // 2}.attn.{'qv'[i % 2]}_proj" for i in range(n)]


class LazyFactors(Mapping):
    """A client's returned adapter, generated on access (seeded), so 100 updates never sit in RAM at once."""

    def __init__(self, client: int, rank: int, names: list[str], d: int, keep: bool = False) -> None:
        self.client, self.rank, self.d, self.keep = client, rank, d, keep
        self.keys_ = [k for n in names for k in (lora_ops.a_key(n), lora_ops.b_key(n))]
        self.index = {k: i for i, k in enumerate(self.keys_)}
        self.kept: dict[str, np.ndarray] = {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key in self.kept:
            return self.kept[key]
        g = torch.Generator().manual_seed(self.client * 100_003 + self.index[key])
        shape = (self.rank, self.d) if key.endswith(lora_ops.A_SUFFIX) else (self.d, self.rank)
        x = (torch.randn(shape, generator=g) * (self.d**-0.5)).numpy()
        if self.keep:  # a decoded reply: in the server's memory until aggregated (and, deferred, until folded)
            self.kept[key] = x
        return x

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def ranks(n: int, seed: int = 0) -> list[int]:
    return [int(r) for r in np.random.default_rng(seed).integers(4, 65, size=n)]


def global_state(names: list[str], d: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {n: (torch.randn(d, W_RANK, generator=g) @ torch.randn(W_RANK, d, generator=g)) / d for n in names}


def peak_rss_gb() -> float:
    """Peak RSS since the last `reset_peak()` (VmHWM), in GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def reset_peak() -> None:
    """Return freed heap to the OS and restart the peak-RSS counter, so set-up transients are not counted."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1024**3


def route_fedhl(layers: int, d: int, clients: int, fold: str = "inline", svd_start: str = "random") -> dict:
    """One FedHL round: aggregate 100 replies, then redistribute the new version (every client's factors).

    The replies' factors are generated before the clock starts and kept, as decoded replies
    sit in a server's memory; their bytes are reported (`updates_gb`) and left out of the
    memory ratio. `inline` is the route before the background fold (fold, then the dense randomized SVD);
    `background` takes the SVD matrix-free and folds in a thread: `latency_s` is the time
    from the last reply to the new version's last dispatch, `fold_s` the background fold
    after it (while clients would train). `svd_start` warm starts the new version's SVD from
    the previous version's subspace (2 products with W instead of 6); `top_energy` is the
    energy the new version's rank-64 SVD captures, Σ σ_j² over every layer, to compare the
    starts' subspaces on the same W_{t+1} (higher is closer to the exact top-64).
    """
    import_rss = current_rss_gb()  # interpreter + torch, before any state
    names = layer_names(layers)
    init = {}
    for n in names:
        init[lora_ops.a_key(n)] = np.zeros((MAX_RANK, d), np.float32)
        init[lora_ops.b_key(n)] = np.zeros((d, MAX_RANK), np.float32)
    agg = FedHL(init, LoraSpec(alpha=16), max_rank=MAX_RANK, svd="randomized", fold=fold, svd_start=svd_start)
    del init
    agg._w = global_state(names, d)
    rs = ranks(clients)
    t0 = time.perf_counter()
    sent = []
    for r in rs:
        disp = agg.dispatch(r)
        # the wire carries disp.arrays; the server keeps only (rank, version, error): the start is rebuilt from the SVD
        sent.append(Dispatch(rank=r, version=disp.version, arrays={}, truncation_error=disp.truncation_error,
                             relative_error=disp.relative_error))
        del disp
    t_dispatch = time.perf_counter() - t0
    updates = [ClientUpdate(node_id=i, arrays=LazyFactors(i, r, names, d, keep=True), sent=s, num_examples=100)
               for i, (r, s) in enumerate(zip(rs, sent))]
    t0 = time.perf_counter()
    for u in updates:  # the replies arrive (decoded): generated once, kept
        for k in u.arrays:
            u.arrays[k]
    t_generate = time.perf_counter() - t0
    updates_gb = sum(a.nbytes for u in updates for a in u.arrays.kept.values()) / 1024**3
    reset_peak()
    base_rss = current_rss_gb()
    t0 = time.perf_counter()
    agg.apply(updates, agg.weights(updates))
    t_aggregate = time.perf_counter() - t0
    for r in rs:  # redistribution of the new version: one SVD, then every client's factors at its rank
        agg.dispatch(r)
    t_latency = time.perf_counter() - t0
    t1 = time.perf_counter()
    agg.settle()  # deferred: the fold, done while clients train
    t_fold = time.perf_counter() - t1
    svds = agg._svds_by_version[agg.version]
    top_energy = sum(float((svd.s.double() ** 2).sum()) for svd in svds.values())
    total_energy = sum(svd.frob2 for svd in svds.values())
    return {"fold": fold, "svd_start": svd_start, "top_energy": top_energy, "total_energy": total_energy,
            "dispatch_s": t_dispatch, "aggregate_s": t_aggregate, "latency_s": t_latency,
            "redistribute_s": t_latency - t_aggregate, "fold_s": t_fold, "generate_s": t_generate,
            "peak_rss_gb": peak_rss_gb(), "state_rss_gb": base_rss, "import_rss_gb": import_rss,
            "updates_gb": updates_gb, "dense_state_gb": layers * d * d * 4 / 1024**3,
            "rank_sum": sum(rs)}


def gemm_rate() -> float:
    """This machine's float32 GEMM rate (GFLOP/s), 4096² × 4096², best of 3."""
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(3))
    return 2 * 4096**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def route_dense(layers: int, d: int, clients: int) -> dict:
    """FlexLoRA's reference route: dense ΔW client by client, exact full SVD, truncate per client."""
    names = layer_names(layers)
    rs = ranks(clients)
    p = np.full(clients, 1.0 / clients)
    t_agg = t_svd = t_gen = 0.0
    for n in names:
        t0 = time.perf_counter()
        facs = [LazyFactors(i, r, [n], d) for i, r in enumerate(rs)]
        pairs = [(torch.from_numpy(f[lora_ops.b_key(n)]), torch.from_numpy(f[lora_ops.a_key(n)])) for f in facs]
        t_gen += time.perf_counter() - t0
        t0 = time.perf_counter()
        dw = torch.zeros(d, d)
        for (b, a), pi, r in zip(pairs, p, rs):
            dw.addmm_(b, a, alpha=float(pi) * 16 / r)
        t_agg += time.perf_counter() - t0
        t0 = time.perf_counter()
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        for r in rs:  # each client's factors at its rank
            _ = (u[:, :r] * s[:r]).contiguous(), vh[:r].contiguous()
        t_svd += time.perf_counter() - t0
    return {"aggregate_s": t_agg, "svd_redistribute_s": t_svd, "generate_s": t_gen, "peak_rss_gb": peak_rss_gb()}


def route_floor(layers: int, d: int, clients: int) -> dict:
    """Read every update array once (one layer's updates materialised at a time)."""
    names = layer_names(layers)
    rs = ranks(clients)
    t_read = 0.0
    total = 0
    for n in names:
        arrays = [LazyFactors(i, r, [n], d)[k] for i, r in enumerate(rs) for k in (lora_ops.a_key(n), lora_ops.b_key(n))]
        t0 = time.perf_counter()
        for a in arrays:
            total += int(a.nbytes)
            float(a.sum())
        t_read += time.perf_counter() - t0
    return {"read_s": t_read, "update_gb": total / 1024**3}


def run_child(route: str, layers: int, d: int, clients: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", route, str(layers), str(d), str(clients)],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{route} child failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_layout(name: str, layers: int, d: int, clients: int, dense_layers: int) -> dict:
    print(f"[{name}] {layers} layers × {d}², {clients} clients, ranks 4–64", flush=True)
    fedhl_full = run_child("fedhl", layers, d, clients)
    print(f"[{name}] fedhl full layout (inline fold): {fedhl_full}", flush=True)
    deferred = run_child("fedhl-background", layers, d, clients)
    print(f"[{name}] fedhl full layout (background fold): {deferred}", flush=True)
    warm = run_child("fedhl-warm", layers, d, clients)
    print(f"[{name}] fedhl full layout (background fold, warm-started SVD): {warm}", flush=True)
    rate = gemm_rate()
    fold_floor = 2 * d * d * (deferred["rank_sum"] + MAX_RANK) * layers / (rate * 1e9)
    fedhl_sub = run_child("fedhl", dense_layers, d, clients)
    dense_sub = run_child("dense", dense_layers, d, clients)
    floor = run_child("floor", layers, d, clients)
    print(f"[{name}] on {dense_layers} layers: fedhl {fedhl_sub} dense {dense_sub}", flush=True)
    # one round = aggregate the replies + redistribute the new version (its SVD and every client's slice);
    # `dispatch_s` is the previous round's redistribution plus 100 slicings, reported apart
    f_sub = fedhl_sub["aggregate_s"] + fedhl_sub["redistribute_s"]
    d_sub = dense_sub["aggregate_s"] + dense_sub["svd_redistribute_s"]
    f_full = fedhl_full["aggregate_s"] + fedhl_full["redistribute_s"]
    return {"layout": name, "layers": layers, "d": d, "clients": clients, "dense_layers_measured": dense_layers,
            "fedhl_full_s": f_full, "fedhl_full": fedhl_full, "fedhl_sub_s": f_sub, "dense_sub_s": d_sub,
            "dense_full_s_extrapolated": d_sub * layers / dense_layers, "speedup": d_sub / f_sub,
            "fedhl_peak_rss_gb": fedhl_full["peak_rss_gb"], "dense_state_gb": fedhl_full["dense_state_gb"],
            # the target compares FedHL's own memory with the dense state: the interpreter and torch are not counted
            "rss_ratio": _ratio(fedhl_full), "floor": floor,
            "background": deferred, "background_rss_ratio": _ratio(deferred), "gemm_gflops": rate,
            "warm": warm, "warm_rss_ratio": _ratio(warm),
            "fold_floor_s": fold_floor}


def _ratio(run: dict) -> float:
    """(peak RSS − interpreter and torch − the replies' own bytes) / dense state: the aggregator's memory."""
    return (run["peak_rss_gb"] - run["import_rss_gb"] - run["updates_gb"]) / run["dense_state_gb"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", nargs=4)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--dense-layers", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    if args.child:
        route, layers, d, clients = args.child[0], *map(int, args.child[1:])
        fn = {"fedhl": route_fedhl, "fedhl-background": lambda *a: route_fedhl(*a, fold="background"),
              "fedhl-warm": lambda *a: route_fedhl(*a, fold="background", svd_start="warm"),
              "dense": route_dense, "floor": route_floor}[route]
        print(json.dumps(fn(layers, d, clients)))
        return
    names = ["quick"] if args.quick else ["1b", "7b"]
    rows = [bench_layout(n, LAYOUTS[n]["layers"], LAYOUTS[n]["d"], args.clients, args.dense_layers) for n in names]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "aggregation_speed.json").write_text(json.dumps(rows, indent=2))
    lines = ["| layout | FedHL aggregate + redistribute s | dense route s (extrap.) | speedup (same layers) | "
             "FedHL peak RSS GB | dense state GB | (RSS − runtime − replies) / state | read floor s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layout']} ({r['layers']}×{r['d']}²) | {r['fedhl_full_s']:.1f} | "
                     f"{r['dense_full_s_extrapolated']:.1f} | {r['speedup']:.1f}× | {r['fedhl_peak_rss_gb']:.2f} | "
                     f"{r['dense_state_gb']:.2f} | {r['rss_ratio']:.2f} | {r['floor']['read_s']:.2f} |")
    lines += ["", "Last reply → the new version's last dispatch, same run: `inline` folds every reply into the "
              "dense W first (the route before the background fold); `background` takes the next SVD "
              "matrix-free from W_t and the returned factors and folds in a thread afterwards, while clients train.", "",
              "| layout | Σ ranks | GEMM GFLOP/s | fold floor s | inline: latency s | background: latency s | "
              "background: fold after s | speed-up | inline mem ratio | background mem ratio | replies GB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, i = r["background"], r["fedhl_full"]
        lines.append(f"| {r['layout']} | {b['rank_sum']} | {r['gemm_gflops']:.0f} | {r['fold_floor_s']:.1f} | "
                     f"{i['latency_s']:.1f} | {b['latency_s']:.1f} | {b['fold_s']:.1f} | "
                     f"{i['latency_s'] / b['latency_s']:.1f}× | {r['rss_ratio']:.2f} | {r['background_rss_ratio']:.2f} | "
                     f"{b['updates_gb']:.2f} |")
    lines += ["", "The same, with the new version's SVD warm-started from the previous version's subspace "
              "(`fedhl-svd-start=warm`: 2 products with W_{t+1} instead of 6). Captured energy: Σσ² of the rank-64 "
              "SVD over every layer, as a fraction of the random start's on the same W_{t+1} (1.0: as good).", "",
              "| layout | background, random start: latency s | warm start: latency s | target ≤ 10 s | "
              "warm: fold after s | warm / random captured energy | top-64 energy / ‖W‖² (random, warm) | "
              "warm mem ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, w = r["background"], r["warm"]
        lines.append(f"| {r['layout']} | {b['latency_s']:.1f} | {w['latency_s']:.1f} | "
                     f"{'met' if w['latency_s'] <= 10 else 'MISSED'} | {w['fold_s']:.1f} | "
                     f"{w['top_energy'] / b['top_energy']:.5f} | {b['top_energy'] / b['total_energy']:.4f}, "
                     f"{w['top_energy'] / w['total_energy']:.4f} | {r['warm_rss_ratio']:.2f} |")
    (out / "aggregation_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
