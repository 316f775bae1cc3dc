"""A SuperLink that outlives one run, kept in a home folder; runs submitted to it; node keys registered with it.

`corolla superlink --home DIR` runs Flower's SuperLink with everything that must
outlive a run inside DIR, so that the commands below work from the server host at
any time, and a restart keeps the registered nodes:

| DIR/ | what |
|---|---|
| `superlink.json` | the SuperLink's settings (Fleet address, Control API port, TLS files, node authentication) and pid |
| `state.db` | Flower's state (`--database`): registered node keys and ids, runs |
| `config.toml` | the `flwr` connection `corolla` (DIR is the FLWR_HOME of every `flwr` call) |
| `superlink.log` | the SuperLink's output |
| `nodes.json` | names given to registered keys (`corolla nodes register --name`) |
| `refused.jsonl` | every refused join attempt: when, the key's fingerprint, why |

- `corolla run --home DIR --out RUN --set ...` submits one run (`flwr run --stream`)
  and streams its progress; trainers stay up between runs with their model loaded.
- `corolla nodes register|unregister|list --home DIR` wraps `flwr supernode ...`
  and names keys; `list` also shows the refused attempts the SuperLink logged.

Transport policy (`transport`): a Fleet API address other than loopback needs TLS
(or an explicit `--insecure`) and turns node authentication on (unless `--no-auth`);
node authentication needs TLS (Flower refuses it otherwise).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corolla import security
from corolla.launch import processes as launch
from corolla.launch.app_bundle import write_app
from corolla.security import SecurityError

#: the `flwr` connection name written into every home
CONNECTION = "corolla"
#: Control API port of a new home unless --control-port says otherwise
DEFAULT_CONTROL_PORT = 9093
#: seconds to wait for a SuperLink to listen
START_TIMEOUT = 90.0


class LinkError(RuntimeError):
    """The SuperLink of a home cannot be started, reached or asked; the message names the fix."""


@dataclass(frozen=True)
class LinkSettings:
    """How a home's SuperLink listens: saved in superlink.json, reused by a restart."""

    fleet_address: str
    control_port: int
    #: {"ca", "cert", "key"}: absolute paths; None: plaintext
    tls: dict[str, str] | None
    auth: bool

    @property
    def control_address(self) -> str:
        """Where `flwr` reaches the Control API (loopback only: the commands run on the server host)."""
        return f"127.0.0.1:{self.control_port}"


