"""A real networked federation on 127.0.0.1: SuperLink + 3 SuperNodes + 3 trainers, all separate processes.

Clients hold different silo files and LoRA ranks (2, 4, 8) and the server runs FedHL.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from corolla.data.silo import BBC_LABELS
from corolla.launch import processes as launch
from corolla.server.records import read_jsonl
from tests.conftest import COROLLA, processes, read_line

pytestmark = pytest.mark.slow  # starts real processes (SuperLink, SuperNodes, trainers, Ray)


def start_server(procs: list, tmp_path: Path, out: Path, fleet: str, sets: dict, *extra: str) -> subprocess.Popen:
    """`corolla server` in its own process group, waited on until its Fleet API listens."""
    cmd = [*COROLLA, "server", "--out", str(out), "--fleet-address", fleet, *extra]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    server = launch.start(cmd, launch.flower_env(tmp_path / "server-home"), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    procs.append(server)
    read_line(server, "corolla-server fleet API on", timeout=90)
    return server


def start_client(procs: list, tmp_path: Path, i: int, fleet: str, silo: Path | None, rank: int,
                 *extra: str) -> subprocess.Popen:
    """`corolla client` (trainer + SuperNode) number `i` on the tiny BERT, logging to client{i}.log."""
    data = ["--data", str(silo)] if silo else []
    cmd = [*COROLLA, "client", "--superlink", fleet, *data, "--rank", str(rank), "--model", "tiny-bert",
           "--max-length", "32", "--threads", "1", "--flwr-home", str(tmp_path / f"node{i}"), *extra]
    proc = launch.start(cmd, launch.flower_env(tmp_path / f"node{i}"), log_path=tmp_path / f"client{i}.log")
    procs.append(proc)
    return proc


def test_superlink_supernodes_and_trainers_over_grpc(tmp_path, tiny_silos):
    out = tmp_path / "run"
    fleet = f"127.0.0.1:{launch.free_port()}"
    ranks = (2, 4, 8)
    sets = {"model": "tiny-bert", "aggregation": "fedhl", "max-rank": 8, "num-rounds": 2,
            "clients-per-round": 3, "min-nodes": 3, "local-steps": 2, "max-length": 32, "round-timeout": 240}
    with processes() as procs:
        server = start_server(procs, tmp_path, out, fleet, sets)
        for i, (silo, rank) in enumerate(zip(tiny_silos, ranks, strict=True)):
            start_client(procs, tmp_path, i, fleet, silo, rank)
        stdout, _ = server.communicate(timeout=420)
        log = stdout.decode()
        assert server.returncode == 0, log[-3000:]
        clients_alive = [p.poll() is None for p in procs[1:]]
    assert all(clients_alive), "a client process died during the run"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["versions"] == 2 and summary["rejected_updates"] == 0
    nodes = read_jsonl(out / "nodes.jsonl")
    assert sorted(n["rank"] for n in nodes if n["status"] == "ok") == list(ranks)
    updates = [u for u in read_jsonl(out / "updates.jsonl") if u["status"] == "accepted"]
    assert len(updates) == 6
    assert Counter(u["rank"] for u in updates) == {2: 2, 4: 2, 8: 2}
    # each trainer loaded the base model exactly once in its lifetime, across both rounds
    assert all(u["model_loads"] == 1 for u in updates)
    assert all(u["queue_s"] is not None and 0 < u["queue_s"] < 60 for u in updates)
    assert sum(abs(u["weight"]) for u in updates) > 0


def test_async_federation_survives_a_killed_supernode(tmp_path, tiny_silos):
    """Three SuperNodes of different speeds; one client (trainer + SuperNode) is killed mid-run."""
    out = tmp_path / "run"
    fleet = f"127.0.0.1:{launch.free_port()}"
    sets = {"model": "tiny-bert", "mode": "async", "async-rule": "fedbuff", "buffer-size": 1, "concurrency": 3,
            "num-rounds": 8, "min-nodes": 3, "local-steps": 2, "max-length": 32, "round-timeout": 90}
    with processes() as procs:
        server = start_server(procs, tmp_path, out, fleet, sets)
        clients = [start_client(procs, tmp_path, i, fleet, silo, 8, "--slowdown", str(slowdown))
                   for i, (silo, slowdown) in enumerate(zip(tiny_silos, (1, 3, 6), strict=True))]
        # kill the fastest client once the federation has produced its first versions
        launch.wait_for(lambda: len(read_jsonl(out / "metrics.jsonl")) >= 3, 240, "first async versions",
                        proc=server)
        launch.stop(clients[0])
        killed_at = len(read_jsonl(out / "metrics.jsonl")) - 1
        stdout, _ = server.communicate(timeout=420)
        assert server.returncode == 0, stdout.decode()[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["versions"] == 8 and summary["mode"] == "async"
    accepted = [u for u in read_jsonl(out / "updates.jsonl") if u["status"] == "accepted"]
    assert len(accepted) == 8
    assert killed_at < 8  # versions after the kill came from the surviving, slower nodes
    survivors = {u["node"] for u in accepted if u["applied_version"] > killed_at + 1}
    assert survivors and len(survivors) <= 2


def test_tls_federation(tmp_path, tiny_silos):
    """SuperLink with a certificate from deploy/certs.sh; SuperNodes verify it; one round on the silos' own classes."""
    certs = tmp_path / "certs"
    certs_sh = Path(__file__).resolve().parent.parent / "deploy" / "certs.sh"
    subprocess.run(["bash", str(certs_sh), str(certs), "127.0.0.1"], check=True, capture_output=True, timeout=120)
    out = tmp_path / "run"
    fleet = f"127.0.0.1:{launch.free_port()}"
    # the silos carry the institution's own class names, and the server evaluates on its own test file
    own = dict(zip(BBC_LABELS, ("money", "showbiz", "government", "games", "computing"), strict=True))
    silos = []
    for i, silo in enumerate(tiny_silos):
        df = pd.read_csv(silo).assign(label=lambda d: d["label"].map(own))
        silos.append(tmp_path / f"own{i}.csv")
        df.rename(columns={"text": "note"}).to_csv(silos[-1], index=False)
    labels = ",".join(own.values())
    sets = {"model": "tiny-bert", "num-rounds": 1, "clients-per-round": 2, "min-nodes": 2, "local-steps": 1,
            "max-length": 32, "labels": labels, "test-data": silos[2], "text-column": "note"}
    with processes() as procs:
        server = start_server(procs, tmp_path, out, fleet, sets, "--ssl-ca", str(certs / "ca.crt"),
                              "--ssl-cert", str(certs / "server.crt"), "--ssl-key", str(certs / "server.key"))
        for i, silo in enumerate(silos[:2]):
            start_client(procs, tmp_path, i, fleet, silo, 8, "--root-certificates", str(certs / "ca.crt"),
                         "--labels", labels, "--text-column", "note")
        stdout, _ = server.communicate(timeout=300)
        assert server.returncode == 0, stdout.decode()[-3000:]
    assert json.loads((out / "summary.json").read_text())["versions"] == 1


