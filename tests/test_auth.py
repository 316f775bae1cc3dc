"""TLS and node authentication through corolla's own commands, on 127.0.0.1.

- bad certificates, keys and transport choices stop with one line naming the problem and the fix (no process starts);
- `corolla server --auth --register`: the registered node trains, an unregistered key and a node without a key are
  refused, and the refusals reach the operator (server output, `corolla nodes list`);
- `corolla superlink --auth` + `corolla nodes register/unregister`: a registered node joins; unregistering it while it
  runs makes its client leave with the reason.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
from pathlib import Path

import pytest

from corolla import security
from corolla.launch import processes as launch
from corolla.launch import superlink
from corolla.launch.node import check_transport
from corolla.server.records import read_jsonl
from tests.conftest import COROLLA, processes, read_line
from tests.linkhelpers import TINY, corolla, joined_node, nodes_json, sets, start_client, start_superlink, text, wait_exit

pytestmark = pytest.mark.slow  # starts real processes (SuperLink, SuperNodes, trainers, Ray)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA + server certificate for 127.0.0.1 and three node key pairs."""
    paths = security.make_ca(tmp_path / "certs", ["127.0.0.1"])
    for name in ("site0", "site1", "site2"):
        security.make_node_key(tmp_path / "keys", name)
    return {**paths, "keys": tmp_path / "keys"}


def tls_args(pki: dict[str, Path]) -> list[str]:
    return ["--ssl-ca", str(pki["ca"]), "--ssl-cert", str(pki["cert"]), "--ssl-key", str(pki["key"])]


def test_keys_commands_write_a_ca_server_certificate_and_node_keys(tmp_path):
    r = corolla(tmp_path, "keys", "ca", str(tmp_path / "pki"), "--host", "10.0.0.5", "--host", "fl.example.org")
    assert r.returncode == 0, r.stderr
    r = corolla(tmp_path, "keys", "node", str(tmp_path / "pki"), "site0")
    assert r.returncode == 0, r.stderr
    p = tmp_path / "pki"
    security.check_server_tls(p / "ca.crt", p / "server.crt", p / "server.key", ["10.0.0.5", "fl.example.org"])
    fp = security.check_node_key(p / "site0")
    assert security.read_public_key(p / "site0.pub")[1] == fp and fp in r.stdout
    assert oct((p / "site0").stat().st_mode & 0o777) == "0o600" and oct((p / "ca.key").stat().st_mode & 0o777) == "0o600"
    # a second `keys ca` keeps the CA (certificates already on the nodes stay valid) and reissues the server's
    ca = (p / "ca.crt").read_bytes()
    assert corolla(tmp_path, "keys", "ca", str(p), "--host", "10.0.0.6").returncode == 0
    assert (p / "ca.crt").read_bytes() == ca
    security.check_server_tls(p / "ca.crt", p / "server.crt", p / "server.key", ["10.0.0.6"])
    r = corolla(tmp_path, "keys", "node", str(p), "site0")
    assert r.returncode == 2 and "exists" in r.stderr and "--force" in r.stderr
    # the run-configuration listing moved to `corolla options`
    r = corolla(tmp_path, "options")
    assert r.returncode == 0 and "aggregation" in r.stdout