@dataclass(frozen=True)
class Home:
    """The paths of a SuperLink home."""

    root: Path

    @property
    def settings_path(self) -> Path:
        """superlink.json."""
        return self.root / "superlink.json"

    @property
    def database(self) -> Path:
        """Flower's state database."""
        return self.root / "state.db"

    @property
    def log(self) -> Path:
        """The SuperLink's output."""
        return self.root / "superlink.log"

    @property
    def names(self) -> Path:
        """nodes.json: names of registered keys."""
        return self.root / "nodes.json"

    @property
    def refused(self) -> Path:
        """refused.jsonl: refused join attempts."""
        return self.root / "refused.jsonl"

    def env(self) -> dict[str, str]:
        """Environment of every Flower process of this home (FLWR_HOME = the home)."""
        return launch.flower_env(self.root)

    def saved(self) -> dict[str, Any]:
        """superlink.json's content ({} when absent)."""
        try:
            return json.loads(self.settings_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def running_pid(self) -> int | None:
        """The pid of this home's SuperLink when one is alive."""
        pid = self.saved().get("pid")
        if not pid:
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        is_link = b"flower-superlink" in cmdline or b"corolla.launch.superlink_guard" in cmdline
        return int(pid) if is_link and str(self.database).encode() in cmdline else None


def transport(fleet_address: str, *, tls: dict[str, str | None] | None, insecure: bool,
              auth: bool | None) -> tuple[dict[str, str] | None, bool]:
    """Apply the transport policy; return (TLS files or None, node authentication on) or raise SecurityError."""
    files = {k: v for k, v in (tls or {}).items() if v}
    if files and insecure:
        raise SecurityError("both --insecure and --ssl-* files given: choose TLS (the --ssl-* files) or plaintext.")
    if files and len(files) < 3:
        missing = [f"--ssl-{k}" for k in ("ca", "cert", "key") if k not in files]
        raise SecurityError(f"TLS needs --ssl-ca, --ssl-cert and --ssl-key; missing {', '.join(missing)} (all three "
                            "are written by `corolla keys ca DIR --host SERVER`).")
    loopback = security.is_loopback(fleet_address)
    if not files and not insecure and not loopback:
        raise SecurityError(f"the Fleet API would listen on {fleet_address} without TLS: pass --ssl-ca/--ssl-cert/"
                            "--ssl-key (make them with `corolla keys ca DIR --host SERVER`), or --insecure to accept an "
                            "unencrypted federation that any host reaching this port can join.")
    if auth and not files:
        raise SecurityError("node authentication (--auth) needs TLS: pass --ssl-ca/--ssl-cert/--ssl-key (make them "
                            "with `corolla keys ca DIR --host SERVER`).")
    if files:
        host = security.split_host(fleet_address)
        security.check_server_tls(files["ca"], files["cert"], files["key"], [host])
        files = {k: str(Path(v).expanduser().resolve()) for k, v in files.items()}
    on = bool(files) and not loopback if auth is None else auth
    return (files or None), on


def write_settings(home: Home, settings: LinkSettings, pid: int | None) -> None:
    """Save the settings (and the pid of the SuperLink now running) in superlink.json; write the `flwr` connection."""
    home.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(home.root, 0o700)  # its state (registered keys, runs) and settings: the operator's alone
    data = {**dataclasses.asdict(settings), "pid": pid, "database": str(home.database)}
    home.settings_path.write_text(json.dumps(data, indent=2) + "\n")
    launch.write_connection(home.root, CONNECTION, settings.control_address,
                            root_certificates=(settings.tls or {}).get("ca"))


def start(home: Home, settings: LinkSettings, log_path: Path | None = None) -> subprocess.Popen:
    """Start this home's SuperLink (state in home/state.db) and wait until both APIs listen."""
    home.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(home.root, 0o700)  # its state (registered keys, runs) and settings: the operator's alone
    if (pid := home.running_pid()) is not None:
        raise LinkError(f"a SuperLink already runs in {home.root} (pid {pid}); submit runs to it with `corolla run "
                        f"--home {home.root}`, or stop it first.")
    if launch.port_open("127.0.0.1", settings.control_port):
        raise LinkError(f"port {settings.control_port} (the Control API) is taken; pass --control-port with a free "
                        "port (it is kept in superlink.json).")
    extra = ["--enable-supernode-auth"] if settings.auth else []
    proc, _ = launch.start_superlink(home.root, simulation=False, log_path=log_path or home.log,
                                     fleet_address=settings.fleet_address, http_port=settings.control_port,
                                     tls=settings.tls, extra=extra, database=home.database)
    write_settings(home, settings, proc.pid)
    fleet_host = security.split_host(settings.fleet_address)
    fleet_port = int(settings.fleet_address.rsplit(":", 1)[1])
    dial = "127.0.0.1" if security.is_wildcard(fleet_host) else fleet_host
    try:
        launch.wait_for(lambda: launch.port_open(dial, fleet_port), START_TIMEOUT, "the SuperLink's Fleet API",
                        proc=proc)
    except (RuntimeError, TimeoutError):
        launch.stop(proc)
        raise
    return proc


# ---------------------------------------------------------------------------------------------------------------------
# Refused join attempts, from the SuperLink's log

_REFUSAL = re.compile(r"\[/flwr\.proto\.Fleet/(?P<rpc>\w+)\]\[ApiError:(?P<code>\d+)\](?P<rest>.*)")
_PEM = re.compile(r"public key: b'(?P<pem>-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----(?:\\n)?)'")
#: Flower's ApiErrorCode values that mean "this node may not join"
REFUSAL_CODES = {2001: "the node has no authentication key (it was started without --auth-key)",
                 2004: "its key is not registered"}


def parse_refusal(line: str) -> dict[str, Any] | None:
    """One SuperLink log line → a refusal record (rpc, code, reason, key fingerprint) or None."""
    m = _REFUSAL.search(line)
    if not m or int(m["code"]) not in REFUSAL_CODES:
        return None
    rec: dict[str, Any] = {"rpc": m["rpc"], "code": int(m["code"]), "reason": REFUSAL_CODES[int(m["code"])]}
    # 2001: a node without --auth-key presents a throw-away key; only a registered-style key identifies a node
    if int(m["code"]) == 2004 and (k := _PEM.search(m["rest"])) is not None:
        with contextlib.suppress(ValueError, TypeError):
            rec["fingerprint"] = security.fingerprint_pem(k["pem"].replace("\\n", "\n").encode())
    return rec


def names_by_fingerprint(home: Home) -> dict[str, dict[str, Any]]:
    """Fingerprint → {name, node_id, ...} of every key ever registered through `corolla nodes`."""
    return {v["fingerprint"]: {"name": k, **v} for k, v in _read_names(home).items()}


def describe_refusal(home: Home, rec: dict[str, Any]) -> str:
    """One line for the operator: whose key, why refused, what to do."""
    fp = rec.get("fingerprint")
    known = names_by_fingerprint(home).get(fp or "")
    who = f"node {known['name']!r} ({fp}, unregistered)" if known and known.get("unregistered_at") else \
        (f"a node with key {fp}" if fp else "a node")
    fix = (f"register its public key with `corolla nodes register --home {home.root} NAME.pub`" if rec["code"] == 2004
           else "the node must start with --auth-key (its key registered here)")
    return f"refused {who}: {rec['reason']}; {fix}"


class RefusalWatcher(threading.Thread):
    """Follow the SuperLink's log from its current end: record each refused join in refused.jsonl and report it."""

    def __init__(self, home: Home, log_path: Path, report: Callable[[str], None]) -> None:
        super().__init__(daemon=True, name="refusal-watcher")
        self.home, self.log_path, self.report = home, log_path, report
        self.offset = log_path.stat().st_size if log_path.exists() else 0
        self.halt = threading.Event()

    def run(self) -> None:
        """Poll the log every 0.5 s until halted."""
        buf = b""
        while not self.halt.wait(0.5):
            try:
                with open(self.log_path, "rb") as f:
                    f.seek(self.offset)
                    chunk = f.read()
            except FileNotFoundError:
                continue
            self.offset += len(chunk)
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                rec = parse_refusal(raw.decode(errors="replace"))
                if rec is None:
                    continue
                rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **rec}
                with open(self.home.refused, "a") as out:
                    out.write(json.dumps(rec) + "\n")
                self.report(describe_refusal(self.home, rec))


