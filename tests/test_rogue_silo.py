"""A rogue silo beside honest ones, all real processes on 127.0.0.1: every lie is rejected or bounded, with its reason.

A SuperLink, `corolla server` (FedAvg, tiny BERT, rank 4, every node in every round), two honest
`corolla client`s and tests/rogue_trainer.py behind a real SuperNode, each on one of three built-in
partitions. The rogue answers Describe honestly and trains honestly, then corrupts each train reply
with the next lie of `LIES` (10⁴× arrays, 10¹² examples, a negative loss, NaN, a wrong shape, an
extra tensor, a lied rank, an old base version). Each lands in updates.jsonl rejected with its
reason, or accepted and bounded (`clipped`, `examples_capped`). The honest run of the same
configuration on the same partitions runs in-process first (bench/inprocess.py: the same server
stack and trainer code; a deployment equals it to float tolerance, tests/test_deployment.py), and
the rogue run's final test loss must stay within `LOSS_BOUND` of it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from corolla.launch import processes as launch
from corolla.server.records import read_jsonl
from tests.conftest import COROLLA, processes, read_line
from tests.linkhelpers import start_supernode
from tests.rogue_trainer import CLAIMED_EXAMPLES, EXTRA_TENSOR, LIES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

RANK = 4
#: one round per lie: every node trains in every round, so the rogue tells each lie once
SETS = {"model": "tiny-bert", "aggregation": "fedavg", "lora-rank": RANK, "num-rounds": len(LIES), "clients-per-round": 3,
        "min-nodes": 3, "local-steps": 2, "max-length": 32, "round-timeout": 120, "eval-examples": 200, "seed": 5}
#: how the nodes' data is made: built-in partition i of 3 (Dirichlet α = 0.5, the run's seed), as the honest run's
PARTITIONS = {"num-partitions": 3, "dirichlet-alpha": 0.5}
#: the rogue run's final test loss stays within this of the honest run's (cross-entropy, nats; both ≈ ln 5 = 1.61 on
#: the tiny BERT). Measured unguarded (max-update-norm=-1, max-weight-share=1): the first lie (10⁴× arrays) sends it
#: from 1.61 to 377 and it ends at 376; the issue measured 0.77 → 1077 on MiniLM
LOSS_BOUND = 0.05
#: (status, what its reason or record must show) for each lie, in `LIES` order
EXPECTED = {
    "scale": ("rejected", "more than 2 AdamW steps at lr"),
    "examples": ("accepted", "examples_capped"),
    "loss": ("rejected", "absurd telemetry (`loss-mean` = -1.0 is not a finite number >= 0)"),
    "nan": ("rejected", "holds NaN or infinite values; the update is rejected."),
    "shape": ("rejected", f"has shape ({RANK - 1}, "),
    "extra": ("rejected", f"unexpected ['{EXTRA_TENSOR}']"),
    "rank": ("rejected", f"reply has rank {RANK + 1}, it was sent rank {RANK}"),
    "version": ("rejected", "reply is for version "),
}


def start_server(procs: list, home: Path, out: Path, fleet: str, sets: dict | None = None) -> subprocess.Popen:
    """`corolla server` in its own process group, waited on until its Fleet API listens."""
    cmd = [*COROLLA, "server", "--out", str(out), "--fleet-address", fleet]
    for k, v in (sets or SETS).items():
        cmd += ["--set", f"{k}={v}"]
    server = launch.start(cmd, launch.flower_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    procs.append(server)
    read_line(server, "corolla-server fleet API on", timeout=120)
    return server


def trainer_args(partition: int, partitions: int = PARTITIONS["num-partitions"]) -> list[str]:
    """The trainer options of the node holding built-in `partition` of `partitions`."""
    return ["--partition-id", str(partition), "--num-partitions", str(partitions),
            "--dirichlet-alpha", str(PARTITIONS["dirichlet-alpha"]), "--seed", str(SETS["seed"]), "--rank", str(RANK),
            "--model", "tiny-bert", "--max-length", "32", "--threads", "1"]


def start_client(procs: list, home: Path, fleet: str, partition: int) -> None:
    """`corolla client` (trainer + SuperNode) on the tiny BERT, logging to client.log in its home."""
    home.mkdir(parents=True, exist_ok=True)
    cmd = [*COROLLA, "client", "--superlink", fleet, *trainer_args(partition), "--flwr-home", str(home)]
    procs.append(launch.start(cmd, launch.flower_env(home), log_path=home / "client.log"))


def start_rogue(procs: list, home: Path, fleet: str, partition: int, lies: tuple[str, ...] = ()) -> subprocess.Popen:
    """The rogue trainer (tests/rogue_trainer.py; `lies`, default all) and a real SuperNode whose node config points at it."""
    home.mkdir(parents=True, exist_ok=True)
    told = ["--lies", ",".join(lies)] if lies else []
    trainer = launch.start([sys.executable, "-m", "tests.rogue_trainer", *trainer_args(partition), *told],
                           launch.flower_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    procs.append(trainer)
    address = read_line(trainer, "corolla-trainer listening on", timeout=120).rsplit(" ", 1)[1]
    start_supernode(procs, home, fleet, address)
    return trainer


def test_rogue_silo_is_rejected_or_bounded_and_the_model_stays_near_the_honest_run(tmp_path):
    from bench.harness import run_inprocess

    honest_dir, out = tmp_path / "honest", tmp_path / "rogue"
    run_inprocess({**SETS, "dirichlet-alpha": PARTITIONS["dirichlet-alpha"], "lora-rank": RANK},
                  nodes=PARTITIONS["num-partitions"], out_dir=honest_dir)
    fleet = f"127.0.0.1:{launch.free_port()}"
    with processes() as procs:
        server = start_server(procs, tmp_path / "server", out, fleet)
        for i in range(2):
            start_client(procs, tmp_path / f"node{i}", fleet, i)
        rogue = start_rogue(procs, tmp_path / "node2", fleet, 2)
        stdout, _ = server.communicate(timeout=360)
        assert server.returncode == 0, stdout.decode()[-3000:]
        alive = [p.poll() is None for p in procs[1:]]
    assert all(alive), "a client, trainer or SuperNode died during the run"

    losses = {name: read_jsonl(d / "metrics.jsonl")[-1]["loss"] for name, d in (("honest", honest_dir), ("rogue", out))}
    print(f"final test loss: honest {losses['honest']:.4f}, rogue {losses['rogue']:.4f}")
    assert all(r["status"] == "accepted" for r in read_jsonl(honest_dir / "updates.jsonl"))
    assert json.loads((out / "summary.json").read_text())["versions"] == len(LIES)
    rows = read_jsonl(out / "updates.jsonl")
    [rogue_id] = {r["node"] for r in rows if r.get("trainer_pid") == rogue.pid}
    nodes = {r["node"]: r for r in read_jsonl(out / "nodes.jsonl")}
    declared = nodes[rogue_id]["num_examples"]  # its partition's size, as the honest run's third node declared
    honest_declared = sorted(r["num_examples"] for r in read_jsonl(honest_dir / "nodes.jsonl"))
    assert nodes[rogue_id]["status"] == "ok" and sorted(r["num_examples"] for r in nodes.values()) == honest_declared

    lies = [r for r in rows if r["node"] == rogue_id]
    assert len(lies) == len(LIES)
    for lie, row in zip(LIES, lies, strict=True):
        status, shows = EXPECTED[lie]
        assert row["status"] == status, (lie, row)
        if status == "rejected":
            assert shows in row["reason"] and row["reason"].startswith(f"node {rogue_id}"), (lie, row["reason"])
        else:  # the count it claimed is recorded; its weight comes from what it declared when it joined
            assert row["examples_capped"] == CLAIMED_EXAMPLES and row["num_examples"] == declared, row
            assert row["weight"] < 2 / 3 + 1e-9
    honest_others = [r for r in rows if r["node"] != rogue_id]
    assert all(r["status"] == "accepted" and r["clipped"] is None for r in honest_others)

    assert abs(losses["rogue"] - losses["honest"]) <= LOSS_BOUND


#: the two-site federation: one honest site, one rogue that scales its factors 10⁴× and claims 10¹² examples at once,
#: then claims 10¹² examples alone, alternating (the issue's attack, then the one the optimizer bound cannot see)
TWO_SITES = {**SETS, "num-rounds": 4, "clients-per-round": 2, "min-nodes": 2}
TWO_SITE_LIES = ("scale+examples", "examples")
#: the rogue run's final test loss may be at most this multiple of the honest two-site run's
TWO_SITE_LOSS_RATIO = 1.5


def test_two_sites_one_rogue_never_outweighs_the_honest_site_and_the_model_stays_near_the_honest_run(tmp_path):
    from bench.harness import run_inprocess

    honest_dir, out = tmp_path / "honest", tmp_path / "rogue"
    run_inprocess({**TWO_SITES, "dirichlet-alpha": PARTITIONS["dirichlet-alpha"]}, nodes=2, out_dir=honest_dir)
    fleet = f"127.0.0.1:{launch.free_port()}"
    with processes() as procs:
        server = start_server(procs, tmp_path / "server", out, fleet, TWO_SITES)
        home = tmp_path / "node0"
        home.mkdir()
        procs.append(launch.start([*COROLLA, "client", "--superlink", fleet, *trainer_args(0, 2), "--flwr-home", str(home)],
                                  launch.flower_env(home), log_path=home / "client.log"))
        rogue = launch.start([sys.executable, "-m", "tests.rogue_trainer", *trainer_args(1, 2), "--lies",
                              ",".join(TWO_SITE_LIES)], launch.flower_env(tmp_path), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
        procs.append(rogue)
        address = read_line(rogue, "corolla-trainer listening on", timeout=120).rsplit(" ", 1)[1]
        start_supernode(procs, tmp_path / "node1", fleet, address)
        stdout, _ = server.communicate(timeout=360)
        assert server.returncode == 0, stdout.decode()[-3000:]

    rows = read_jsonl(out / "updates.jsonl")
    [rogue_id] = {r["node"] for r in rows if r.get("trainer_pid") == rogue.pid}
    lies = [r for r in rows if r["node"] == rogue_id]
    assert [r["status"] for r in lies] == ["rejected", "accepted"] * 2
    assert all("AdamW steps at lr" in r["reason"] for r in lies if r["status"] == "rejected")
    for r in lies:
        if r["status"] == "accepted":  # its 10¹² declared examples bought it half of the step, no more
            assert r["weight"] <= 0.5 + 1e-9 and r["examples_capped"] == CLAIMED_EXAMPLES
    assert all(r["status"] == "accepted" for r in rows if r["node"] != rogue_id)
    losses = {name: read_jsonl(d / "metrics.jsonl")[-1]["loss"] for name, d in (("honest", honest_dir), ("rogue", out))}
    print(f"two sites, final test loss: honest {losses['honest']:.4f}, with a rogue {losses['rogue']:.4f}")
    assert losses["rogue"] <= TWO_SITE_LOSS_RATIO * losses["honest"]
