"""A throwaway PostgreSQL server for the tests: Debian's binaries, a temp data folder, stopped by pid.

`postgres` refuses to run as root, so initdb and the server run as the `postgres`
system user the Debian package creates (`runuser`). The server listens on 127.0.0.1
at a free port (password logins: scram-sha-256) and on a private socket folder (the
superuser, trusted, for setting up tables). The role tests connect as owns the
tables, so a write the connector lets through would succeed: a refused write proves
corolla's read-only session, not a missing grant.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from corolla.launch import processes as launch

USER, PASSWORD, DATABASE = "silo_reader", "s3cret-pw", "corolla_test"


def postgres_bin() -> Path:
    """The newest installed PostgreSQL's bin folder; fails (never skips) with the install line when there is none."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if not found:
        pytest.fail("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/postgres): run "
                    "`apt-get update && apt-get install -y postgresql` (.ci/run does).", pytrace=False)
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("the `postgres` system user is missing; reinstall Debian's postgresql package.", pytrace=False)
    return Path(found[-1]).parent


@dataclass
class Postgres:
    """A running server: where it listens and how to reach it."""

    bin: Path
    root: Path
    port: int
    proc: subprocess.Popen

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    def url(self, database: str = DATABASE) -> str:
        """The URL a silo is read from (no password: it comes from COROLLA_DB_PASSWORD)."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def admin(self):  # noqa: ANN201 - a SQLAlchemy engine
        """The superuser over the private socket, for creating tables."""
        import sqlalchemy as sa

        return sa.create_engine(f"postgresql+psycopg://postgres@/{DATABASE}?host={self.socket_dir}&port={self.port}")

    def owner(self):  # noqa: ANN201 - a SQLAlchemy engine
        """The reader role over TCP with its password: what a user with write rights could do outside corolla."""
        import sqlalchemy as sa

        return sa.create_engine(f"postgresql+psycopg://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{DATABASE}")

    def table(self, name: str, df) -> None:  # noqa: ANN001 - a pandas DataFrame
        """Create (or replace) table `name` from `df`, owned by the reader role."""
        df.to_sql(name, self.owner(), index=False, if_exists="replace")

    def stop(self) -> None:
        """SIGINT (fast shutdown) the postmaster by its pid (postmaster.pid), wait, and remove the data folder."""
        pid_file = self.root / "data" / "postmaster.pid"
        if pid_file.is_file():
            pid = int(pid_file.read_text().split()[0])
            try:
                os.kill(pid, signal.SIGINT)  # fast shutdown: open test connections are ended
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            launch.stop(self.proc)
        shutil.rmtree(self.root, ignore_errors=True)


def _as_postgres(*cmd: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd]


def start_postgres() -> Postgres:
    """initdb into a temp folder, start the server, create the reader role and database."""
    pg_bin = postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="corolla-pg-"))
    (root / "sock").mkdir()
    shutil.chown(root, "postgres", "postgres")
    shutil.chown(root / "sock", "postgres", "postgres")
    data = root / "data"
    out = subprocess.run(_as_postgres(str(pg_bin / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
                                      "--no-locale", "--auth-local=trust", "--auth-host=scram-sha-256"),
                         capture_output=True, text=True, timeout=120)
    if out.returncode:
        pytest.fail(f"initdb failed: {out.stderr[-1500:]}", pytrace=False)
    port = launch.free_port()
    log = open(root / "postgres.log", "wb")  # noqa: SIM115 - the server's log, closed when the process ends
    proc = subprocess.Popen(_as_postgres(str(pg_bin / "postgres"), "-D", str(data), "-p", str(port), "-k",
                                         str(root / "sock"), "-h", "127.0.0.1", "-c", "fsync=off"),
                            stdout=log, stderr=subprocess.STDOUT)
    server = Postgres(pg_bin, root, port, proc)
    deadline = time.monotonic() + 60
    while subprocess.run([str(pg_bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                         capture_output=True).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            pytest.fail(f"postgres did not start: {(root / 'postgres.log').read_text()[-1500:]}", pytrace=False)
        time.sleep(0.2)
    import sqlalchemy as sa

    with sa.create_engine(f"postgresql+psycopg://postgres@/postgres?host={root / 'sock'}&port={port}",
                          isolation_level="AUTOCOMMIT").connect() as conn:
        conn.execute(sa.text(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'"))
        conn.execute(sa.text(f"CREATE DATABASE {DATABASE} OWNER {USER}"))
    return server