@contextlib.contextmanager
def watching(home: Home, log_path: Path, prog: str) -> Iterator[RefusalWatcher]:
    """Report refused join attempts on stdout (prefixed by `prog`) while the block runs."""
    w = RefusalWatcher(home, log_path, lambda line: print(f"{prog}: {line}", flush=True))
    w.start()
    try:
        yield w
    finally:
        w.halt.set()


# ---------------------------------------------------------------------------------------------------------------------
# `corolla superlink`


def serve(home: Home, settings: LinkSettings, stop: threading.Event) -> int:
    """Run the home's SuperLink until `stop` is set or it exits; report refused joins on stdout."""
    procs: list[subprocess.Popen] = []
    with launch.running(procs):
        link = start(home, settings)
        procs.append(link)
        tls = "TLS" if settings.tls else "plaintext"
        auth = "node authentication on" if settings.auth else "node authentication off"
        print(f"corolla-superlink fleet API on {settings.fleet_address} ({tls}, {auth}); control API on "
              f"{settings.control_address}; home {home.root}", flush=True)
        with watching(home, home.log, "corolla-superlink"):
            while not stop.is_set() and link.poll() is None:
                stop.wait(0.5)
        if link.poll() is not None and not stop.is_set():
            raise LinkError(f"the SuperLink exited with code {link.returncode}; see {home.log}")
    return 0


def connect(home: Home) -> LinkSettings:
    """The settings of the SuperLink running in `home`; raise LinkError when none is reachable."""
    saved = home.saved()
    if not saved:
        raise LinkError(f"{home.root} is not a SuperLink home; start one with `corolla superlink --home {home.root}`.")
    settings = LinkSettings(**{f.name: saved[f.name] for f in dataclasses.fields(LinkSettings)})
    if home.running_pid() is None or not launch.port_open("127.0.0.1", settings.control_port):
        raise LinkError(f"no SuperLink is running in {home.root}; start it with `corolla superlink --home {home.root}`.")
    return settings


