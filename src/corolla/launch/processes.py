"""Start and reap Flower's processes: a simulation SuperLink, a deployment SuperLink, SuperNodes.

Every process starts in its own process group (`start_new_session`) and is
stopped by group — SIGTERM, a bounded wait, then SIGKILL — because Flower's
processes spawn children (flwr-serverapp, flwr-clientapp, Ray) that must not
outlive the command that started them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def free_port(host: str = "127.0.0.1") -> int:
    """Return a port that was free a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    """True when something accepts TCP connections on host:port."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2,
              proc: subprocess.Popen | None = None) -> None:
    """Poll `predicate` until true; raise TimeoutError naming `what` (or RuntimeError if `proc` died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with code {proc.returncode} before it was ready")
        time.sleep(interval)
    raise TimeoutError(f"{what} was not ready within {timeout:.0f}s")


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: private FLWR_HOME, no telemetry, no update check, offline hub."""
    env = dict(os.environ)
    env.update(FLWR_HOME=str(flwr_home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHONWARNINGS="ignore::FutureWarning,ignore::DeprecationWarning", RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env.update(extra or {})
    return env


def start(cmd: Sequence[str], env: Mapping[str, str], log_path: Path | None = None, **kw: Any) -> subprocess.Popen:
    """Start `cmd` in a new process group, its output to `log_path` (or inherited)."""
    out = open(log_path, "ab") if log_path else None  # noqa: SIM115 - closed with the process
    return subprocess.Popen(list(cmd), env=dict(env), stdout=out or kw.pop("stdout", None),
                            stderr=subprocess.STDOUT if out else kw.pop("stderr", None), start_new_session=True, **kw)


def descendants(pid: int) -> list[int]:
    """Every living descendant of `pid` (children, grandchildren, ...), read from /proc; [] where there is none."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:  # exited while we looked
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # fields after "(comm)": state, ppid, ...
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a process, its whole group and every descendant: SIGTERM, wait, SIGKILL.

    The group is not enough: Flower's SuperExec starts each `flwr-serverapp` in a new
    session, outside the SuperLink's group, and one such process outlived a failed test.
    The descendants are listed before the first signal (once their parent is gone they are
    re-parented and no longer found) and those still alive at the end are killed.
    """
    family = descendants(proc.pid)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(proc.pid) != proc.pid:  # not a group leader: the group signal missed it
                proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # children left in the group (flwr-clientapp, raylet, ...)
    for pid in family:  # those in other groups or sessions (flwr-serverapp under SuperExec)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:  # not a group leader (started without a session of its own): kill it by pid
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)


@contextlib.contextmanager
def running(procs: list[subprocess.Popen]) -> Iterator[list[subprocess.Popen]]:
    """Stop every process in `procs` (including ones appended later) on exit, newest first."""
    try:
        yield procs
    finally:
        for p in reversed(procs):
            stop(p)


def toml_value(v: Any) -> str:
    """Format a value for `flwr run --run-config` (TOML syntax)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def run_config_arg(values: Mapping[str, Any]) -> str:
    """Return a `--run-config` string for `values`."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


def write_connection(flwr_home: Path, name: str, address: str, *, root_certificates: str | None = None,
                     options: Mapping[str, Any] | None = None) -> None:
    """Write a Flower `config.toml` with one SuperLink connection (the default one)."""
    import tomli_w

    conn: dict[str, Any] = {"address": address}
    if root_certificates:
        conn["root-certificates"] = root_certificates
    else:
        conn["insecure"] = True
    if options:
        conn["options"] = dict(options)
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": name, name: conn}}))


def simulation_options(num_supernodes: int, cpus_per_client: int, total_cpus: int | None,
                       gpus_per_client: float = 0.0) -> dict[str, Any]:
    """Ray backend options for a simulated federation (`flwr run --federation-config` keys).

    `total_cpus` None leaves Ray's init args out: a driver that attaches to an existing
    cluster must not size it (ray.init refuses num_cpus there). `gpus_per_client` is each
    actor's GPU share (0.25: four actors per GPU); Ray then sets each actor's
    CUDA_VISIBLE_DEVICES to the GPU it was given.
    """
    options: dict[str, Any] = {"num-supernodes": num_supernodes, "client-resources-num-cpus": cpus_per_client}
    if gpus_per_client:
        options["client-resources-num-gpus"] = float(gpus_per_client)
    if total_cpus is not None:
        options["init-args-num-cpus"] = total_cpus
    return options


def flwr_run(connection: str, run_config: Mapping[str, Any], env: Mapping[str, str], timeout: float | None = None,
             log_path: Path | None = None, federation_config: Mapping[str, Any] | None = None) -> int:
    """Submit corolla's app with `flwr run APP CONNECTION --stream`; stream its output; return its exit code.

    APP is the generated app folder in FLWR_HOME (`app_bundle.write_app`): the installed package is the code.
    """
    from corolla.launch.app_bundle import write_app

    app = write_app(Path(env["FLWR_HOME"]) / "app")
    cmd = [str(BIN / "flwr"), "run", str(app), connection, "--stream", "--run-config", run_config_arg(run_config)]
    if federation_config:
        cmd += ["--federation-config", run_config_arg(federation_config)]
    proc = start(cmd, env, log_path)
    try:
        return proc.wait(timeout)
    finally:
        stop(proc)


def start_superlink(flwr_home: Path, *, simulation: bool, log_path: Path, fleet_address: str | None = None,
                    http_port: int | None = None, tls: Mapping[str, str] | None = None,
                    extra: Sequence[str] = (), database: Path | None = None,
                    env: Mapping[str, str] | None = None, only_corolla: bool = True) -> tuple[subprocess.Popen, str]:
    """Start `flower-superlink`; return the process and the address `flwr` connects to (its HTTP API).

    `only_corolla`: through `corolla.launch.superlink_guard`, which starts only corolla's app
    bundles (False: Flower's plain SuperLink, for tests that play a coordinator taken over).

    The HTTP API (Runtime and Control, one port in Flower 1.39) listens on 127.0.0.1 only:
    `flwr` commands run on the server host. State lives in `database` (default
    FLWR_HOME/state.db), so registered nodes and runs survive a restart.
    """
    host = "127.0.0.1"
    http_port = http_port or free_port()
    flwr_home.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "corolla.launch.superlink_guard"] if only_corolla else [str(BIN / "flower-superlink")]
    cmd = [*exe, "--host", host, "--port", str(http_port),
           "--database", str(database or flwr_home / "state.db")]
    if tls:
        cmd += ["--ssl-ca-certfile", tls["ca"], "--ssl-certfile", tls["cert"], "--ssl-keyfile", tls["key"]]
    else:
        cmd += ["--insecure"]
    if simulation:
        cmd += ["--simulation"]
    else:
        cmd += ["--fleet-api-type", "grpc-rere", "--fleet-api-address", fleet_address or f"{host}:{free_port()}"]
    # Dependencies are provisioned on every machine by deploy/setup.sh; never pip/uv-install at run time.
    cmd += ["--disable-runtime-dependency-installation"]
    cmd += list(extra)
    proc = start(cmd, flower_env(flwr_home, env), log_path)  # `env`: e.g. RAY_ADDRESS for the simulation it runs
    wait_for(lambda: port_open(host, http_port), 60, "flower-superlink", proc=proc)
    return proc, f"{host}:{http_port}"
