"""Helpers of the SuperLink/authentication process tests: every process in its own group, every wait bounded."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from corolla.launch import processes as launch
from tests.conftest import COROLLA, read_line

#: a run as small as a real federation gets: tiny BERT, one round, one local step
TINY = {"model": "tiny-bert", "num-rounds": 1, "local-steps": 1, "max-length": 32, "round-timeout": 240}


def sets(values: dict) -> list[str]:
    """`--set k=v` arguments."""
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def corolla(tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a short `corolla` command to completion (bounded); its output as text."""
    return subprocess.run([*COROLLA, *args], env=launch.flower_env(tmp_path / "cli-home"), capture_output=True,
                          text=True, timeout=timeout, check=False)


def start_superlink(procs: list, tmp_path: Path, home: Path, *extra: str, fleet: str | None = None,
                    control_port: int | None = None) -> subprocess.Popen:
    """`corolla superlink --home HOME` (flags only when given: a restart reuses the home's), waited on until it listens."""
    cmd = [*COROLLA, "superlink", "--home", str(home), *extra]
    if fleet:
        cmd += ["--fleet-address", fleet]
    if control_port:
        cmd += ["--control-port", str(control_port)]
    link = launch.start(cmd, launch.flower_env(tmp_path / "link-env"), stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT)
    procs.append(link)
    read_line(link, "corolla-superlink fleet API on", timeout=90)
    return link


def start_client(procs: list, tmp_path: Path, name: str, fleet: str, partition: int, partitions: int,
                 *extra: str) -> tuple[subprocess.Popen, Path]:
    """`corolla client` on a built-in partition of the tiny BERT; its output (and stderr) in NAME.log."""
    log = tmp_path / f"{name}.log"
    cmd = [*COROLLA, "client", "--superlink", fleet, "--model", "tiny-bert", "--max-length", "32", "--threads", "1",
           "--partition-id", str(partition), "--num-partitions", str(partitions), "--flwr-home",
           str(tmp_path / f"{name}-flwr"), *extra]
    proc = launch.start(cmd, launch.flower_env(tmp_path / f"{name}-flwr"), log_path=log)
    procs.append(proc)
    return proc, log


def start_server(procs: list, home: Path, out: Path, fleet: str, values: dict, *extra: str) -> tuple[subprocess.Popen, Path]:
    """`corolla server` (one run, its own SuperLink) logging to HOME/server.log, waited on until its Fleet API listens.

    The log is a file, not a pipe: a test may poll the run directory for minutes without draining the output.
    """
    home.mkdir(parents=True, exist_ok=True)
    log = home / "server.log"
    cmd = [*COROLLA, "server", "--out", str(out), "--fleet-address", fleet, *sets(values), *extra]
    server = launch.start(cmd, launch.flower_env(home), log_path=log)
    procs.append(server)
    wait_text(log, "corolla-server fleet API on", timeout=120, proc=server)
    return server, log


def start_trainer(procs: list, home: Path, port: int, *trainer_args: str,
                  prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """`corolla trainer` alone on 127.0.0.1:PORT (a fixed port: a restarted trainer is found at the same address).

    Logs to HOME/trainer.log (appended across restarts); waited on until it listens. Its pid is the one
    its replies report (`trainer_pid` in updates.jsonl). `prefix` runs it through another command first
    (`ip netns exec NS`, which execs in place: the pid stays the trainer's).
    """
    home.mkdir(parents=True, exist_ok=True)
    log = home / "trainer.log"
    before = len(text(log))
    cmd = [*prefix, *COROLLA, "trainer", "--port", str(port), "--model", "tiny-bert", "--max-length", "32", "--threads",
           "1", *trainer_args]
    trainer = launch.start(cmd, launch.flower_env(home), log_path=log)
    procs.append(trainer)
    launch.wait_for(lambda: "corolla-trainer listening on" in text(log)[before:], 120, "the trainer", interval=0.5,
                    proc=trainer)
    return trainer


def start_supernode(procs: list, home: Path, fleet: str, trainer: str, *extra: str,
                    prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """A SuperNode alone (as `corolla client` starts it) whose ClientApp forwards every job to the trainer at `trainer`.

    Logs to HOME/supernode.log. `prefix` runs it through another command first (e.g. `ip netns exec NS`).
    """
    home.mkdir(parents=True, exist_ok=True)
    node_config = {"trainer-address": trainer, "partition-id": 0, "num-partitions": 1}
    cmd = [*prefix, sys.executable, "-m", "corolla.launch.supernode", "--superlink", fleet, "--grpc-rere", "--insecure",
           "--node-config", launch.run_config_arg(node_config), "--host", "127.0.0.1", "--port",
           str(launch.free_port()), *extra]
    node = launch.start(cmd, launch.flower_env(home), log_path=home / "supernode.log")
    procs.append(node)
    return node


def text(path: Path) -> str:
    """A log's content so far ('' before it exists)."""
    return path.read_text(errors="replace") if path.exists() else ""


def wait_text(path: Path, needle: str, timeout: float, proc: subprocess.Popen | None = None) -> str:
    """Wait (bounded) until `needle` appears in the file; return the file's text."""
    launch.wait_for(lambda: needle in text(path), timeout, f"{needle!r} in {path.name}", interval=0.5, proc=proc)
    return text(path)


def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    """The process's exit code; fail the test if it is still running after `timeout` seconds."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"process {proc.args[3:5]} still running after {timeout}s") from None


def joined_node(log: Path, timeout: float, proc: subprocess.Popen | None = None) -> int:
    """The node id a client printed when its SuperNode joined."""
    body = wait_text(log, "corolla-client joined as node", timeout, proc)
    return int(body.split("corolla-client joined as node ")[1].split()[0])


def nodes_json(tmp_path: Path, home: Path) -> dict:
    """`corolla nodes list --json`."""
    r = corolla(tmp_path, "nodes", "list", "--home", str(home), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def since(t0: float) -> float:
    """Seconds since t0 (for bounds in assertions)."""
    return time.monotonic() - t0
