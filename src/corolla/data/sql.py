"""The SQL connector: a table or a query of any database SQLAlchemy reaches, read-only and streamed.

`--data postgresql://user@host:port/db --table NAME` (or `--query "SELECT ..."`);
`sqlite:///path.db` too. PostgreSQL is reached with psycopg 3 (`postgresql://` means
`postgresql+psycopg://`).

Credentials: a password never travels in the URL (refused, since the URL is logged
and stored in run configurations); it comes from $COROLLA_DB_PASSWORD or the file
named by `--db-password-file`, and is only ever put on the engine's URL object.

Read-only, three ways: the session is opened read-only (PostgreSQL's
`default_transaction_read_only`, SQLite's `mode=ro` plus `PRAGMA query_only`), a
`--query` must be one SELECT/WITH/VALUES statement, and nothing is ever committed.

Bounded memory: rows come through a server-side cursor (`stream_results` +
`yield_per`), `batch_size` rows at a time.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa

from corolla.data.errors import SiloError
from corolla.data.files import json_str
from corolla.data.source import DEFAULT_BATCH_ROWS, DataSource, SourceOptions, is_url

#: the environment variable holding the database password (or --db-password-file)
PASSWORD_ENV = "COROLLA_DB_PASSWORD"
#: seconds to wait for the database to answer a connection
CONNECT_TIMEOUT_S = 10
#: the drivers corolla installs for a bare dialect name
_DRIVERS = {"postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg"}
_READ_STATEMENT = re.compile(r"^\s*(select|with|values|table)\b", re.IGNORECASE)
_PYTHON_TYPES: dict[type, pa.DataType] = {str: pa.string(), int: pa.int64(), float: pa.float64(),
                                          bool: pa.bool_(), Decimal: pa.decimal128(38, 10),
                                          dt.datetime: pa.timestamp("us"), dt.date: pa.date32()}


class SqlSource(DataSource):
    """One table (or one query's result) of a database."""

    @classmethod
    def accepts(cls, location: str) -> bool:
        """A URL whose scheme is a SQLAlchemy dialect (`postgresql`, `postgresql+psycopg`, `sqlite`, `mysql`, ...)."""
        if not is_url(location):
            return False
        scheme = location.split("://", 1)[0].lower()
        if scheme.split("+")[0] in _DRIVERS:
            return True
        from sqlalchemy.engine import make_url

        try:
            make_url(location).get_dialect()
        except Exception:  # noqa: BLE001 - not a dialect SQLAlchemy knows: another connector's (or no) URL
            return False
        return True

    @classmethod
    def open(cls, location: str, options: SourceOptions) -> SqlSource:
        """Check the flags, connect, and check the table exists (one line per problem)."""
        if options.split:
            raise SiloError("--split selects a split of a saved dataset, but --data is a database; use --table or "
                            "--query.")
        return cls(location, table=options.table, query=options.query, password_file=options.password_file)

    def __init__(self, url: str, table: str = "", query: str = "", password_file: str = "") -> None:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            parsed = make_url(url)
        except ArgumentError:
            raise SiloError("--data is not a database URL SQLAlchemy can parse; write it as "
                            "dialect://user@host:port/database (e.g. postgresql://alice@db:5432/clinic).") from None
        drivername = _DRIVERS.get(parsed.drivername, parsed.drivername)
        parsed = parsed.set(drivername=drivername)
        #: the URL as logs and messages show it: never a password (a URL holding one is refused below)
        self.display = parsed.render_as_string(hide_password=True)
        if parsed.password is not None:
            raise SiloError(f"--data {self.display} embeds a password; remove it from the URL (URLs are logged and "
                            f"kept in run configurations) and set {PASSWORD_ENV} or pass --db-password-file FILE.")
        if bool(table) == bool(query):
            raise SiloError(f"--data {self.display} is a database: pass --table NAME or --query 'SELECT ...' "
                            "(one of them)." if not table else "--table and --query both given; pass one of them.")
        if query:
            check_read_query(query)
        self.table, self.query = table, query
        self.dialect = parsed.get_backend_name()
        if table:
            self.what = f"table {table!r} of {self.display}"
        else:
            self.what = f"the --query on {self.display}"
        self.engine = _engine(parsed, _password(password_file))
        self._columns: list[str] | None = None
        self._types: dict[str, pa.DataType | None] = {}
        self._check_reachable()

    # ---- connection -------------------------------------------------------------------------------
    def _connect(self) -> Any:
        """A read-only connection; SiloError naming the database and the fix when it cannot be reached."""
        from sqlalchemy.exc import DBAPIError

        try:
            conn = self.engine.connect()
        except DBAPIError as e:
            raise SiloError(f"cannot reach the database {self.display} ({_reason(e)}); check the host, port and "
                            f"database name, that the server runs, and the password ({PASSWORD_ENV} or "
                            "--db-password-file).") from None
        if self.dialect == "postgresql":
            conn = conn.execution_options(postgresql_readonly=True)
        return conn

    def _check_reachable(self) -> None:
        with self._connect() as conn:
            if self.table:
                self._reflect(conn)

    def _split_name(self) -> tuple[str | None, str]:
        schema, _, name = self.table.rpartition(".")
        return schema or None, name

    def _reflect(self, conn: Any) -> None:
        import sqlalchemy as sa

        schema, name = self._split_name()
        insp = sa.inspect(conn)
        if not insp.has_table(name, schema=schema):
            try:
                tables = sorted(insp.get_table_names(schema=schema))
            except Exception:  # noqa: BLE001 - only for the hint
                tables = []
            raise SiloError(f"{self.what} does not exist (tables there: {tables[:20] or 'none'}); pass --table with "
                            "one of them (schema.table for another schema).")
        cols = insp.get_columns(name, schema=schema)
        self._columns = [c["name"] for c in cols]
        self._types = {c["name"]: _arrow_type(c["type"]) for c in cols}

    # ---- what the source is ---------------------------------------------------------------------
    @property
    def columns(self) -> list[str]:
        """A table's columns (reflected), or the query's result columns (the query opened, no row fetched)."""
        if self._columns is None:
            with self._connect() as conn:
                result = self._execute(conn, self._statement(None), 1)
                self._columns = list(result.keys())
                result.close()
        return self._columns

    def column_type(self, column: str) -> pa.DataType | None:
        """A table column's declared type; None for a query (checked on the values as they arrive)."""
        return self._types.get(column)

    @property
    def num_rows(self) -> int | None:
        """A table's row count (`SELECT count(*)`); None for a query."""
        if not self.table:
            return None
        import sqlalchemy as sa

        schema, name = self._split_name()
        with self._connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(sa.table(name, schema=schema))).scalar())

    def describe(self) -> str:
        """`postgresql database postgresql+psycopg://alice@db:5432/clinic, table site_a` (never a password)."""
        what = f"table {self.table}" if self.table else f"query {self.query[:80]!r}"
        return f"{self.dialect} database {self.display}, {what}"

    @property
    def cache_stem(self) -> str:
        """The table's name ("query" for a query)."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.table or "query")[:40]

    # ---- the rows ---------------------------------------------------------------------------------
    def _statement(self, columns: Sequence[str] | None) -> Any:
        import sqlalchemy as sa

        if self.query:
            return sa.text(self.query)
        schema, name = self._split_name()
        cols = list(columns or self.columns)
        return sa.select(*[sa.column(c) for c in cols]).select_from(sa.table(name, schema=schema))

    def _execute(self, conn: Any, statement: Any, batch_size: int) -> Any:
        from sqlalchemy.exc import DBAPIError

        try:
            return conn.execution_options(stream_results=True, yield_per=batch_size).execute(statement)
        except DBAPIError as e:
            raise SiloError(f"{self.what} failed: {_reason(e)}; fix the query (a silo is read with one "
                            "SELECT, in a read-only transaction).") from None

    def iter_batches(self, columns: Sequence[str] | None = None,
                     batch_size: int = DEFAULT_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        """Rows through a server-side cursor, `batch_size` at a time; the transaction is rolled back at the end."""
        from sqlalchemy.exc import DBAPIError

        cols = self.selected(columns)
        with self._connect() as conn:
            result = self._execute(conn, self._statement(cols), batch_size)
            try:
                for part in result.mappings().partitions(batch_size):
                    yield pa.RecordBatch.from_arrays([_array([row[c] for row in part]) for c in cols], names=cols)
            except DBAPIError as e:
                raise SiloError(f"{self.what} failed while reading: {_reason(e)}.") from None
            finally:
                result.close()
                conn.rollback()  # nothing is ever committed


def check_read_query(query: str) -> None:
    """A --query is one SELECT (WITH / VALUES / TABLE) statement: a silo is read, never written."""
    body = query.strip().rstrip(";").strip()
    if not _READ_STATEMENT.match(body) or ";" in body:
        raise SiloError(f"--query must be one SELECT statement (a silo is only read, never written); got "
                        f"{query.strip()[:60]!r}.")


def _password(password_file: str) -> str | None:
    """The password from --db-password-file, else $COROLLA_DB_PASSWORD, else None (trust / peer / .pgpass)."""
    if password_file:
        try:
            return Path(password_file).read_text().rstrip("\r\n")
        except OSError as e:
            raise SiloError(f"--db-password-file {password_file!r} cannot be read ({e.strerror}); give a readable "
                            f"file holding the password, or set {PASSWORD_ENV}.") from None
    return os.environ.get(PASSWORD_ENV) or None


def _engine(url: Any, password: str | None) -> Any:
    """An engine that opens read-only sessions and holds no pooled connection."""
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    backend = url.get_backend_name()
    connect_args: dict[str, Any] = {}
    if backend == "postgresql":
        connect_args = {"options": "-c default_transaction_read_only=on", "connect_timeout": CONNECT_TIMEOUT_S}
    elif backend == "sqlite":
        db = url.database or ""
        if not db or db == ":memory:":
            raise SiloError("--data sqlite:// needs a database file: sqlite:///path/to/file.db.")
        if not db.startswith("file:"):
            if not Path(db).is_file():
                raise SiloError(f"cannot reach the database {url.render_as_string(hide_password=True)}: the file "
                                f"{db!r} does not exist; give the path of an existing SQLite file.")
            url = url.set(database=f"file:{Path(db).resolve()}", query={**url.query, "mode": "ro", "uri": "true"})
    if password is not None:
        url = url.set(password=password)
    engine = sa.create_engine(url, poolclass=NullPool, connect_args=connect_args)
    if backend == "sqlite":
        @sa.event.listens_for(engine, "connect")
        def _query_only(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.execute("PRAGMA query_only = ON")
    return engine


def _reason(e: Exception) -> str:
    """The driver's first line (never the URL: SQLAlchemy's own text adds the statement and a link)."""
    orig = getattr(e, "orig", None) or e
    lines = [ln.strip() for ln in str(orig).strip().splitlines() if ln.strip()]
    return (lines[0] if lines else type(orig).__name__)[:300]


def _arrow_type(sql_type: Any) -> pa.DataType | None:
    """The Arrow type of a reflected column type (None when unknown: JSON, arrays; their values are checked)."""
    try:
        return _PYTHON_TYPES.get(sql_type.python_type)
    except NotImplementedError:
        return None


def _array(values: list) -> pa.Array:
    """One column's values as Arrow; values of mixed types (SQLite's dynamic typing) as the text a CSV would hold."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([json_str(v) for v in values], pa.string())
