"""Push → training-start latency and base-model loads in a loopback deployment.

Runs two federations on 127.0.0.1, each a SuperLink + 3 SuperNodes over gRPC:
- corolla: each SuperNode forwards to its silo's long-lived trainer (`corolla client`);
- flower-default: plain SuperNodes whose ClientApp trains in its own process, the
  path Flower takes by default (a fresh process, torch import and model load per message).
Prints per-round median/max latency, model loads per node, and the ratio.

    .venv/bin/python bench/push_latency.py [--rounds 5] [--model minilm]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from corolla.data.silo import write_silos  # noqa: E402
from corolla.launch import processes as launch  # noqa: E402
from corolla.server.records import read_jsonl  # noqa: E402

COROLLA = [sys.executable, "-m", "corolla.cli"]


def run_federation(kind: str, work: Path, rounds: int, model: str, n: int = 3) -> list[dict]:
    out = work / kind
    fleet = f"127.0.0.1:{launch.free_port()}"
    cfg = {"model": model, "num-rounds": rounds, "clients-per-round": n, "min-nodes": n, "local-steps": 1,
           "batch-size": 8, "round-timeout": 300, "lora-rank": 8}
    sets = [x for k, v in cfg.items() for x in ("--set", f"{k}={v}")]
    silos = write_silos(work / "silos", n, alpha=0.5)
    with launch.running([]) as procs:
        server = launch.start([*COROLLA, "server", "--out", str(out), "--fleet-address", fleet, *sets],
                              launch.flower_env(work / f"{kind}-server"), log_path=work / f"{kind}-server.log")
        procs.append(server)
        host, port = fleet.split(":")
        launch.wait_for(lambda: launch.port_open(host, int(port)), 90, "SuperLink", proc=server)
        for i in range(n):
            home = work / f"{kind}-node{i}"
            if kind == "corolla":
                cmd = [*COROLLA, "client", "--superlink", fleet, "--data", str(silos[i]), "--rank", "8",
                       "--model", model, "--threads", "1", "--flwr-home", str(home)]
            else:
                cmd = [str(launch.BIN / "flower-supernode"), "--insecure", "--grpc-rere", "--superlink", fleet,
                       "--host", "127.0.0.1", "--port", str(launch.free_port()),
                       "--node-config", f"partition-id={i} num-partitions={n}"]
            procs.append(launch.start(cmd, launch.flower_env(home, {"OMP_NUM_THREADS": "1"}),
                                      log_path=work / f"{kind}-node{i}.log"))
        try:
            server.wait(timeout=1800)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"{kind}: the federation did not finish; see {work}") from None
    if server.returncode != 0:
        raise SystemExit(f"{kind}: server exited {server.returncode}; see {work / f'{kind}-server.log'}")
    return [u for u in read_jsonl(out / "updates.jsonl") if u["status"] == "accepted"]


def summarize(updates: list[dict]) -> dict:
    by_round: dict[int, list[float]] = defaultdict(list)
    pids: dict[int, set[int]] = defaultdict(set)
    for u in updates:
        by_round[u["base_version"] + 1].append(u["queue_s"])
        pids[u["node"]].add(u["trainer_pid"])
    q = [u["queue_s"] for u in updates]
    # loads per node = distinct training processes × loads each process made
    loads = {node: len(p) for node, p in pids.items()}
    return {"median_s": statistics.median(q), "max_s": max(q), "per_round": {r: (statistics.median(v), max(v))
            for r, v in sorted(by_round.items())}, "model_loads_per_node": sorted(loads.values()),
            "updates": len(updates)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--model", default="minilm")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="corolla-bench-") as tmp:
        for kind in ("corolla", "flower-default"):
            print(f"running {kind} ...", flush=True)
            results[kind] = summarize(run_federation(kind, Path(tmp), args.rounds, args.model))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "push_latency.json").write_text(json.dumps(results, indent=2))
    c, f = results["corolla"], results["flower-default"]
    lines = [f"# Push → training start, loopback deployment, 3 SuperNodes, {args.rounds} rounds, model {args.model}", "",
             "| path | median s | max s | model loads per node |", "|---|---|---|---|",
             f"| corolla (trainer process) | {c['median_s']:.2f} | {c['max_s']:.2f} | {c['model_loads_per_node']} |",
             f"| Flower default (ClientApp trains) | {f['median_s']:.2f} | {f['max_s']:.2f} | {f['model_loads_per_node']} |",
             "", f"Median ratio (default / corolla): {f['median_s'] / c['median_s']:.2f}×", "",
             "Per round (median, max) — corolla: " + ", ".join(f"r{r}: {m:.2f}/{x:.2f}" for r, (m, x) in c["per_round"].items()),
             "Per round (median, max) — default: " + ", ".join(f"r{r}: {m:.2f}/{x:.2f}" for r, (m, x) in f["per_round"].items())]
    (out / "push_latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