# ---------------------------------------------------------------------------------------------------------------------
# `corolla run`

#: seconds `flwr run` may take to build and submit the app (the run itself is bounded by `timeout`)
SUBMIT_TIMEOUT = 300.0


def submit_run(home: Home, run_config: dict[str, Any], out: Path, timeout: float | None = None) -> int:
    """Submit one run to the home's SuperLink, then stream its log; stop the run if this command is interrupted.

    Two steps so that the run id is known before anything can interrupt the wait:
    `flwr run --format json` submits (bounded by SUBMIT_TIMEOUT) and `flwr log --stream`
    follows it (bounded by `timeout`, counted from the run's start). Returns the log
    stream's exit code; the run's files land in `out` (written by the ServerApp that the
    SuperLink starts on this host).
    """
    connect(home)
    app = write_app(home.root / "app")
    cmd = [str(launch.BIN / "flwr"), "run", str(app), CONNECTION, "--format", "json", "--run-config",
           launch.run_config_arg({**run_config, "out-dir": str(out)})]
    r = subprocess.run(cmd, env=home.env(), capture_output=True, text=True, timeout=SUBMIT_TIMEOUT, check=False,
                       start_new_session=True)
    try:
        reply = json.loads(r.stdout[r.stdout.index("{"):])
    except ValueError:
        reply = {}
    if r.returncode != 0 or not reply.get("run-id"):
        reason = reply.get("error-message") or (r.stderr or r.stdout).strip()[-500:]
        raise LinkError(f"the SuperLink in {home.root} did not accept the run: {reason}")
    run_id = int(reply["run-id"])
    print(f"corolla run: started run {run_id} on the SuperLink in {home.root}", flush=True)
    log = launch.start([str(launch.BIN / "flwr"), "log", str(run_id), CONNECTION, "--stream"], home.env())
    finished = False
    try:
        try:
            code = log.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"run {run_id} did not finish within {timeout:.0f}s (--timeout); it is stopped") from None
        finished = True
        return code
    finally:
        launch.stop(log)
        if not finished:  # interrupted or timed out: the run would go on without anyone watching
            subprocess.run([str(launch.BIN / "flwr"), "stop", str(run_id), CONNECTION], env=home.env(),
                           capture_output=True, timeout=60, check=False)
            print(f"corolla run: stopped run {run_id}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# `corolla nodes`


def _read_names(home: Home) -> dict[str, dict[str, Any]]:
    try:
        return json.loads(home.names.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_names(home: Home, names: dict[str, dict[str, Any]]) -> None:
    tmp = home.names.with_suffix(".tmp")
    tmp.write_text(json.dumps(names, indent=2) + "\n")
    os.replace(tmp, home.names)


def _flwr(home: Home, *args: str) -> dict[str, Any]:
    """Run `flwr supernode ARGS corolla --format json`; return its JSON or raise LinkError with Flower's reason."""
    cmd = [str(launch.BIN / "flwr"), "supernode", *args, CONNECTION, "--format", "json"]
    r = subprocess.run(cmd, env=home.env(), capture_output=True, text=True, timeout=120, check=False)
    try:
        data = json.loads(r.stdout[r.stdout.index("{"):]) if "{" in r.stdout else {}
    except json.JSONDecodeError:
        data = {}
    if r.returncode != 0 or not data.get("success", False):
        tail = (r.stderr or r.stdout).strip().splitlines()
        reason = data.get("error-message") or data.get("error") or (tail[-1] if tail else f"exit code {r.returncode}")
        raise LinkError(f"flwr supernode {args[0]} failed: {reason}")
    return data


def register(home: Home, public_key: Path, name: str | None = None) -> tuple[str, int]:
    """Register a node's public key with the running SuperLink; return (name, node id). Idempotent per key."""
    _, fp = security.read_public_key(public_key)
    settings = connect(home)
    names = _read_names(home)
    name = name or public_key.name.removesuffix(".pub")
    for other, rec in names.items():
        if rec["fingerprint"] == fp and not rec.get("unregistered_at"):
            return other, int(rec["node_id"])
        if rec["fingerprint"] == fp:
            raise LinkError(f"this key ({fp}) was unregistered as {other!r} on {rec['unregistered_at']}, and Flower never "
                            "accepts a revoked key again: make a new key pair on the node (`corolla keys node DIR NAME "
                            "--force`) and register its .pub.")
    if name in names and not names[name].get("unregistered_at"):
        raise LinkError(f"the name {name!r} is taken by another registered key (node {names[name]['node_id']}); pass "
                        "--name with another name, or unregister that node first.")
    try:
        node_id = int(_flwr(home, "register", str(public_key.expanduser().resolve()))["node-id"])
    except LinkError as e:
        if "already in use" in str(e):
            raise LinkError(f"this key ({fp}) is already registered with the SuperLink in {home.root} (outside "
                            "`corolla nodes`); use `flwr supernode list` to find its node id.") from None
        raise
    names[name] = {"node_id": node_id, "fingerprint": fp, "public_key": public_key.read_text().strip(),
                   "registered_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "unregistered_at": None}
    _write_names(home, names)
    if not settings.auth:
        print(f"corolla nodes: warning: the SuperLink in {home.root} runs without node authentication, so any node "
              "joins anyway; restart it with --auth (needs TLS).", file=sys.stderr)
    return name, node_id


def unregister(home: Home, who: str) -> tuple[str, int]:
    """Unregister a node by name or node id; a running SuperNode with that key is dropped and exits."""
    connect(home)
    names = _read_names(home)
    if who in names:
        name, node_id = who, int(names[who]["node_id"])
    elif who.isdigit():
        node_id = int(who)
        name = next((k for k, v in names.items() if int(v["node_id"]) == node_id), "")
    else:
        raise LinkError(f"no node named {who!r} in {home.root}; `corolla nodes list --home {home.root}` shows names "
                        "and node ids.")
    _flwr(home, "unregister", str(node_id))
    if name:
        names[name]["unregistered_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        _write_names(home, names)
    return name, node_id


def list_nodes(home: Home) -> dict[str, Any]:
    """Registered nodes with Flower's status, names from nodes.json, and the refused attempts (refused.jsonl)."""
    names = _read_names(home)
    by_id = {int(v["node_id"]): k for k, v in names.items()}
    nodes: list[dict[str, Any]] = []
    note = ""
    try:
        connect(home)
        for n in _flwr(home, "list")["nodes"]:
            nid = int(n["node-id"])
            nodes.append({"name": by_id.get(nid, ""), "node_id": nid, "status": n["status"],
                          "online_at": n.get("online-at"), "created_at": n.get("created-at")})
    except LinkError as e:
        note = str(e)
        nodes = [{"name": k, "node_id": int(v["node_id"]), "status": "unregistered" if v.get("unregistered_at")
                  else "registered (SuperLink not running)"} for k, v in names.items()]
    known = names_by_fingerprint(home)
    refused: dict[str, dict[str, Any]] = {}
    if home.refused.exists():
        for line in home.refused.read_text().splitlines():
            rec = json.loads(line)
            key = rec.get("fingerprint") or rec["reason"]
            r = refused.setdefault(key, {"fingerprint": rec.get("fingerprint", ""), "reason": rec["reason"],
                                         "name": known.get(rec.get("fingerprint", ""), {}).get("name", ""),
                                         "attempts": 0})
            r["attempts"] += 1
            r["last"] = rec["time"]
    return {"nodes": nodes, "refused": list(refused.values()), "note": note}


def format_nodes(listing: dict[str, Any]) -> str:
    """The `corolla nodes list` table."""
    lines = [f"{'NAME':16} {'NODE ID':>20}  STATUS"]
    for n in listing["nodes"]:
        lines.append(f"{n['name'] or '-':16} {n['node_id']:>20}  {n['status']}")
    if listing["refused"]:
        lines += ["", "refused join attempts:", f"{'KEY':52} {'NAME':12} {'ATTEMPTS':>8}  LAST                      REASON"]
        for r in listing["refused"]:
            lines.append(f"{r['fingerprint'] or '-':52} {r['name'] or '-':12} {r['attempts']:>8}  {r['last']:24}  "
                         f"{r['reason']}")
    if listing["note"]:
        lines += ["", f"note: {listing['note']}"]
    return "\n".join(lines)