def test_bad_certificates_keys_and_plaintext_are_refused_with_the_fix(tmp_path, pki):
    other = security.make_ca(tmp_path / "other", ["127.0.0.1"])
    old = security.make_ca(tmp_path / "old", ["127.0.0.1"], days=1,
                           not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    elsewhere = security.make_ca(tmp_path / "elsewhere", ["10.9.9.9"])
    keys = pki["keys"]

    def refused(policy: dict, *needles: str) -> None:
        with pytest.raises(security.SecurityError) as e:
            superlink.transport(**policy)
        assert "\n" not in str(e.value)
        for n in needles:
            assert n in str(e.value), str(e.value)

    tls = {"ca": str(pki["ca"]), "cert": str(pki["cert"]), "key": str(pki["key"])}
    refused(dict(fleet_address="0.0.0.0:9092", tls=None, insecure=False, auth=None), "without TLS", "--insecure",
            "corolla keys ca")
    refused(dict(fleet_address="127.0.0.1:9092", tls=None, insecure=False, auth=True), "needs TLS")
    refused(dict(fleet_address="127.0.0.1:9092", tls={**tls, "key": None}, insecure=False, auth=None), "--ssl-key")
    refused(dict(fleet_address="127.0.0.1:9092", tls={**tls, "ca": str(other["ca"])}, insecure=False, auth=None),
            "was not issued by")
    refused(dict(fleet_address="127.0.0.1:9092", tls={**tls, "key": str(other["key"])}, insecure=False, auth=None),
            "does not belong")
    refused(dict(fleet_address="127.0.0.1:9092", tls={k: str(old[k]) for k in tls}, insecure=False, auth=None),
            "expired", "corolla keys ca")
    refused(dict(fleet_address="10.0.0.5:9092", tls={k: str(elsewhere[k]) for k in tls}, insecure=False, auth=None),
            "does not name 10.0.0.5")
    refused(dict(fleet_address="127.0.0.1:9092", tls={**tls, "cert": str(tmp_path / "nope.crt")}, insecure=False,
                 auth=None), "not found", "corolla keys ca")
    # defaults: TLS off loopback turns authentication on; loopback keeps it off unless asked; --insecure is explicit
    assert superlink.transport("0.0.0.0:9092", tls=tls, insecure=False, auth=None)[1] is True
    assert superlink.transport("127.0.0.1:9092", tls=tls, insecure=False, auth=None)[1] is False
    assert superlink.transport("0.0.0.0:9092", tls=None, insecure=True, auth=None) == (None, False)

    # the same lines come out of the commands, before anything starts
    r = corolla(tmp_path, "superlink", "--home", str(tmp_path / "h"), "--fleet-address", "0.0.0.0:9092")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "without TLS" in r.stderr
    r = corolla(tmp_path, "server", "--out", str(tmp_path / "r"), "--fleet-address", "0.0.0.0:9092")
    assert r.returncode == 2 and "--insecure" in r.stderr
    def client_refused(needle: str, **kw) -> None:
        args = argparse.Namespace(**{"superlink": "127.0.0.1:9092", "root_certificates": None, "insecure": False,
                                     "auth_key": None, **kw})
        with pytest.raises(security.SecurityError, match=needle):
            check_transport(args)

    client_refused("without TLS", superlink="10.0.0.5:9092")
    client_refused("needs TLS", auth_key=str(keys / "site0"))
    client_refused("is a public key", root_certificates=str(pki["ca"]), auth_key=str(keys / "site0.pub"))
    client_refused("not found", root_certificates=str(pki["ca"]), auth_key=str(keys / "missing"))
    client_refused("expired", root_certificates=str(old["cert"]))
    client_refused("choose TLS", root_certificates=str(pki["ca"]), insecure=True)
    r = corolla(tmp_path, "client", "--model", "tiny-bert", "--superlink", "127.0.0.1:9092", "--root-certificates",
                str(pki["ca"]), "--auth-key", str(keys / "site0.pub"))
    assert r.returncode == 2 and "is a public key" in r.stderr and r.stderr.count("\n") == 1  # before the model loads
    r = corolla(tmp_path, "nodes", "register", "--home", str(tmp_path / "h"), str(keys / "site0"))
    assert r.returncode == 2 and "is a private key" in r.stderr
    r = corolla(tmp_path, "nodes", "list", "--home", str(tmp_path / "nowhere"), "--json")
    assert r.returncode == 0 and "not a SuperLink home" in json.loads(r.stdout)["note"]


def test_server_with_auth_trains_the_registered_node_and_reports_refused_ones(tmp_path, pki):
    """One-shot `corolla server --auth --register site0.pub`: site1 (unregistered key) and a node without a key are
    refused, each client says why, the server's output and `corolla nodes list` name the refused key; site0 trains."""
    keys, home, out = pki["keys"], tmp_path / "home", tmp_path / "run"
    fleet = f"127.0.0.1:{launch.free_port()}"
    ca = ["--root-certificates", str(pki["ca"])]
    cmd = [*COROLLA, "server", "--out", str(out), "--fleet-address", fleet, "--home", str(home), "--auth",
           "--register", str(keys / "site0.pub"), *tls_args(pki),
           *sets({**TINY, "min-nodes": 1, "clients-per-round": 1})]
    with processes() as procs:
        server = launch.start(cmd, launch.flower_env(tmp_path / "server-env"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
        procs.append(server)
        registered = read_line(server, "corolla-server registered site0 as node", timeout=90)
        site0_id = int(registered.split()[-1])
        read_line(server, "corolla-server fleet API on", timeout=30)
        # the refused clients first, so the refusals land while the server still waits for a node
        c1, log1 = start_client(procs, tmp_path, "site1", fleet, 1, 3, *ca, "--auth-key", str(keys / "site1"))
        c2, log2 = start_client(procs, tmp_path, "nokey", fleet, 2, 3, *ca)
        assert wait_exit(c1, 150) == 3 and wait_exit(c2, 150) == 3
        _, fp1 = security.read_public_key(keys / "site1.pub")
        assert f"corolla client: the SuperLink at {fleet} refused this node: its key" in text(log1)
        assert fp1 in text(log1) and "corolla nodes register" in text(log1)
        assert "requires node authentication" in text(log2) and "--auth-key" in text(log2)
        c0, log0 = start_client(procs, tmp_path, "site0", fleet, 0, 3, *ca, "--auth-key", str(keys / "site0"))
        stdout, _ = server.communicate(timeout=300)
        log = stdout.decode()
        assert server.returncode == 0, log[-3000:]
        assert c0.poll() is None  # the registered client is still up
    assert joined_node(log0, 1) == site0_id
    assert f"corolla-server: refused a node with key {fp1}: its key is not registered" in log
    assert "refused a node: the node has no authentication key" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["versions"] == 1
    assert {u["node"] for u in read_jsonl(out / "updates.jsonl") if u["status"] == "accepted"} == {site0_id}
    # after the server stopped, the home still tells the operator who knocked
    listing = nodes_json(tmp_path, home)
    assert [n["node_id"] for n in listing["nodes"]] == [site0_id]
    refused = {r["fingerprint"]: r for r in listing["refused"]}
    assert refused[fp1]["reason"] == "its key is not registered" and refused[fp1]["attempts"] == 1
    assert any(r["reason"].startswith("the node has no authentication key") for r in listing["refused"])


def test_registered_node_joins_and_leaves_when_unregistered(tmp_path, pki):
    """`corolla superlink --auth` + `corolla nodes register`: the node joins under its registered id; `corolla nodes
    unregister` while it runs drops it, and its client exits (bounded) saying why."""
    keys, home = pki["keys"], tmp_path / "home"
    fleet = f"127.0.0.1:{launch.free_port()}"
    with processes() as procs:
        start_superlink(procs, tmp_path, home, *tls_args(pki), "--auth", fleet=fleet, control_port=launch.free_port())
        r = corolla(tmp_path, "nodes", "register", "--home", str(home), str(keys / "site0.pub"))
        assert r.returncode == 0, r.stderr
        node_id = int(r.stdout.split()[-1])
        client, log = start_client(procs, tmp_path, "site0", fleet, 0, 1, "--root-certificates", str(pki["ca"]),
                                   "--auth-key", str(keys / "site0"))
        assert joined_node(log, 150, client) == node_id
        assert [(n["name"], n["status"]) for n in nodes_json(tmp_path, home)["nodes"]] == [("site0", "online")]
        r = corolla(tmp_path, "nodes", "unregister", "--home", str(home), "site0")
        assert r.returncode == 0, r.stderr
        assert wait_exit(client, 90) == 3
        assert "the SuperLink stopped accepting this node" in text(log) and "unregistered" in text(log)
        assert [(n["name"], n["status"]) for n in nodes_json(tmp_path, home)["nodes"]] == [("site0", "unregistered")]
        # Flower never takes a revoked key back: the operator is told to have the node make a new one
        r = corolla(tmp_path, "nodes", "register", "--home", str(home), str(keys / "site0.pub"))
        assert r.returncode == 1 and "revoked" in r.stderr and "corolla keys node" in r.stderr