def test_deployment_and_simulation_train_the_same_model_under_the_servers_lora_spec(tmp_path):
    """The server owns alpha and rsLoRA: 3 real trainers over gRPC and a Ray simulation of the same 3 silos, same seed,
    give the same global model (float tolerance), with rslora=true and a non-default alpha that no trainer is told."""
    import numpy as np

    common = {"model": "tiny-bert", "aggregation": "fedavg", "lora-rank": 4, "rslora": "true", "lora-alpha": 5.0,
              "num-rounds": 2,
              "clients-per-round": 3, "min-nodes": 3, "local-steps": 2, "max-length": 32, "lr": 0.02, "seed": 7}
    sim_out, dep_out = tmp_path / "sim", tmp_path / "dep"
    sim = [*COROLLA, "sim", "--out", str(sim_out), "--nodes", "3", "--set", "dirichlet-alpha=0.5"]
    for k, v in common.items():
        sim += ["--set", f"{k}={v}"]
    fleet = f"127.0.0.1:{launch.free_port()}"
    with processes() as procs:
        p = launch.start(sim, launch.flower_env(tmp_path / "sim-home"), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
        procs.append(p)
        stdout, _ = p.communicate(timeout=400)
        assert p.returncode == 0, stdout.decode()[-3000:]
        server = start_server(procs, tmp_path, dep_out, fleet, {**common, "round-timeout": 240})
        for i in range(3):
            start_client(procs, tmp_path, i, fleet, None, 4, "--partition-id", str(i), "--num-partitions", "3",
                         "--dirichlet-alpha", "0.5", "--seed", "7")
        stdout, _ = server.communicate(timeout=420)
        assert server.returncode == 0, stdout.decode()[-3000:]
    sim_g, dep_g = np.load(sim_out / "global.npz"), np.load(dep_out / "global.npz")
    assert sorted(sim_g.files) == sorted(dep_g.files) and any(k.startswith("delta/") for k in sim_g.files)
    for k in sim_g.files:
        assert np.linalg.norm(sim_g[k]) > 0
        np.testing.assert_allclose(dep_g[k], sim_g[k], rtol=1e-4, atol=1e-6, err_msg=k)
    sim_acc = [m["accuracy"] for m in read_jsonl(sim_out / "metrics.jsonl")]
    assert [m["accuracy"] for m in read_jsonl(dep_out / "metrics.jsonl")] == pytest.approx(sim_acc, abs=1e-6)
