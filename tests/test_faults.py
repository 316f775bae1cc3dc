"""Faults with real processes: a site's trainer killed while its SuperNode lives; a site's network cut and restored.

A SuperLink (`corolla server`, synchronous rounds, tiny BERT), sites as `corolla client`, and
one site split the way a deployment may run it: `corolla trainer` on a fixed port and a
SuperNode beside it whose ClientApp forwards every job there. For the network cut, that split
site runs in a network namespace of its own, joined to the host by a veth pair the test
creates (and removes); the SuperLink listens on the host end. Every process is in its own
group and reaped by group; every wait polls the run directory with a deadline.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from corolla.launch import processes as launch
from corolla.server.records import read_jsonl
from tests.conftest import processes
from tests.linkhelpers import TINY, start_client, start_server, start_supernode, start_trainer, text

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

#: the split site holds built-in partition 1 of 2; `corolla client` holds partition 0
SPLIT_SITE = ("--partition-id", "1", "--num-partitions", "2")
#: rounds go on until the test has seen what it waits for (then every process is stopped); only version 0 is
#: evaluated, on a few examples, so that a round costs what its jobs cost
ENDLESS = {**TINY, "num-rounds": 200, "eval-every": 1000, "eval-examples": 32}


def rows_when(path: Path, found: Callable[[list[dict]], bool], timeout: float, what: str,
              proc: subprocess.Popen) -> list[dict]:
    """The rows of a JSON-lines record once `found(rows)` holds (bounded; fails early if `proc` exits)."""
    launch.wait_for(lambda: found(read_jsonl(path)), timeout, what, interval=0.5, proc=proc)
    return read_jsonl(path)


def accepted_from(pid: int) -> Callable[[list[dict]], bool]:
    """Whether updates.jsonl rows hold an accepted update trained by the trainer process `pid`."""
    return lambda rows: any(r["status"] == "accepted" and r.get("trainer_pid") == pid for r in rows)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process and its group, as the kernel's OOM killer or a crash would end it (no clean-up)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def test_a_killed_trainer_fails_its_job_and_its_node_gets_work_only_once_the_trainer_is_back(tmp_path):
    out = tmp_path / "run"
    updates, nodes, selections = out / "updates.jsonl", out / "nodes.jsonl", out / "selection.jsonl"
    fleet = f"127.0.0.1:{launch.free_port()}"
    values = {**ENDLESS, "clients-per-round": 2, "min-nodes": 2, "round-timeout": 60}
    port = launch.free_port()
    site = tmp_path / "site1"
    with processes() as procs:
        start_client(procs, tmp_path, "site0", fleet, 0, 2)  # loads its model while the server starts
        server, _ = start_server(procs, tmp_path / "server", out, fleet, values)
        trainer = start_trainer(procs, site, port, *SPLIT_SITE)
        start_supernode(procs, site, fleet, f"127.0.0.1:{port}")

        rows = rows_when(updates, accepted_from(trainer.pid), 120, "an update from the split site", server)
        [node] = {r["node"] for r in rows if r.get("trainer_pid") == trainer.pid}

        kill_group(trainer)
        probes_before = text(site / "supernode.log").count("Receiving: query message")
        rows = rows_when(updates, lambda rs: any(r["node"] == node and r["status"] == "failed" for r in rs), 60,
                         "the killed trainer's failed job", server)
        [failed] = [r for r in rows if r["node"] == node and r["status"] == "failed"]
        # while its trainer is down it is asked for its profile (its SuperNode receives the query) before the restart
        launch.wait_for(lambda: text(site / "supernode.log").count("Receiving: query message") > probes_before, 60,
                        "a profile query to the node whose trainer is down", interval=0.5, proc=server)
        restarted = start_trainer(procs, site, port, *SPLIT_SITE)
        rows = rows_when(updates, accepted_from(restarted.pid), 90, "an update from the restarted trainer", server)
        alive = server.poll() is None
        # what was recorded until then (stopping the processes below makes the server record their departure)
        [back] = [r for r in rows if r.get("trainer_pid") == restarted.pid]
        states = [r for r in read_jsonl(nodes) if r["node"] == node and r["wall_s"] <= back["wall_s"]]
        picks = [s for s in read_jsonl(selections) if s["wall_s"] <= back["wall_s"]]
    assert alive, "the server stopped"

    assert failed["reason"].startswith(f"node {node} replied with error 2: the trainer at 127.0.0.1:{port} is unreachable")
    assert "start it with `corolla client` or `corolla trainer`" in failed["reason"]
    # exactly one job failed: none was sent to the node while its trainer was down
    assert [r["status"] for r in rows if r["node"] == node and r["wall_s"] >= failed["wall_s"]] == ["failed", "accepted"]
    assert [r["status"] for r in states] == ["ok", "unavailable", "ok"]
    assert states[1]["reason"] == failed["reason"]
    down = [s for s in picks if failed["wall_s"] <= s["wall_s"] < states[2]["wall_s"]]
    assert down and all(node not in s["picked"] for s in down)  # the rounds went on without it
    assert back["node"] == node and back["wall_s"] > states[2]["wall_s"] and back["model_loads"] == 1


# ---- a site's network cut mid-round and restored ---------------------------------------------------------
@dataclass(frozen=True)
class Veth:
    """A network namespace joined to the host by a veth pair: HOST_IP on the host end, NS_IP inside."""

    namespace: str
    host_end: str
    host_ip: str
    ns_ip: str

    @property
    def prefix(self) -> tuple[str, ...]:
        """Run a command inside the namespace (`ip netns exec` execs in place: the pid is the command's)."""
        return ("ip", "netns", "exec", self.namespace)

    def cut(self) -> None:
        """Take the host end down: nothing passes either way, and no connection is told (no reset)."""
        ip("link", "set", self.host_end, "down")

    def restore(self) -> None:
        """Bring the host end up again."""
        ip("link", "set", self.host_end, "up")


def ip(*args: str) -> subprocess.CompletedProcess:
    """Run `ip ARGS` (bounded); raise CalledProcessError with its stderr when it fails."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=True)


def free_subnet() -> int:
    """A third octet x for which no address of 10.200.x.0/24 is on this host."""
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, timeout=30).stdout
    free = [x for x in range(256) if f" 10.200.{x}." not in used]
    return random.choice(free)


@pytest.fixture
def veth() -> Iterator[Veth]:
    """A namespace and veth pair named uniquely for this test, removed afterwards even when the test fails.

    Skipped, with the reason, only where this kernel or user may not make them (not root, no `ip`,
    `ip netns add` or the veth pair refused).
    """
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is not installed: cannot build a network namespace")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces and veth pairs needs root (CAP_NET_ADMIN)")
    token = secrets.token_hex(3)
    x = free_subnet()
    link = Veth(f"corolla-{token}", f"cvh{token}", f"10.200.{x}.1", f"10.200.{x}.2")
    inner = f"cvn{token}"
    try:
        try:
            ip("netns", "add", link.namespace)
            ip("link", "add", link.host_end, "type", "veth", "peer", "name", inner)
        except subprocess.CalledProcessError as e:
            pytest.skip(f"this kernel refused a network namespace or veth pair ({' '.join(e.cmd)}: {e.stderr.strip()})")
        ip("link", "set", inner, "netns", link.namespace)
        ip("addr", "add", f"{link.host_ip}/30", "dev", link.host_end)
        ip("link", "set", link.host_end, "up")
        ip("-n", link.namespace, "addr", "add", f"{link.ns_ip}/30", "dev", inner)
        ip("-n", link.namespace, "link", "set", inner, "up")
        ip("-n", link.namespace, "link", "set", "lo", "up")  # the trainer and the SuperNode's own API live on lo
        yield link
    finally:  # deleting one end deletes the pair; the namespace goes once its processes are gone (reaped above)
        subprocess.run(["ip", "link", "del", link.host_end], capture_output=True, timeout=30, check=False)
        subprocess.run(["ip", "netns", "del", link.namespace], capture_output=True, timeout=30, check=False)


def test_a_site_cut_off_mid_round_is_left_out_of_that_round_and_rejoins_once_its_link_is_back(tmp_path, veth):
    out = tmp_path / "run"
    updates, selections = out / "updates.jsonl", out / "selection.jsonl"
    timeout = 20
    fleet = f"{veth.host_ip}:{launch.free_port(veth.host_ip)}"
    values = {**ENDLESS, "clients-per-round": 2, "min-nodes": 2, "round-timeout": timeout}
    site, port = tmp_path / "cut-site", 50051  # the namespace has ports of its own, all free
    with processes() as procs:
        start_client(procs, tmp_path, "site0", fleet, 0, 2, "--insecure")  # loads its model while the server starts
        server, _ = start_server(procs, tmp_path / "server", out, fleet, values, "--insecure")
        trainer = start_trainer(procs, site, port, *SPLIT_SITE, prefix=veth.prefix)
        start_supernode(procs, site, fleet, f"127.0.0.1:{port}", prefix=veth.prefix)
        rows = rows_when(updates, accepted_from(trainer.pid), 120, "an update from the site behind the veth", server)
        [node] = {r["node"] for r in rows if r.get("trainer_pid") == trainer.pid}

        # cut mid-round: as soon as a new round has sent its jobs (its selection is recorded just before the push),
        # long before the site could answer (a reply needs a fresh ClientApp process: over a second)
        seen = len(read_jsonl(selections))
        launch.wait_for(lambda: len(read_jsonl(selections)) > seen, 60, "the next round", interval=0.02, proc=server)
        veth.cut()
        cut_round = read_jsonl(selections)[seen]
        rows = rows_when(updates, lambda rs: any(r["node"] == node and r["status"] == "failed" for r in rs),
                         timeout + 30, "the cut round's end", server)
        veth.restore()
        [failed] = [r for r in rows if r["node"] == node and r["status"] == "failed"]
        rows = rows_when(updates, lambda rs: any(r["node"] == node and r["status"] == "accepted"
                                                 and r["wall_s"] > failed["wall_s"] for r in rs),
                         90, "an update from the site once its link is back", server)
        alive = server.poll() is None
    assert alive, "the server stopped"

    assert node in cut_round["picked"] and len(cut_round["picked"]) == 2
    assert failed["reason"] == f"node {node} did not reply within {timeout}s"
    # the cut round ended at its timeout (Flower pulls replies every 3 s) with the other site's update
    assert timeout <= failed["wall_s"] - cut_round["wall_s"] <= timeout + 5
    same_round = [r for r in rows if r["status"] == "accepted" and failed["wall_s"] <= r["wall_s"] <= failed["wall_s"] + 1]
    assert len(same_round) == 1 and same_round[0]["node"] != node
    # the same SuperNode (same node id, no re-registration) and the same trainer contributed again
    back = [r for r in rows if r["node"] == node and r["status"] == "accepted" and r["wall_s"] > failed["wall_s"]]
    assert back[0]["trainer_pid"] == trainer.pid
